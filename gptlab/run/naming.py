"""The one rule that names a run from its overrides, for the trackers (TensorBoard, W&B, MLflow), the
console and the sweep report: its command-line overrides minus those it shares with the rest of its
sweep and minus those that say where it goes or how it is watched, sampled numbers shortened; else a
fallback (its experiment's name). A single run shares nothing: its name is its overrides, or its
experiment's name when it has none; a job of a sweep is named by the overrides that vary (`optim.lr=3e-3`)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from gptlab.run.job import multirun, read_yaml

# overrides that say where a run goes or how it is watched, not what it trains
NOISE = ("hydra", "paths", "log_dir", "data_dir", "ckpt_path", "resume", "logger", "callbacks", "data.path")


def direction(metric: str | None) -> str:
    """Which way a sweep optimises `metric`: `maximize` for a downstream accuracy (eval/<task>/acc,
    eval/<task>/acc_norm), `minimize` for everything else (losses, perplexities)."""
    name = str(metric or "")
    return "maximize" if name.startswith("eval/") and name.rsplit("/", 1)[-1].startswith("acc") else "minimize"


def key_of(override: str) -> str:
    """`model.pos` of `model.pos=rope`, `+x=1` or `~x`."""
    return override.split("=", 1)[0].lstrip("~+")


def command_line_keys() -> set[str]:
    """The keys this job's command line set (Hydra's task overrides); none outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    return {key_of(o) for o in HydraConfig.get().overrides.task} if HydraConfig.initialized() else set()


def is_noise(override: str) -> bool:
    key = key_of(override)
    return any(key == n or key.startswith(n + ".") or key.startswith(n + "/") for n in NOISE)


def short(override: str) -> str:
    """`optim.lr=0.00024373700083914676` as `optim.lr=0.0002437` (a sampled value's digits)."""
    key, sep, value = override.partition("=")
    try:
        number = float(value)
    except ValueError:
        return override
    return f"{key}={number:.4g}" if sep and len(value) > 8 and not value.isdigit() else override


def distinct(overrides: Iterable[str], shared: Iterable[str] = ()) -> list[str]:
    """`overrides` minus `shared` and the noise: what tells a run from the rest of its sweep."""
    shared = set(shared)
    return [o for o in overrides if o not in shared and not is_noise(o)]


def run_name(overrides: Iterable[str], shared: Iterable[str] = (), fallback: str = "") -> str:
    """`overrides` minus `shared` and the noise, joined by commas; `fallback` when nothing is left."""
    return ",".join(short(o) for o in distinct(overrides, shared)) or fallback


def job_overrides(run_dir: str | os.PathLike) -> list[str]:
    """The overrides a job directory was started with (`.hydra/overrides.yaml`)."""
    return [str(o) for o in (read_yaml(Path(run_dir) / ".hydra" / "overrides.yaml") or [])]


def launch_overrides(sweep_dir: str | os.PathLike) -> list[str]:
    """The overrides on a sweep's command line, from its multirun.yaml (written before its first job).
    Those given verbatim there (its fixed ones; swept ones were lists or ranges there) are shared by every job."""
    launch = ((read_yaml(Path(sweep_dir) / "multirun.yaml") or {}).get("hydra") or {}).get("overrides") or {}
    return [str(o) for o in launch.get("task") or []]


def sweep_name(run_dir: str | os.PathLike) -> str:
    """A running job's name without the rest of its sweep (the sweep directory holds the job's)."""
    run_dir = Path(run_dir)
    return run_name(job_overrides(run_dir), launch_overrides(run_dir.parent), run_dir.name)


def link_in_sweep_view(log_dir: Path, name: str) -> None:
    """In a multirun, `<sweep dir>/tensorboard/<name>` links to this job's event files, so that
    `tensorboard --logdir <sweep dir>/tensorboard` lists each job by what varies (its own directory is
    named by its number). A name another job of the sweep took gets this job's number: `<name> (3)`."""
    from hydra.core.hydra_config import HydraConfig
    from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

    if not multirun() or rank_zero_only.rank != 0:
        return
    sweep, log_dir = Path(HydraConfig.get().sweep.dir).resolve(), log_dir.resolve()
    if not log_dir.is_relative_to(sweep):
        return  # event files outside the sweep directory (logger.tensorboard.save_dir set elsewhere)
    view, job = sweep / "tensorboard", log_dir.relative_to(sweep).parts[0]
    base = name.replace(os.sep, "_")[:200]
    for link in (view / base, view / f"{base} ({job})"):
        try:
            view.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() and link.resolve() == log_dir:
                return  # this job's, from before a resume
            link.symlink_to(os.path.relpath(log_dir, view))
            return
        except FileExistsError:
            continue
        except OSError as e:  # a filesystem without symlinks: the view is a convenience
            rank_zero_warn(f"no TensorBoard view of the sweep ({e})")
            return
