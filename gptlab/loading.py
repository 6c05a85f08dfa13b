"""Loading a model to run it: the device to put it on, and (model, tokenizer) from a gptlab checkpoint
file, a Hugging Face model directory or a hub id (sample.py, python -m gptlab.eval)."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Literal

import torch

from gptlab import checkpoint
from gptlab.data.tokenizers import tokenizer_from_state
from gptlab.errors import CheckpointError, ConfigError

Dtype = Literal["float32", "bfloat16", "float16"]
DTYPES = {name: getattr(torch, name) for name in typing.get_args(Dtype)}


def _hub_id(text: str) -> bool:
    """`gpt2`, `org/name`: what the hub calls a model (a path that does not exist and has no file suffix)."""
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", text) is not None and not text.endswith((".ckpt", ".pt", ".pth"))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        have = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA device"
        raise ConfigError(f"device={name}: this machine has {have}; use device=cpu or device=auto")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"device={name}: MPS is not available here; use device=cpu or device=auto")
    return device


def load_model(path: str | Path, tokenizer: str | None = None):
    """(model, tokenizer) from a gptlab checkpoint file or a Hugging Face model directory
    (`tokenizer`: the directory's tokenizer when it names none, see gptlab/hf/tokenizer.py)."""
    path = Path(str(path)).expanduser()
    if (path.is_dir() and not checkpoint.is_sharded(path)) or (not path.exists() and _hub_id(str(path))):
        # (a sharded checkpoint goes to checkpoint.load, which names the consolidate command)
        from gptlab.hf import load_hf_model

        return load_hf_model(path if path.is_dir() else str(path), tokenizer)
    ckpt = checkpoint.load(path)
    model, hparams = checkpoint.model_from_checkpoint(ckpt, path)
    if not hparams.get("tokenizer"):
        raise CheckpointError(f"{path} carries no tokenizer state; it cannot be sampled from text")
    return model, tokenizer_from_state(hparams["tokenizer"])
