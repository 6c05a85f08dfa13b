"""The checkpoint file: its layout, its one writer and its one reader.

A gptlab checkpoint is a Lightning checkpoint (a `torch.save`d dict of plain containers and tensors,
so it loads with `weights_only=True`):

    {
      "state_dict":       {"model.<parameter>": Tensor, ...},   # the LightningModule's `model.`
      "hyper_parameters": {"model": {arch, shape..., vocab_size},  # enough to rebuild the model
                           "optim": {...}, "tokenizer": {"kind": ..., ...}, "seed": int},
      "gptlab":           {"format": 1, "tokens_seen": int, "micro_step": int, "best_val_loss": float,
                           "metrics": {"val/loss": float, ...},  # the last logged values
                           "trackers": {name: run id, ...}},
      "global_step": int, "epoch": int,
      # written by Lightning while training, absent from imported checkpoints:
      "optimizer_states", "lr_schedulers", "loops", "callbacks", "TokenDataModule": {...}, ...
    }

Lightning writes and reads it through `AtomicCheckpointIO` (below) and fills most of it (`save_hyperparameters`, `LanguageModel.on_save_checkpoint`, the
DataModule's `state_dict`); `new_checkpoint` builds the same layout for imported weights. Every
file goes through `save` (atomic, umask modes) and comes back through `load` (`weights_only=True`).
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from gptlab.compat import COMPILE_PREFIX
from gptlab.errors import CheckpointError
from gptlab.files import atomic_write, remove_stale

FORMAT = 1
MODULE_PREFIX = "model."  # the LightningModule holds the model as `self.model`
_ZIP_MAGIC = b"PK\x03\x04"
SHARDED_META = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint


def save(checkpoint: dict[str, Any], path: str | Path) -> Path:
    """Write `checkpoint` to `path` atomically: a crash or a full disk leaves the previous file intact."""
    path = Path(path)
    with atomic_write(path, "wb", what="write the checkpoint") as f:
        try:
            torch.save(checkpoint, f)
        except RuntimeError as e:
            # torch's zip writer turns a failed write (a full disk) into a RuntimeError; the OSError is its context
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise
    return path


def load(path: str | Path | None, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint without executing any code it might carry (weights_only=True).

    `mmap=True` maps the tensors instead of reading them: cheap when only the metadata is wanted."""
    if path is None or str(path) == "":
        raise CheckpointError("no checkpoint given: pass ckpt_path=<run>/checkpoints/last.ckpt")
    path = Path(path).expanduser()
    if is_sharded(path):
        raise CheckpointError(f"{path} is a sharded checkpoint (trainer=fsdp2/tp): make it one file first with "
                              f"`{consolidate_hint(path)}`")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    if head != _ZIP_MAGIC and not head.startswith(b"\x80"):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint file (e.g. <run>/checkpoints/last.ckpt)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and head == _ZIP_MAGIC)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:Unsupported global: |unsupported )GLOBAL ([\w.]+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"refused to load {path}: it holds a Python object{what} beyond tensors and plain containers; "
            f"gptlab only loads checkpoints that cannot run code"
        ) from None
    except Exception as e:  # torch raises many kinds on garbage input (RuntimeError, EOFError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or damaged: {first})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path} is not a gptlab/Lightning checkpoint (no 'state_dict')")
    return ckpt


def is_sharded(path: str | Path) -> bool:
    """A sharded checkpoint: a directory of shards with the rest of the checkpoint in meta.pt (gptlab.sharded)."""
    path = Path(path)
    return path.is_dir() and (path / SHARDED_META).is_file()


def consolidate_hint(path: str | Path) -> str:
    return f"python -m gptlab.sharded consolidate {path} <file>.ckpt"


