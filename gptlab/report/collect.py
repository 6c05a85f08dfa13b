"""What a report knows about each run: where runs are, their status markers, their logged curves and
a readable name, all read from what the runs wrote (so it works on a sweep that is still running).

A *run* (or job) is a directory with `.hydra/config.yaml` (Hydra writes it when the run starts).
A *group* is what one report covers: a directory whose subdirectories are runs (a multirun's sweep
directory, or `outputs/train/runs/`), or a single run directory given on its own.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptlab.errors import ConfigError
from gptlab.run.naming import run_name
# the DONE / FAILED markers at the top of a run directory belong to gptlab.run.job, which writes them
from gptlab.run.job import DONE, FAILED, PRUNED, mark_done, mark_failed, read_marker, read_yaml  # noqa: F401  (re-exported for gptlab.report)

Curve = list[tuple[int, float]]


def is_run(path: Path) -> bool:
    return (path / ".hydra" / "config.yaml").is_file()


def natural(name: str) -> tuple:
    # job 10 after job 9
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def find_groups(path: str | os.PathLike) -> list[Path]:
    """The directories to report under `path`: `path` itself when it is a run or holds runs, else
    every directory below it that holds runs (each sweep of an outputs directory, and its runs/)."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: no such directory")
    if is_run(path):
        return [path]
    groups = []
    for dirpath, dirnames, _ in os.walk(path):
        here = Path(dirpath)
        runs = {n for n in dirnames if is_run(here / n)}
        if runs:
            groups.append(here)
        # not into runs (checkpoints, logs) nor hidden directories (.hydra)
        dirnames[:] = sorted((n for n in dirnames if n not in runs and not n.startswith(".")), key=natural)
    if not groups:
        raise ConfigError(f"no runs under {path} (a run directory holds .hydra/config.yaml, written by train.py)")
    return groups


def group_runs(group: Path) -> list[Path]:
    if is_run(group):
        return [group]
    return sorted((p for p in group.iterdir() if p.is_dir() and is_run(p)), key=lambda p: natural(p.name))


def _status(run: Path) -> tuple[str, str, dict[str, Any]]:
    """(finished / pruned / failed / running, failure message, DONE's or PRUNED's content)."""
    status, content = read_marker(run)
    if status == "failed":
        return status, str(content or ""), {}
    return status, "", content if isinstance(content, dict) else {}


def _tensorboard_curves(directory: Path) -> dict[str, Curve]:
    import logging

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # not a line per event file it moves to
    ea = EventAccumulator(str(directory), size_guidance={"scalars": 0})  # 0: keep every point
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def _csv_curves(path: Path) -> dict[str, Curve]:
    out: dict[str, Curve] = {}
    try:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    step = int(float(row.get("step") or ""))
                except ValueError:
                    continue  # a line being written
                for key, value in row.items():
                    if key in ("step", "epoch") or not key or value in (None, ""):
                        continue
                    try:
                        out.setdefault(key, []).append((step, float(value)))
                    except ValueError:
                        pass
    except OSError:
        pass
    return out


def read_curves(run: Path) -> dict[str, Curve]:
    """Every scalar the run logged, by logged step: from its TensorBoard event files, else from the
    CSV logger's metrics.csv files (one per resumed version, in order)."""
    parts: list[dict[str, Curve]] = []
    tb = run / "tensorboard"
    if tb.is_dir():
        dirs = sorted({p.parent for p in tb.rglob("events.out.tfevents.*")})
        parts = [_tensorboard_curves(d) for d in dirs]
    if not parts and (run / "csv").is_dir():
        parts = [_csv_curves(p) for p in sorted((run / "csv").rglob("metrics.csv"), key=lambda p: natural(str(p)))]
    merged: dict[str, dict[int, float]] = {}
    for part in parts:
        for tag, points in part.items():
            merged.setdefault(tag, {}).update(points)  # a later file wins a step logged twice
    return {tag: sorted(points.items()) for tag, points in merged.items()}


def _last(curve: Curve | None) -> float | None:
    return curve[-1][1] if curve else None


# what a run writes as it goes (not a report written into its directory later)
_PROGRESS = ("tensorboard/**/*", "csv/**/*", "checkpoints/*", "*.log", FAILED, PRUNED)


