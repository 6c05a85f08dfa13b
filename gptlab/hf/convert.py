"""gptlab checkpoints <-> Hugging Face GPT-2 and Llama directories, and pretrained weights into gptlab models.

The format is decided here and nowhere else. A directory is Llama when its config.json says
`model_type: llama` (gptlab.hf.llama) and GPT-2 otherwise (gptlab.hf.gpt2, which names anything
that is neither). A model exports as LlamaForCausalLM when it has `pos=rope` (gptlab.hf.llama refuses
what Llama cannot express) and as GPT2LMHeadModel otherwise (gptlab.hf.gpt2 refuses the variants
GPT-2 lacks). Checkpoints are read with `gptlab.checkpoint.load` / `model_from_checkpoint` and
written with `new_checkpoint` + `save` (atomic); directories are written by `export.write_directory`
(all or nothing); the tokenizer of a directory follows the rules in `tokenizer`; the shape of a run
that starts from a checkpoint, those in `pretrained`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from gptlab import checkpoint
from gptlab.data.tokenizers import Tokenizer
from gptlab.errors import CheckpointError, ConfigError
from gptlab.hf import gpt2, llama
from gptlab.hf.export import WEIGHTS_FILE, write_directory
from gptlab.hf.pretrained import check_model, explicit_keys, merge_shape
from gptlab.hf.tokenizer import TOKENIZER_FILE, build, check_fits, describe, directory_state, override_state, \
    tokenizer_files
from gptlab.hf.weights import INSTALL_HINT, read_config, read_state, resolve_dir
from gptlab.models import RUN_SWITCHES, build_model
from gptlab.models.gpt import GPT

GPT2, LLAMA = "GPT-2", "Llama"


@dataclass
class Converted:
    """What an export or import wrote; `str()` is its one-line summary."""

    source: str
    path: Path
    family: str
    parameters: int
    tokenizer: str
    files: list[str]

    def __str__(self) -> str:
        files = f" ({', '.join(self.files)})" if self.files else ""
        return (f"[gptlab] {self.source} -> {self.path}{files}: {self.family} with {self.parameters:,} parameters, "
                f"{self.tokenizer}")


@dataclass
class HFModel:
    """A Hugging Face model directory as gptlab reads it."""

    family: str  # GPT2 or LLAMA
    directory: Path
    cfg: dict[str, Any]  # the gptlab model config of its config.json

    def weights(self) -> dict[str, torch.Tensor]:
        """Its weights in gptlab's names and layout."""
        module = llama if self.family == LLAMA else gpt2
        return module.to_gptlab_state(self.cfg, read_state(self.directory), str(self.directory))


def read_hf(path_or_id: str | os.PathLike) -> HFModel:
    """The family and gptlab model config of a Hugging Face directory or hub id (weights: `.weights()`)."""
    directory = resolve_dir(path_or_id)
    config, source = read_config(directory), str(directory / "config.json")
    if config.get("model_type") == "llama":
        return HFModel(LLAMA, directory, llama.llama_config_to_model_cfg(config, source))
    return HFModel(GPT2, directory, gpt2.hf_config_to_model_cfg(config, source))


def family_of(model: nn.Module) -> str:
    """The Hugging Face format `model` exports to."""
    return LLAMA if isinstance(model, GPT) and model.config.pos == "rope" else GPT2


def _load(model: nn.Module, hf: HFModel, source: str) -> None:
    if hf.family == GPT2:
        gpt2.copy_into(model, hf.cfg, hf.weights(), source)  # a shorter block_size keeps the first positions
    else:
        check_model(model, hf.cfg, source)
        checkpoint.load_weights(model, hf.weights(), source)


