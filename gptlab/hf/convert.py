"""gptlab checkpoints <-> Hugging Face GPT-2 directories, and Hugging Face weights into gptlab models.

Checkpoints are read with `gptlab.checkpoint.load` / `model_from_checkpoint` and written with
`gptlab.checkpoint.new_checkpoint` + `save` (atomic); directories are written by `export.export_hf`
(all or nothing) and read by `weights` + `gpt2`; the tokenizer of a directory follows the rules in
`tokenizer`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn

from gptlab import checkpoint
from gptlab.data.tokenizers import Tokenizer
from gptlab.errors import ConfigError
from gptlab.hf import gpt2
from gptlab.hf.export import export_hf
from gptlab.hf.tokenizer import TOKENIZER_FILE, build, describe, directory_state, override_state
from gptlab.hf.weights import read_config, read_state, resolve_dir
from gptlab.models import build_model
from gptlab.models.gpt import GPT


@dataclass
class Converted:
    """What an export or import wrote; `str()` is its one-line summary."""

    source: str
    path: Path
    parameters: int
    tokenizer: str
    files: list[str]

    def __str__(self) -> str:
        files = f" ({', '.join(self.files)})" if self.files else ""
        return (f"[gptlab] {self.source} -> {self.path}{files}: GPT-2 with {self.parameters:,} parameters, "
                f"{self.tokenizer}")


def _read(path_or_id: str | os.PathLike, tokenizer: str | None) -> tuple[GPT, Tokenizer, dict[str, Any], str]:
    """(model, tokenizer, tokenizer state, where the tokenizer came from) of a Hugging Face GPT-2."""
    directory = resolve_dir(path_or_id)
    cfg = gpt2.hf_config_to_model_cfg(read_config(directory), str(directory / "config.json"))
    if tokenizer:  # an explicit choice wins over whatever the directory holds
        state, origin = override_state(tokenizer), f"tokenizer={tokenizer}"
    elif (directory / TOKENIZER_FILE).is_file():
        state, origin = directory_state(directory), str(directory / TOKENIZER_FILE)
    else:
        state, origin = directory_state(directory), f"GPT-2's tokenizer files in {directory}"
    tok = build(state, cfg["vocab_size"], origin)
    model = build_model(cfg)
    gpt2.copy_into(model, cfg, gpt2.to_gptlab_state(cfg, read_state(directory), str(directory)), str(path_or_id))
    return model.eval(), tok, state, origin


def load_pretrained_into(model: nn.Module, path_or_id: str | os.PathLike) -> nn.Module:
    """Overwrite `model`'s weights with pretrained ones (train.py's `model.init_from`): a Hugging Face
    GPT-2 directory or hub id, or a gptlab checkpoint file (e.g. one written by `import_checkpoint`).

    The model's shape must be the checkpoint's (n_layer, n_head, n_embd, vocab_size; from Hugging
    Face, block_size may be smaller: the first block_size positions are used). Returns `model`."""
    path = Path(str(path_or_id)).expanduser()
    if path.is_file():
        checkpoint.load_weights(model, checkpoint.model_state(checkpoint.load(path)), str(path))
        return model
    directory = resolve_dir(path_or_id)
    cfg = gpt2.hf_config_to_model_cfg(read_config(directory), str(directory / "config.json"))
    gpt2.copy_into(model, cfg, gpt2.to_gptlab_state(cfg, read_state(directory), str(directory)), str(path_or_id))
    return model


def load_hf_model(path_or_id: str | os.PathLike, tokenizer: str | None = None) -> tuple[GPT, Tokenizer]:
    """(model in eval mode, tokenizer) of a Hugging Face GPT-2 directory or hub id (sample.py).

    `tokenizer`: a tiktoken encoding name or a gptlab_tokenizer.json path, for a directory that
    holds neither gptlab_tokenizer.json nor GPT-2's tokenizer files."""
    model, tok, _, _ = _read(path_or_id, tokenizer)
    return model, tok


def export_checkpoint(ckpt_path: str | os.PathLike, out_dir: str | os.PathLike) -> Converted:
    """gptlab .ckpt -> Hugging Face GPT-2 directory (with the checkpoint's tokenizer)."""
    model, hparams = checkpoint.model_from_checkpoint(checkpoint.load(ckpt_path), ckpt_path)
    state = hparams.get("tokenizer")
    tok = build(state, model.config.vocab_size, f"{ckpt_path} (tokenizer)") if state else None
    out, files = export_hf(model, out_dir, tok)
    if tok is None:
        note = "no tokenizer (the checkpoint has none; an import needs --tokenizer)"
    else:
        note = f"{describe(state)} tokenizer ({tok.vocab_size} tokens)"
    return Converted(str(ckpt_path), out, model.num_params(), note, files)


def import_checkpoint(
    path_or_id: str | os.PathLike, out_file: str | os.PathLike, tokenizer: str | None = None
) -> Converted:
    """Hugging Face GPT-2 directory or hub id -> a gptlab checkpoint that sample.py and
    `model.init_from` read. The tokenizer comes from the directory (see gptlab.hf.tokenizer) or
    `tokenizer` (a tiktoken encoding name or a gptlab_tokenizer.json path)."""
    out = Path(out_file).expanduser()
    if out.is_dir():
        raise ConfigError(f"{out} is a directory; give the checkpoint file to write, e.g. {out / 'gpt2.ckpt'}")
    model, tok, state, origin = _read(path_or_id, tokenizer)
    model_cfg = {"arch": "gpt", **dataclasses.asdict(model.config)}
    ckpt = checkpoint.new_checkpoint(model_cfg, model.state_dict(), state, source=str(path_or_id))
    checkpoint.save(ckpt, out)
    note = f"{describe(state)} tokenizer ({tok.vocab_size} tokens, from {origin}); sample.py ckpt_path={out}"
    return Converted(str(path_or_id), out, model.num_params(), note, [])