def _seconds(run: Path) -> float | None:
    """From the start (Hydra's .hydra/config.yaml) to the newest file the run wrote."""
    try:
        start = (run / ".hydra" / "config.yaml").stat().st_mtime
        newest = max((p.stat().st_mtime for g in _PROGRESS for p in run.glob(g) if p.is_file()), default=start)
    except OSError:
        return None
    return max(0.0, newest - start)


@dataclass
class Job:
    path: Path
    overrides: list[str]
    experiment: str | None
    status: str  # finished / pruned / failed / running
    reason: str  # the failure message
    metric: str  # the optimised metric
    value: float | None  # its final value (DONE's, else the last logged)
    steps: int | None
    tokens: float | None
    seconds: float | None
    val_curve: Curve = field(default_factory=list)  # val/loss by optimizer step
    sources: dict[str, float] = field(default_factory=dict)  # a mixture's final val/loss/<source>
    name: str = ""
    curves: dict[str, Curve] = field(default_factory=dict)  # every logged scalar, by optimizer step
    budget: dict[str, Any] = field(default_factory=dict)  # DONE's compute budget (gptlab.training.budget)

    @property
    def metric_curve(self) -> Curve:
        """The optimised metric by optimizer step."""
        return self.curves.get(self.metric, [])

    @property
    def best_val(self) -> float | None:
        finite = [v for _, v in self.val_curve if math.isfinite(v)]
        return min(finite) if finite else None

    @property
    def final_val(self) -> float | None:
        return _last(self.val_curve)

    def final(self, tag: str) -> float | None:
        return _last(self.curves.get(tag))

    def best(self, tag: str) -> float | None:
        """The lowest finite value logged (losses, bits per byte, perplexities: lower is better)."""
        finite = [v for _, v in self.curves.get(tag, []) if math.isfinite(v)]
        return min(finite) if finite else None


def read_job(run: Path) -> Job:
    config = read_yaml(run / ".hydra" / "config.yaml") or {}
    hydra = (read_yaml(run / ".hydra" / "hydra.yaml") or {}).get("hydra", {})
    status, reason, done = _status(run)
    curves = read_curves(run)
    metric = done.get("metric") or config.get("optimized_metric") or "val/loss"
    value = done.get("value") if done.get("value") is not None else _last(curves.get(metric))
    # Lightning logs a step's metrics under global_step - 1: step s + 1 is the (s + 1)-th optimizer step
    logged = [c[-1][0] for tag in ("train/loss", "train/tokens", "val/loss") if (c := curves.get(tag))]
    steps = done.get("steps") if done.get("steps") is not None else (max(logged) + 1 if logged else None)
    return Job(
        path=run,
        overrides=[str(o) for o in (read_yaml(run / ".hydra" / "overrides.yaml") or [])],
        experiment=((hydra.get("runtime") or {}).get("choices") or {}).get("experiment"),
        status=status,
        reason=reason,
        metric=metric,
        value=None if value is None else float(value),
        steps=None if steps is None else int(steps),
        tokens=_last(curves.get("train/tokens")),
        seconds=done.get("seconds") if done.get("seconds") is not None else _seconds(run),
        val_curve=[(s + 1, v) for s, v in curves.get("val/loss", [])],
        sources={tag: c[-1][1] for tag, c in curves.items() if tag.startswith("val/loss/") and c},
        curves={tag: [(s + 1, v) for s, v in points] for tag, points in curves.items()},
        budget=done.get("budget") or {},
    )


def name_jobs(jobs: list[Job]) -> None:
    """Each job's overrides minus those every job of the group shares, or its experiment's name."""
    common = set.intersection(*(set(j.overrides) for j in jobs)) if jobs else set()
    for job in jobs:
        job.name = run_name(job.overrides, common, job.experiment or job.path.name)
    counts = Counter(j.name for j in jobs)
    for job in jobs:
        if counts[job.name] > 1:
            job.name = f"{job.name} ({job.path.name})"


def sort_jobs(jobs: list[Job], direction: str = "minimize") -> list[Job]:
    """Best first by the optimised metric; then jobs without a finite value, then pruned trials (their
    value is from where they stopped), then failed jobs."""
    sign = -1.0 if direction == "maximize" else 1.0

    def key(job: Job) -> tuple:
        ok = job.value is not None and math.isfinite(job.value)
        return (job.status == "failed", job.status == "pruned", not ok, sign * job.value if ok else 0.0,
                natural(job.path.name))

    return sorted(jobs, key=key)