def _read(
    path_or_id: str | os.PathLike, tokenizer: str | None
) -> tuple[nn.Module, Tokenizer, dict[str, Any], str, str]:
    """(model, tokenizer, tokenizer state, where the tokenizer came from, family) of a Hugging Face model."""
    hf = read_hf(path_or_id)
    directory = hf.directory
    if tokenizer:  # an explicit choice wins over whatever the directory holds
        state, origin = override_state(tokenizer), f"tokenizer={tokenizer}"
    elif (directory / TOKENIZER_FILE).is_file():
        state, origin = directory_state(directory), str(directory / TOKENIZER_FILE)
    else:
        state, origin = directory_state(directory), f"GPT-2's tokenizer files in {directory}"
    tok = build(state, hf.cfg["vocab_size"], origin)
    model = build_model(hf.cfg)
    _load(model, hf, str(path_or_id))
    return model.eval(), tok, state, origin, hf.family


def source_model_cfg(init_from: str | os.PathLike) -> dict[str, Any]:
    """The model config of a gptlab checkpoint file, a Hugging Face directory or a hub id (no weights read)."""
    path = Path(str(init_from)).expanduser()
    if not path.is_file():
        return read_hf(init_from).cfg
    model = checkpoint.info(path).model
    if not model:
        raise CheckpointError(f"{path} has no model config in its hyper_parameters; was it written by gptlab?")
    return {k: v for k, v in model.items() if k not in RUN_SWITCHES}


def pretrained_model_cfg(
    init_from: str | os.PathLike, model_cfg: dict[str, Any], overrides: list[str]
) -> dict[str, Any]:
    """The model config of a run with `model.init_from=<init_from>` (train.py): the checkpoint's shape
    with the run's dropout (gptlab.hf.pretrained). `model_cfg`: the run's model config without its
    run switches; `overrides`: the command line's (Hydra's task overrides), whose `model.*` values
    must agree with the checkpoint."""
    source = f"model.init_from={init_from}"
    return merge_shape(source_model_cfg(init_from), model_cfg, explicit_keys(overrides), source)


def load_pretrained_into(model: nn.Module, path_or_id: str | os.PathLike) -> nn.Module:
    """Overwrite `model`'s weights with pretrained ones (train.py's `model.init_from`): a Hugging Face
    GPT-2 or Llama directory or hub id, or a gptlab checkpoint file (e.g. one written by `import_checkpoint`).

    The model's shape must be the checkpoint's (`pretrained_model_cfg` gives it), except that
    block_size may be smaller: a learned position table keeps its first block_size rows. Returns `model`."""
    path = Path(str(path_or_id)).expanduser()
    if not path.is_file():
        _load(model, read_hf(path_or_id), str(path_or_id))
        return model
    ckpt = checkpoint.load(path)
    hparams = ckpt.get("hyper_parameters") or {}
    if isinstance(hparams.get("model"), dict):
        check_model(model, {k: v for k, v in hparams["model"].items() if k not in RUN_SWITCHES}, str(path))
    state = checkpoint.model_state(ckpt)
    wpe = state.get("transformer.wpe.weight")
    block = getattr(getattr(model, "config", None), "block_size", None)
    if wpe is not None and block is not None and wpe.dim() == 2 and block < wpe.size(0):
        state["transformer.wpe.weight"] = wpe[:block]  # a shorter context: the first positions (as nanoGPT)
    checkpoint.load_weights(model, state, str(path))
    return model


def load_hf_model(path_or_id: str | os.PathLike, tokenizer: str | None = None) -> tuple[nn.Module, Tokenizer]:
    """(model in eval mode, tokenizer) of a Hugging Face GPT-2 or Llama directory or hub id (sample.py).

    `tokenizer`: a tiktoken encoding name or a gptlab_tokenizer.json path, for a directory that
    holds neither gptlab_tokenizer.json nor GPT-2's tokenizer files."""
    model, tok, _, _, _ = _read(path_or_id, tokenizer)
    return model, tok


