"""Sweep reports: `python -m gptlab.report <sweep dir | run dir | outputs dir>`.

For each group of runs (a sweep directory; outputs/train/runs/; a single run given on its own) it
prints a table of the jobs sorted by the optimised metric (best first) and writes report.md,
report.csv and val_loss.png into that directory, plus optuna_history.png and optuna_importance.png
for an Optuna sweep; for a sweep over seeds the statistics of its groups (gptlab.report.groups:
groups.csv, groups_*.png, a section of report.md); for an isoFLOP sweep its scaling laws
(gptlab.report.scaling: scaling.csv, isoflop.png, frontier.png, a section of report.md). It reads only what the runs wrote (TensorBoard event files or CSV-logger
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
from gptlab.report import groups_write, scaling, scaling_write
from gptlab.report.groups import GroupReport, analyse, has_seeds
from gptlab.report.scaling import ScalingFit
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
    seeds: GroupReport | None = None  # the statistics of the groups of jobs that differ only by seed
    scaling: ScalingFit | None = None  # an isoFLOP sweep's scaling laws

    @property
    def table(self) -> str:
        out = text_table(self.jobs) + (f"\n\n{groups_write.text(self.seeds)}" if self.seeds else "")
        return out + (f"\n\n{scaling_write.text(self.scaling)}" if self.scaling else "")


def read_report(group: str | os.PathLike, metrics: list[str] | None = None, baseline: str | None = None) -> Report:
    """The report of one group of runs (see find_groups), nothing written. Where its jobs differ by seed
    (or `metrics` or `baseline` are given) the groups' statistics too (gptlab.report.groups): `metrics`
    the chosen ones beside val/loss and val/bpb, `baseline` the group to compare with."""
    group = Path(group)
    jobs = [read_job(run) for run in group_runs(group)]
    name_jobs(jobs)
    sweeper, _, _ = sweep_settings(group, [j.path for j in jobs])
    jobs = sort_jobs(jobs, str(sweeper.get("direction") or direction(jobs[0].metric if jobs else None)))
    rep = Report(group, jobs)
    if metrics or baseline or has_seeds(jobs):
        rep.seeds = analyse(jobs, metrics, baseline)
    points = scaling.points_of(jobs)
    if scaling.is_isoflop(points):
        rep.scaling = scaling.fit(points)
    return rep


def write_report(rep: Report) -> Report:
    """report.md, report.csv and the plots (and groups.csv) into the group's directory."""
    group, jobs = rep.group, rep.jobs
    images, sections, extra = [], [], []
    if plot_val_loss(group / "val_loss.png", jobs, f"{len(jobs)} jobs of {group.name}"):
        images.append(group / "val_loss.png")
    else:
        rep.notes.append("no val/loss logged yet: no val_loss.png")
    metric = jobs[0].metric if jobs else "val/loss"
    if metric != "val/loss":  # an optimised metric of its own (e.g. eval/hellaswag/acc_norm): its curve too
        picture = group / (metric.replace("/", "_") + ".png")
        if plot_val_loss(picture, jobs, f"{len(jobs)} jobs of {group.name}", metric):
            images.append(picture)
    if rep.seeds:
        plots = [p for p, draw in ((group / "groups_val_loss.png", groups_write.plot_curves),
                                   (group / groups_write.plot_name(rep.seeds.primary), groups_write.plot_dots))
                 if draw(p, rep.seeds)]
        sections = groups_write.markdown(rep.seeds, plots)
        groups_write.write_csv(group / "groups.csv", rep.seeds)
        extra += [group / "groups.csv", *plots]
    if rep.scaling:
        plots = [group / "isoflop.png", group / "frontier.png"]
        scaling_write.plot_isoflop(plots[0], rep.scaling)
        scaling_write.plot_frontier(plots[1], rep.scaling)
        scaling_write.write_csv(group / "scaling.csv", rep.scaling)
        sections += scaling_write.markdown(rep.scaling, plots)
        extra += [group / "scaling.csv", *plots]
    study, notes = load_study(group, jobs)
    rep.notes += notes
    if study is not None:
        plots, notes = plot_study(study, group)
        images += plots
        rep.notes += notes
    write_csv(group / "report.csv", jobs, {j.path: g.name for g in rep.seeds.groups for j in g.jobs} if rep.seeds else None)
    with atomic_write(group / "report.md", "w") as f:
        f.write(markdown(group, jobs, images, rep.notes, sections))
    rep.files = [group / "report.md", group / "report.csv", *images, *extra]
    return rep


def build_report(group: str | os.PathLike, write: bool = True, metrics: list[str] | None = None,
                 baseline: str | None = None) -> Report:
    rep = read_report(group, metrics, baseline)
    return write_report(rep) if write else rep


def report(path: str | os.PathLike, write: bool = True, metrics: list[str] | None = None,
           baseline: str | None = None) -> list[Report]:
    """A report for every group of runs at or under `path`; all are read (and any bad --baseline or
    --metric refused) before any is written."""
    reps = [read_report(group, metrics, baseline) for group in find_groups(path)]
    return [write_report(rep) for rep in reps] if write else reps


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
