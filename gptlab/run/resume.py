"""Which checkpoint a run resumes, and whether it fits: decided before anything is written.

`ckpt_path=<run>/checkpoints/x.ckpt` resumes that checkpoint *in its own run directory*, so the
trackers and the checkpoints continue where they were. `resume=auto` picks the newest checkpoint
under `paths.output_dir` (give the run with `hydra.run.dir=<run>`), or starts fresh.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gptlab import checkpoint
from gptlab.errors import CheckpointError, ConfigError
from gptlab.training.trainer_settings import budget_seconds

# keys that change neither the parameters nor what the tokens mean: free to differ on resume
_FREE_KEYS = ("dropout",)


def newest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = [p for p in (Path(run_dir) / "checkpoints").glob("*.ckpt") if p.is_file() or checkpoint.is_sharded(p)]
    return max(ckpts, key=lambda p: p.stat().st_mtime_ns) if ckpts else None


def resolve(ckpt_path: str | None, resume: str | None, output_dir: str | Path) -> tuple[checkpoint.Info | None, Path]:
    """The checkpoint to resume from (None: start fresh), and the run directory: the checkpoint's own
    run for `<run>/checkpoints/x.ckpt`, else `output_dir`."""
    if resume not in (None, "auto"):
        raise ConfigError(f"resume={resume!r}: use resume=auto, or ckpt_path=<file> to resume a checkpoint")
    if ckpt_path is None and resume == "auto":
        found = newest_checkpoint(Path(output_dir))
        ckpt_path = str(found) if found else None
    if ckpt_path is None:
        return None, Path(output_dir)
    path = Path(str(ckpt_path)).expanduser().resolve()
    if not path.is_file() and not checkpoint.is_sharded(path):
        raise CheckpointError(f"ckpt_path={ckpt_path}: no such file")
    info = checkpoint.info(path)  # the step, config and tokenizer only; Lightning reads the weights
    return info, path.parent.parent if path.parent.name == "checkpoints" else Path(output_dir)


def describe_vocab(state: dict[str, Any] | None) -> str:
    state = state or {}
    if state.get("kind") == "char":
        return f"char, {len(state.get('chars', ''))} characters"
    if state.get("kind") == "word":
        return f"word, {len(state.get('words', [])) + 2} words"
    if state.get("kind") == "bpe":
        return f"bpe, encoding {state.get('encoding')}"
    return f"{state.get('kind')} tokenizer"


def check_tokenizer(info: checkpoint.Info, tokenizer: dict[str, Any]) -> None:
    """Refuse a resume whose data has another vocabulary than the checkpoint's (a finished run too: the
    metric it reports belongs to its own data)."""
    if info.tokenizer is not None and info.tokenizer != tokenizer:
        raise CheckpointError(
            f"ckpt_path={info.path} was trained with a different vocabulary ({describe_vocab(info.tokenizer)}) "
            f"than data gives now ({describe_vocab(tokenizer)}); resume with the data config the run was started with"
        )


def check_compatible(info: checkpoint.Info, model_cfg: dict[str, Any], tokenizer: dict[str, Any]) -> None:
    """Refuse a resume whose model shape or vocabulary differs from the checkpoint's, naming the keys."""
    from gptlab.models import build_model

    check_tokenizer(info, tokenizer)
    saved = {k: v for k, v in info.model.items() if k not in _FREE_KEYS}
    now = {k: v for k, v in model_cfg.items() if k not in _FREE_KEYS}
    differing = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if not differing:
        return
    with torch.device("meta"):  # shapes only, no memory
        try:
            mismatch = checkpoint.state_mismatch(build_model(now).state_dict(), build_model(saved).state_dict())
        except Exception:
            mismatch = "the checkpoint's model cannot be built with this gptlab"
    if mismatch:
        pairs = ", ".join(f"model.{k}={now.get(k)!r} (checkpoint: {saved.get(k)!r})" for k in differing)
        raise CheckpointError(
            f"ckpt_path={info.path} has a different model: {pairs}; resume with the model config the run was "
            f"started with"
        )


def check_strategy(info: checkpoint.Info, trainer_cfg: dict[str, Any], train: bool) -> None:
    """A sharded checkpoint resumes under a model-parallel trainer only (on any number of processes its
    mesh allows); a single file under the others; a consolidated file holds no optimizer state."""
    from gptlab.training.parallel import TARGET

    model_parallel = (trainer_cfg.get("strategy") or {}).get("_target_") == TARGET
    if info.sharded and not model_parallel:
        raise CheckpointError(
            f"ckpt_path={info.path} is a sharded checkpoint: resume it with trainer=fsdp2 or trainer=tp (any number "
            f"of devices), or make it one file for this trainer with `{checkpoint.consolidate_hint(info.path)}`"
        )
    if not train:
        return
    if info.consolidated_from:
        raise CheckpointError(
            f"ckpt_path={info.path} holds weights only (consolidated from {info.consolidated_from}): resume that "
            f"sharded checkpoint, or start from these weights with model.init_from={info.path}"
        )
    if model_parallel and not info.sharded:
        raise CheckpointError(
            f"ckpt_path={info.path} is a single-file checkpoint; trainer=fsdp2/tp resume their own sharded ones. "
            f"Resume it with the trainer that wrote it, or start from its weights with model.init_from={info.path}"
        )


def finished(info: checkpoint.Info, max_steps: int | None, max_time: Any = None) -> bool:
    """A run resumed after its last step or the last second of its trainer.max_time (e.g. a requeued job
    that had completed) has nothing to do."""
    if max_steps is not None and max_steps >= 0 and info.step >= max_steps:
        return True
    budget = budget_seconds(max_time)
    return budget is not None and info.trained_s is not None and info.trained_s >= budget