def export_hf(
    model: nn.Module, out_dir: str | os.PathLike, tokenizer: Tokenizer | None = None
) -> tuple[Path, list[str]]:
    """Write `model` (and `tokenizer`, if given) as a Hugging Face directory, all or nothing:
    LlamaForCausalLM for pos=rope, GPT2LMHeadModel otherwise (`from_pretrained(out_dir)` loads it).

    The directory holds config.json and model.safetensors; with a tokenizer also gptlab_tokenizer.json,
    GPT-2's tokenizer files for GPT-2 BPE (or what the tokenizer's `to_hf_files` writes), and
    generation_config.json when the tokenizer has an end-of-text token. Returns (directory, file names)."""
    eot = None if tokenizer is None else tokenizer.eot_id
    if family_of(model) == LLAMA:
        config, weights = llama.hf_config(model, eot), llama.hf_state_dict
    else:
        config, weights = gpt2.model_cfg_to_hf_config(model, eot), gpt2.hf_state_dict
    files: dict[str, str | bytes] = {"config.json": ""}
    if tokenizer is not None:
        check_fits(tokenizer, model.config.vocab_size, "export")
        files.update(tokenizer_files(tokenizer, model.config.block_size))
        if "vocab.json" in files:
            config["tokenizer_class"] = "GPT2Tokenizer"
    files["config.json"] = json.dumps(config, indent=2) + "\n"
    if eot is not None:
        files["generation_config.json"] = json.dumps({"bos_token_id": eot, "eos_token_id": eot}) + "\n"
    try:
        from safetensors.torch import save
    except ImportError:
        raise ConfigError(f"writing {WEIGHTS_FILE} needs safetensors; {INSTALL_HINT}") from None
    # serialised in memory and written by Python, so a full disk is an OSError like any other write
    files[WEIGHTS_FILE] = save(weights(model), metadata={"format": "pt"})
    return write_directory(out_dir, files, getattr(tokenizer, "to_hf_files", None))


def export_checkpoint(ckpt_path: str | os.PathLike, out_dir: str | os.PathLike) -> Converted:
    """gptlab .ckpt -> Hugging Face GPT-2 or Llama directory (with the checkpoint's tokenizer)."""
    model, hparams = checkpoint.model_from_checkpoint(checkpoint.load(ckpt_path), ckpt_path)
    state = hparams.get("tokenizer")
    tok = build(state, model.config.vocab_size, f"{ckpt_path} (tokenizer)") if state else None
    out, files = export_hf(model, out_dir, tok)
    if tok is None:
        note = "no tokenizer (the checkpoint has none; an import needs --tokenizer)"
    else:
        note = f"{describe(state)} tokenizer ({tok.vocab_size} tokens)"
    return Converted(str(ckpt_path), out, family_of(model), model.num_params(), note, files)


def import_checkpoint(
    path_or_id: str | os.PathLike, out_file: str | os.PathLike, tokenizer: str | None = None
) -> Converted:
    """Hugging Face GPT-2 or Llama directory or hub id -> a gptlab checkpoint that sample.py and
    `model.init_from` read. The tokenizer comes from the directory (see gptlab.hf.tokenizer) or
    `tokenizer` (a tiktoken encoding name or a gptlab_tokenizer.json path)."""
    out = Path(out_file).expanduser()
    if out.is_dir():
        raise ConfigError(f"{out} is a directory; give the checkpoint file to write, e.g. {out / 'model.ckpt'}")
    model, tok, state, origin, family = _read(path_or_id, tokenizer)
    model_cfg = {"arch": "gpt", **dataclasses.asdict(model.config)}
    ckpt = checkpoint.new_checkpoint(model_cfg, model.state_dict(), state, source=str(path_or_id))
    checkpoint.save(ckpt, out)
    note = f"{describe(state)} tokenizer ({tok.vocab_size} tokens, from {origin}); sample.py ckpt_path={out}"
    return Converted(str(path_or_id), out, family, model.num_params(), note, [])
