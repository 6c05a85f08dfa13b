"""Loading checkpoints as untrusted input: `weights_only=True`, clear errors, either key layout."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from gptlab.errors import CheckpointError
from gptlab.models import build_model

COMPILE_PREFIX = "_orig_mod."


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint file without executing any code it might carry (weights_only=True).

    `mmap=True` maps the tensors instead of reading them: cheap when only the metadata is wanted."""
    if path is None or str(path) == "":
        raise CheckpointError("no checkpoint given: pass ckpt_path=<run>/checkpoints/last.ckpt")
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"refused to load {path}: it holds objects other than tensors and plain containers, which "
            f"could run code when unpickled ({first})"
        ) from None
    except Exception as e:  # torch raises many kinds on garbage input (RuntimeError, EOFError, IndexError, ...)
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or not a PyTorch file: {e})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a gptlab/Lightning checkpoint (no 'state_dict')")
    return ckpt


def clean_state_dict(state_dict: dict[str, torch.Tensor], prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The model's own keys: strip the LightningModule attribute prefix and any torch.compile
    `_orig_mod.` wrapper, so checkpoints from compiled and eager models load the same way."""
    out = {}
    for key, value in state_dict.items():
        key = key.replace(COMPILE_PREFIX, "")
        if prefix and key.startswith(prefix):
            key = key[len(prefix) :]
        elif prefix:
            continue
        out[key] = value
    return out


def model_from_checkpoint(ckpt: dict[str, Any], path: str | Path = "checkpoint") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a gptlab checkpoint; returns (model, hyper_parameters)."""
    hparams = ckpt.get("hyper_parameters") or {}
    if "model" not in hparams:
        raise CheckpointError(f"{path} has no model config in its hyper_parameters; was it written by gptlab?")
    model = build_model(dict(hparams["model"]))
    state = clean_state_dict(ckpt["state_dict"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit its own model config: {str(e).splitlines()[0]}") from None
    return model, hparams

