"""Finding a Hugging Face model directory and reading what it holds: config.json and the weights.

A source is a local directory or a hub id (`gpt2`, `openai-community/gpt2-medium`), which
huggingface_hub downloads once into its cache. The weights come in three layouts, read in this
order: `model.safetensors` (or a sharded `model.safetensors.index.json`), then `pytorch_model.bin`
(or `pytorch_model.bin.index.json`), always with `weights_only=True`. Nothing here knows about an
architecture; the key names are left as the files have them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from gptlab.errors import CheckpointError
from gptlab.files import json_object

INSTALL_HINT = 'install the Hugging Face extra: pip install -e ".[hf]"'
# what a download fetches: config, weights and the tokenizer files gptlab can judge
CONFIG_FILES = ["config.json", "gptlab_tokenizer.json", "tokenizer.json", "vocab.json", "merges.txt",
                "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]
SAFETENSORS_FILES = ["model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
BIN_FILES = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def resolve_dir(path_or_id: str | os.PathLike) -> Path:
    """A local directory, or the snapshot directory of a hub id (downloaded once, then cached)."""
    text = str(path_or_id).strip()
    if not text:
        raise CheckpointError("no Hugging Face model given: pass a local directory or a hub id such as gpt2")
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(
            f"{path} is a file; give the Hugging Face model directory (config.json + model.safetensors) "
            f"or a hub id such as gpt2"
        )
    looks_local = text.startswith((".", "/", "~", "\\")) or text.count("/") > 1 or os.sep != "/" and os.sep in text
    if looks_local:
        raise CheckpointError(f"Hugging Face model directory not found: {path}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{text!r} is no local directory; to download it from the hub, {INSTALL_HINT}") from None
    try:
        local = Path(snapshot_download(text, allow_patterns=CONFIG_FILES + SAFETENSORS_FILES))
        if not any(local.glob("*.safetensors")):  # an old repo with PyTorch weights only
            local = Path(snapshot_download(text, allow_patterns=CONFIG_FILES + BIN_FILES))
    except Exception as e:  # offline, unknown repo, invalid id, gated repo, ...
        raise CheckpointError(
            f"{text!r} is no local directory and could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}: {_first_line(e)}). Downloading needs network access; offline, pass a local "
            f"directory with config.json and model.safetensors (or pytorch_model.bin)"
        ) from None
    return local


def read_json(file: Path, what: str = "a JSON object") -> dict[str, Any]:
    try:
        raw = file.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {file}: {e.strerror}") from None
    return json_object(raw, str(file), CheckpointError, what)


def read_config(directory: Path) -> dict[str, Any]:
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{directory} has no config.json; is it a Hugging Face model directory?")
    return read_json(config_file)


def _shards(directory: Path, index: Path) -> list[Path]:
    weight_map = read_json(index, "a sharded-weights index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index} has no weight_map of tensor names to files")
    return [directory / name for name in dict.fromkeys(weight_map.values())]


def _read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f"{files[0].parent} holds safetensors weights; to read them, {INSTALL_HINT}") from None
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file), device="cpu"))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{file} is not a readable safetensors file ({_first_line(e)})") from None
    return state


def _read_bin(files: list[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            part = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # refused pickle, truncated file, missing shard, ...
            raise CheckpointError(f"{file} could not be loaded with weights_only=True ({_first_line(e)})") from None
        if not isinstance(part, dict):
            raise CheckpointError(f"{file} does not hold a state dict")
        state.update(part)
    return state


def read_state(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's weights, under the names the files use."""
    for single, index, reader in (
        ("model.safetensors", "model.safetensors.index.json", _read_safetensors),
        ("pytorch_model.bin", "pytorch_model.bin.index.json", _read_bin),
    ):
        if (directory / single).is_file():
            state = reader([directory / single])
        elif (directory / index).is_file():
            state = reader(_shards(directory, directory / index))
        else:
            continue
        for key, tensor in state.items():
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"{directory}: {key} is not a tensor")
        return state
    raise CheckpointError(f"{directory} has no model.safetensors or pytorch_model.bin")
