"""Sweep reports: `python -m gptlab.report <sweep dir | run dir | outputs dir>`.

For each group of runs (a sweep directory; outputs/train/runs/; a single run given on its own) it
prints a table of the jobs sorted by the optimised metric (best first) and writes report.md,
report.csv and val_loss.png into that directory, plus optuna_history.png and optuna_importance.png
for an Optuna sweep. It reads only what the runs wrote (TensorBoard event files or CSV-logger
metrics, Hydra's .hydra/ files, the DONE / FAILED markers), so it works while a sweep is running.
Given an outputs directory, every group found under it gets its own report.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig

from gptlab.errors import GptlabError
from gptlab.files import atomic_write
from gptlab.report.collect import (DONE, FAILED, Job, find_groups, group_runs, mark_done, mark_failed, name_jobs,
                                read_job, sort_jobs)
from gptlab.run.naming import direction, sweep_name
from gptlab.report.study import load_study, plot_study, sweep_settings
from gptlab.report.write import markdown, plot_val_loss, text_table, write_csv

__all__ = ["DONE", "FAILED", "Job", "Report", "SweepReport", "build_report", "report", "mark_done", "mark_failed",
           "sweep_name"]


@dataclass
class Report:
    group: Path
    jobs: list[Job]  # best first
    files: list[Path] = field(default_factory=list)  # what was written
    notes: list[str] = field(default_factory=list)

    @property
    def table(self) -> str:
        return text_table(self.jobs)


def build_report(group: str | os.PathLike, write: bool = True) -> Report:
    """The report of one group of runs (see find_groups), written into that directory."""
    group = Path(group)
    jobs = [read_job(run) for run in group_runs(group)]
    name_jobs(jobs)
    sweeper, _, _ = sweep_settings(group, [j.path for j in jobs])
    jobs = sort_jobs(jobs, str(sweeper.get("direction") or direction(jobs[0].metric if jobs else None)))
    rep = Report(group, jobs)
    if not write:
        return rep
    images = []
    if plot_val_loss(group / "val_loss.png", jobs, f"{len(jobs)} jobs of {group.name}"):
        images.append(group / "val_loss.png")
    else:
        rep.notes.append("no val/loss logged yet: no val_loss.png")
    metric = jobs[0].metric if jobs else "val/loss"
    if metric != "val/loss":  # an optimised metric of its own (e.g. eval/hellaswag/acc_norm): its curve too
        picture = group / (metric.replace("/", "_") + ".png")
        if plot_val_loss(picture, jobs, f"{len(jobs)} jobs of {group.name}", metric):
            images.append(picture)
    study, notes = load_study(group, jobs)
    rep.notes += notes
    if study is not None:
        plots, notes = plot_study(study, group)
        images += plots
        rep.notes += notes
    write_csv(group / "report.csv", jobs)
    with atomic_write(group / "report.md", "w") as f:
        f.write(markdown(group, jobs, images, rep.notes))
    rep.files = [group / "report.md", group / "report.csv", *images]
    return rep


def report(path: str | os.PathLike, write: bool = True) -> list[Report]:
    """A report for every group of runs at or under `path`."""
    return [build_report(group, write) for group in find_groups(path)]


class SweepReport(HydraCallback):
    """Hydra callback: at the end of a multirun, write the sweep's report and print its table.
    Enable it with `hydra.callbacks.report._target_=gptlab.report.SweepReport` (conf/hydra/default.yaml)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            reports = report(sweep_dir)
        except GptlabError as e:  # e.g. every job failed before Hydra wrote its config
            print(f"[gptlab] no sweep report: {e}")
            return
        for rep in reports:
            print(f"[gptlab] sweep report {rep.group / 'report.md'} (python -m gptlab.report {rep.group}):")
            print(rep.table)
