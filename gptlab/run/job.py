"""One job's life under Hydra: report a failure as one line, leave no debris, and in a multirun
record the outcome in the job's directory and let the sweep go on.

Each job directory ends with a marker: `DONE` (JSON: metric, value, steps, seconds, checkpoints and,
with a compute budget, `budget`), `PRUNED` (the same JSON, for an Optuna trial its study's pruner
stopped early) or `FAILED` (the error on the first line, then the traceback). `gptlab.report`, the
sweep tally and the Optuna sweeper read them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gptlab.errors import one_line, user_error
from gptlab.files import atomic_write, write_json

DONE, FAILED, PRUNED = "DONE", "FAILED", "PRUNED"


@dataclass
class Outcome:
    """What a finished training job reports (train.py's `fit`)."""

    metric: str
    value: float
    steps: int
    run_dir: Path
    best_ckpt: str | None = None
    last_ckpt: str | None = None
    seconds: float | None = None  # training time
    tokens: int | None = None  # tokens trained on
    rank_zero: bool = True
    trained: bool = True  # False: a finished run resumed (a requeue), nothing was done
    pruned: bool = False  # an Optuna trial stopped early by its study's pruner
    spikes: list[dict[str, Any]] | None = None  # the spike guard's events (gptlab.training.spikes)
    budget: dict | None = None  # a compute budget's plan and spend (gptlab.training.budget.Spend.record)


def multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def job_number() -> int | None:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    trial = (HydraConfig.get().get("sweeper") or {}).get("trial")  # an Optuna job is numbered by its trial
    return trial if trial is not None else HydraConfig.get().job.get("num")


def only_bookkeeping(directory: Path) -> bool:
    """True if `directory` holds nothing but what Hydra writes at start (.hydra/, *.log)."""
    return directory.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in directory.iterdir())


def remove_debris(directory: Path) -> None:
    logging.shutdown()  # close train.log before removing it
    shutil.rmtree(directory, ignore_errors=True)


def run(fn: Callable[[], Outcome | Any], run_dir: str | Path | None, on_failure: Callable[[], None] | None = None):
    """Run `fn`. A single run: a GptlabError becomes `Error: ...` on stderr and exit status 1, other
    exceptions propagate (a bug's traceback); if the run wrote nothing of its own, its directory goes.
    A multirun job: any exception is written to `<job dir>/FAILED`, and the job returns None, which the
    basic sweeper records and the Optuna sweeper marks as a failed trial; the sweep goes on.
    HYDRA_FULL_ERROR=1 lets every exception through with its traceback."""
    run_dir = Path(run_dir) if run_dir is not None else None
    fresh = run_dir is not None and only_bookkeeping(run_dir)
    started = time.perf_counter()
    try:
        outcome = fn()
    except Exception as e:
        if on_failure is not None:
            on_failure()
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if multirun() and run_dir is not None:
            mark_failed(run_dir, one_line(e) + "\n\n" + traceback.format_exc())
            print(f"[gptlab] job #{job_number()} failed: {one_line(e)} ({run_dir})", file=sys.stderr)
            return None
        if fresh and only_bookkeeping(run_dir):
            remove_debris(run_dir)
        if user_error(e) is None:
            raise
        print(f"Error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(1) from None
    if isinstance(outcome, Outcome):
        if outcome.rank_zero and (outcome.trained or not (outcome.run_dir / DONE).exists()):  # keep the real run's
            mark_done(outcome.run_dir, outcome.metric, outcome.value, outcome.steps,
                      round(time.perf_counter() - started, 3), best_ckpt=outcome.best_ckpt, last_ckpt=outcome.last_ckpt,
                      marker=PRUNED if outcome.pruned else DONE,
                      **({"spikes": outcome.spikes} if outcome.spikes is not None else {}),
                      **({"budget": outcome.budget} if outcome.budget else {}))
        if run_dir is not None and run_dir.resolve() != outcome.run_dir.resolve() and only_bookkeeping(run_dir):
            _move_bookkeeping(run_dir, outcome.run_dir)
        return outcome.value
    return outcome


def _move_bookkeeping(hydra_dir: Path, real_run: Path) -> None:
    """A resumed checkpoint continued in its own run directory: keep the resumed command's config and log
    there (`.hydra/resumed-<time>/`) instead of leaving a directory that holds nothing else."""
    dest = real_run / ".hydra" / f"resumed-{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    dest.mkdir(parents=True, exist_ok=True)
    logging.shutdown()
    for p in hydra_dir.iterdir():
        for item in (p.iterdir() if p.name == ".hydra" else [p]):
            shutil.move(str(item), dest / item.name)
    shutil.rmtree(hydra_dir, ignore_errors=True)


def mark_done(run_dir: str | Path, metric: str, value: float, steps: int, seconds: float, marker: str = DONE,
              **extra: Any) -> None:
    """`marker`: DONE, or PRUNED for a trial stopped by its pruner (`steps`: where it stopped)."""
    write_json(Path(run_dir) / marker, {"metric": metric, "value": value, "steps": steps, "seconds": seconds, **extra})


def mark_failed(run_dir: str | Path, message: str) -> None:
    """`message`: the error's one line first; a traceback may follow."""
    with atomic_write(Path(run_dir) / FAILED, "w") as f:
        f.write(message.rstrip("\n") + "\n")


def read_marker(job_dir: Path) -> tuple[str, dict[str, Any] | str | None]:
    """(`finished` | `pruned` | `failed` | `running`, DONE's or PRUNED's JSON, or FAILED's first line)."""
    try:
        lines = (job_dir / FAILED).read_text(errors="replace").splitlines()
        return "failed", lines[0].strip() if lines else ""
    except OSError:
        pass
    for marker, status in ((PRUNED, "pruned"), (DONE, "finished")):
        try:
            return status, json.loads((job_dir / marker).read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError):  # an unreadable marker: the run did end so
            return status, None
    return "running", None


def read_yaml(path: Path) -> Any:
    """A YAML file of a job directory (Hydra's `.hydra/*.yaml`, a sweep's multirun.yaml); None if it is
    missing or unreadable. libyaml's safe loader where PyYAML has it: ~10x faster on Hydra's long
    hydra.yaml of every job, which a sweep's report reads."""
    try:
        return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (OSError, yaml.YAMLError):
        return None
