"""Glue shared by train.py and sample.py: user-facing errors, resume, hyperparameter logging,
and the Hydra multirun + DDP relaunch fix."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from gptlab.errors import CheckpointError, GptlabError


def _user_error(exc: BaseException) -> GptlabError | None:
    """The GptlabError behind `exc`, looking through Hydra's InstantiationException wrapping."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, GptlabError):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def _only_bookkeeping(directory: Path) -> bool:
    """True if `directory` holds nothing but what Hydra writes at start (.hydra/, *.log)."""
    return directory.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in directory.iterdir())


@contextlib.contextmanager
def user_errors(run_dir: str | Path | None = None) -> Iterator[None]:
    """Report a GptlabError as one line on stderr and exit 1; HYDRA_FULL_ERROR=1 shows the traceback.

    `run_dir`: the directory Hydra made for this run; if the run fails before writing anything of its
    own there (no checkpoint, no logs), it is removed, so a mistyped command leaves no debris.
    """
    fresh = run_dir is not None and _only_bookkeeping(Path(run_dir))
    try:
        yield
    except Exception as e:
        err = _user_error(e)
        if err is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if fresh and _only_bookkeeping(Path(run_dir)):
            import logging
            import shutil

            logging.shutdown()  # close train.log before removing it
            shutil.rmtree(run_dir, ignore_errors=True)
        print(f"Error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


class OutputDirCheck(Callback):
    """Hydra callback: fail with one clear line if the run/sweep directory cannot be created,
    before Hydra itself tries (which would end in a traceback)."""

    def _check(self, directory: str, key: str) -> None:
        try:
            Path(directory).mkdir(parents=True, exist_ok=True)
            probe = Path(directory) / f".gptlab-write-test-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as e:
            print(f"Error: cannot write the output directory {directory} ({e.strerror}); "
                  f"set {key}=<writable dir> or paths.log_dir=<writable dir>", file=sys.stderr)
            raise SystemExit(1) from None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")


def newest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = [p for p in (Path(run_dir) / "checkpoints").glob("*.ckpt") if p.is_file()]
    return max(ckpts, key=lambda p: p.stat().st_mtime_ns) if ckpts else None


def describe_vocab(state: dict[str, Any]) -> str:
    if state.get("kind") == "char":
        return f"{len(state.get('chars', ''))} characters"
    if state.get("kind") == "word":
        return f"{len(state.get('words', [])) + 2} words"
    return f"encoding {state.get('encoding')}"


def resolve_resume(cfg: DictConfig) -> tuple[str | None, int, dict[str, Any] | None]:
    """The checkpoint to resume from, its global step (0 when starting fresh) and tokenizer state.

    `ckpt_path=<run>/checkpoints/x.ckpt` resumes that checkpoint *in its own run directory*, so the
    TensorBoard run and the checkpoints continue where they were. `resume=auto` picks the newest
    checkpoint under `paths.output_dir` (give the run with `hydra.run.dir=<run>`), or starts fresh.
    """
    ckpt_path = cfg.get("ckpt_path")
    if cfg.get("resume") not in (None, "auto"):
        raise GptlabError(f"resume={cfg.resume!r}: use resume=auto, or ckpt_path=<file> to resume a checkpoint")
    if ckpt_path is None and cfg.get("resume") == "auto":
        found = newest_checkpoint(Path(cfg.paths.output_dir))
        ckpt_path = str(found) if found else None
    if ckpt_path is None:
        return None, 0, None
    path = Path(ckpt_path).expanduser().resolve()
    if not path.is_file():
        raise CheckpointError(f"ckpt_path={ckpt_path}: no such file")
    from gptlab import checkpoint

    meta = checkpoint.info(path)  # only the step and tokenizer; Lightning reads the weights
    step, tokenizer = meta.step, meta.tokenizer
    if path.parent.name == "checkpoints":
        with open_dict(cfg):
            cfg.paths.output_dir = str(path.parent.parent)
    return str(path), step, tokenizer


def flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The run's config as flat scalar hyperparameters for TensorBoard's HPARAMS tab."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if not str(k).startswith("_"):
                    walk(v, f"{prefix}{k}/" if prefix or k else "")
        elif isinstance(node, (int, float, str, bool)) or node is None:
            out[prefix.rstrip("/")] = "null" if node is None else node
        else:
            out[prefix.rstrip("/")] = str(node)

    container = OmegaConf.to_container(cfg, resolve=True)
    for group in ("model", "optim", "data", "trainer"):
        walk(container.get(group, {}), f"{group}/")
    out["seed"] = container.get("seed")
    return out


def install_multirun_ddp_fix(script: Path) -> None:
    """Make Lightning's DDP re-launch work inside a Hydra multirun.

    Lightning starts ranks 1..N-1 by re-running the script with the original command line plus
    `hydra.run.dir=...`. In a multirun that command line is the whole sweep (`-m a=1,2`), so every
    rank would start a sweep of its own. Instead, start each rank on the one job's saved config.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from lightning.pytorch.strategies.launchers import subprocess_script

    original = getattr(subprocess_script._hydra_subprocess_cmd, "__wrapped__", subprocess_script._hydra_subprocess_cmd)

    def command(local_rank: int):
        hc = HydraConfig.get()
        saved = Path(hc.runtime.output_dir) / str(hc.output_subdir) / "config.yaml"
        if hc.mode != RunMode.MULTIRUN or hc.output_subdir is None or not saved.is_file():
            return original(local_rank)
        cmd = [
            sys.executable,
            str(script),
            "-cp",
            str(saved.parent),
            "-cn",
            "config",
            f'hydra.run.dir="{hc.runtime.output_dir}"',
            "hydra.output_subdir=null",
            f"hydra.job.name={hc.job.name}_rank{local_rank}",
        ]
        return cmd, hc.runtime.cwd

    command.__wrapped__ = original
    subprocess_script._hydra_subprocess_cmd = command


# what Lightning's subprocess launcher sets in the launching process's environment
_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextlib.contextmanager
def distributed_job() -> Iterator[None]:
    """Leave no distributed state behind a job that launched its own DDP ranks.

    A Hydra multirun runs its jobs one after another in one process. Lightning's launcher leaves the
    process group and the rank variables (LOCAL_RANK, MASTER_PORT, ...) of job 1 behind, so job 2
    would take itself for an externally launched rank and wait for peers that have exited. Processes
    started by torchrun or SLURM keep their process group: every rank runs the same jobs and reuses it.
    """
    saved = {k: os.environ.get(k) for k in _DDP_ENV}
    try:
        yield
    finally:
        # the launcher sets LOCAL_RANK in the process that starts the other ranks
        if saved["LOCAL_RANK"] is None and "LOCAL_RANK" in os.environ:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise GptlabError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