def sharded_metadata(path: str | Path) -> dict[str, Any]:
    """meta.pt of a sharded checkpoint: everything but the weights and optimizer state (weights_only)."""
    try:
        meta = torch.load(Path(path) / SHARDED_META, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable sharded checkpoint ({SHARDED_META}: {e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}/{SHARDED_META} is not a checkpoint's metadata")
    return meta


def strip_compile_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Names without torch.compile's wrapper, found in checkpoints of other tools that saved a compiled
    module's state_dict (gptlab compiles in place and never writes it)."""
    return {k.replace(COMPILE_PREFIX, ""): v for k, v in state_dict.items()}


def model_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model's own parameters: no LightningModule prefix, no torch.compile wrapper."""
    return {
        k[len(MODULE_PREFIX):]: v
        for k, v in strip_compile_prefix(checkpoint["state_dict"]).items()
        if k.startswith(MODULE_PREFIX)
    }


@dataclass
class Info:
    """What a checkpoint says about its run, read without loading the weights."""

    path: Path
    step: int
    model: dict[str, Any]
    tokenizer: dict[str, Any] | None
    best_val_loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # the last logged values
    trackers: dict[str, Any] = field(default_factory=dict)
    trained_s: float | None = None  # the seconds Lightning's Timer had counted (runs with a trainer.max_time)
    sharded: bool = False  # a directory written by a model-parallel trainer (gptlab.sharded)
    consolidated_from: str | None = None  # weights consolidated from that sharded checkpoint: no optimizer state


def info(path: str | Path) -> Info:
    ckpt = sharded_metadata(path) if is_sharded(path) else load(path, mmap=True)
    hparams = ckpt.get("hyper_parameters") or {}
    state = ckpt.get("gptlab") or {}
    best = state.get("best_val_loss")
    return Info(
        path=Path(path),
        step=int(ckpt.get("global_step", 0)),
        model=dict(hparams.get("model") or {}),
        tokenizer=hparams.get("tokenizer"),
        best_val_loss=None if best is None else float(best),
        metrics={k: float(v) for k, v in (state.get("metrics") or {}).items()},
        trackers=dict(state.get("trackers") or {}),
        trained_s=_timer_seconds(ckpt.get("callbacks") or {}),
        sharded=is_sharded(path),
        consolidated_from=state.get("consolidated_from"),
    )


def _timer_seconds(callbacks: dict[str, Any]) -> float | None:
    timer = callbacks.get("Timer") or {}
    seconds = (timer.get("time_elapsed") or {}).get("train")
    return None if seconds is None else float(seconds)


def model_from_checkpoint(ckpt: dict[str, Any], path: str | Path = "checkpoint") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a gptlab checkpoint; returns (model, hyper_parameters)."""
    from gptlab.models import RUN_SWITCHES, build_model

    hparams = ckpt.get("hyper_parameters") or {}
    if not isinstance(hparams.get("model"), dict):
        raise CheckpointError(f"{path} has no model config in its hyper_parameters; was it written by gptlab?")
    # the run switches (compile, init_from) say how a run executes, not what the model is: a config that carries them loads
    model = build_model({k: v for k, v in hparams["model"].items() if k not in RUN_SWITCHES})
    load_weights(model, model_state(ckpt), str(path))
    return model, hparams


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """`model.load_state_dict(state)`, strict, with an error that names what does not fit."""
    problem = state_mismatch(model.state_dict(), state)
    if problem:
        raise CheckpointError(f"{source} does not fit the model: {problem}")
    model.load_state_dict(state, strict=True)


def state_mismatch(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], limit: int = 4) -> str | None:
    """None if `given` has exactly the keys and shapes of `expected`, else a short account of the differences."""
    parts = []
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape (checkpoint vs model)", shapes)):
        if items:
            more = f" and {len(items) - limit} more" if len(items) > limit else ""
            parts.append(f"{label}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts) or None


def new_checkpoint(
    model_cfg: dict[str, Any], state_dict: dict[str, torch.Tensor], tokenizer: dict[str, Any] | None,
    source: str | None = None,
) -> dict[str, Any]:
    """A checkpoint in the layout above for weights that were not trained here (an import): it samples,
    evaluates (`train=false`) and initialises training (`model.init_from`), but resumes nothing."""
    return {
        "state_dict": {MODULE_PREFIX + k: v.detach().contiguous() for k, v in state_dict.items()},
        "hyper_parameters": {"model": dict(model_cfg), "optim": {}, "tokenizer": tokenizer, "seed": 0},
        "gptlab": {"format": FORMAT, "tokens_seen": 0, "micro_step": 0, "best_val_loss": float("inf"),
                   "trackers": {}, "source": source},
        "global_step": 0,
        "epoch": 0,
    }


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes through `gptlab.checkpoint.save` (a crash or a full disk mid-write leaves the previous
    checkpoint intact) and reads through `gptlab.checkpoint.load` (`weights_only=True`). The first
    write of a run removes temporary files that killed runs left in the checkpoint directory."""

    def __init__(self) -> None:
        super().__init__()
        self._swept: set[Path] = set()

    def save_checkpoint(self, checkpoint_dict: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        if path.parent not in self._swept:
            remove_stale(path.parent, (".*.tmp",))
            self._swept.add(path.parent)
        save(checkpoint_dict, path)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load(path, map_location=map_location or "cpu")

