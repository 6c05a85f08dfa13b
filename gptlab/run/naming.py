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


def link_in_view(event_dir: Path, name: str, run_dir: Path, log_dir: str | os.PathLike, experiment: str) -> None:
    """TensorBoard's run list by this rule: links named after the run to its event files, which stay in
    its own directory (`<run>/tensorboard/`, where resume and the report read them).

    * a job of a multirun: `<sweep dir>/tensorboard/<name>`, so `tensorboard --logdir <sweep dir>/tensorboard`
      lists each job by what varies; a name another job took gets the job's number: `<name> (3)`;
    * a single run: `<log_dir>/tensorboard/<experiment>/<run dir's name>` (its start time by default),
      followed by its name where that is not the experiment's (`train/2026-12-03_10-00-00 optim.lr=3e-3`),
      so `tensorboard --logdir <log_dir>/tensorboard` lists every run under its experiment's name, in the
      order they started; a place another run took gets a count: `<date> (2)`.

    Rank 0 only. No link for event files outside the view's root (logger.tensorboard.save_dir or
    hydra.run.dir set elsewhere), nor where the view would hold them; a run that has a link keeps it (a
    resumed run, whose overrides and so its name may differ); without symlinks, a warning."""
    from hydra.core.hydra_config import HydraConfig
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank != 0:
        return
    root = Path(HydraConfig.get().sweep.dir if multirun() else log_dir).resolve()
    def cut(text: str, room: int) -> str:  # one directory name: at most 255 bytes, `room` of them for the rest
        return text.replace(os.sep, "_").encode()[:255 - room].decode(errors="ignore")

    view, event_dir = root / "tensorboard", event_dir.resolve()
    if not event_dir.is_relative_to(root) or event_dir.is_relative_to(view) or view.is_relative_to(event_dir):
        return
    if multirun():
        base = cut(name, len(f" ({run_dir.name})"))
        places = [base, f"{base} ({run_dir.name})"]
    else:
        here = run_dir.name if name == experiment else f"{run_dir.name} {cut(name, len(run_dir.name) + 6)}"
        task = experiment.replace(os.sep, "_")
        places = [f"{task}/{here}", *(f"{task}/{here} ({n})" for n in range(2, 10))]
    _link(view, places, event_dir)


def _link(view: Path, places: list[str], target: Path) -> None:
    """A relative link to `target` at the first free one of `places` (paths under `view`, all as deep),
    unless a link there already leads to `target`."""
    from lightning.pytorch.utilities import rank_zero_warn

    depth = "/".join(["*"] * len(Path(places[0]).parts))
    try:
        if view.is_dir() and any(link.is_symlink() and link.resolve() == target for link in view.glob(depth)):
            return  # this run's, from before a resume
        for place in places:
            link = view / place
            link.parent.mkdir(parents=True, exist_ok=True)
            try:
                link.symlink_to(os.path.relpath(target, link.parent))
                return
            except FileExistsError:
                continue
    except OSError as e:  # a filesystem without symlinks: the view is a convenience
        rank_zero_warn(f"no TensorBoard view of this run ({e})")
