"""A group's report as a text table (printed), report.md, report.csv and val_loss.png."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from gptlab.files import atomic_write
from gptlab.report.collect import Job

REASON_WIDTH = 60
LABEL_WIDTH = 60


def shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def fmt_float(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if math.isfinite(value) else str(value)


def fmt_count(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}"


def fmt_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    s = int(round(value))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def fmt_status(job: Job) -> str:
    if job.status == "pruned" and job.steps is not None:
        return f"pruned at step {job.steps}"
    if job.status != "failed" or not job.reason:
        return job.status
    return f"failed: {shorten(job.reason, REASON_WIDTH)}"


def source_tags(jobs: list[Job]) -> list[str]:
    """The val/loss/<source> of the mixtures among the jobs."""
    return sorted({tag for job in jobs for tag in job.sources})


def columns(jobs: list[Job]) -> list[str]:
    metric = jobs[0].metric if jobs else "val/loss"
    extra = [metric] if metric != "val/loss" else []
    return ["job", "name", "status", *extra, "best val/loss", "final val/loss", *source_tags(jobs), "steps", "tokens",
            "time"]


def rows(jobs: list[Job]) -> list[list[str]]:
    extra = (jobs[0].metric if jobs else "val/loss") != "val/loss"
    tags = source_tags(jobs)
    return [
        [job.path.name, job.name, fmt_status(job), *([fmt_float(job.value)] if extra else []),
         fmt_float(job.best_val), fmt_float(job.final_val), *(fmt_float(job.sources.get(t)) for t in tags),
         fmt_count(job.steps), fmt_count(job.tokens), fmt_seconds(job.seconds)]
        for job in jobs
    ]


def text_table(jobs: list[Job]) -> str:
    table = [columns(jobs), *rows(jobs)]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    numeric = {i for i, c in enumerate(table[0]) if c not in ("job", "name", "status")}
    lines = ["  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(group: Path, jobs: list[Job], images: list[Path], notes: list[str]) -> str:
    head = columns(jobs)
    counts = {s: sum(j.status == s for j in jobs) for s in ("finished", "failed", "running", "pruned")}
    pruned = f", {counts['pruned']} pruned" if counts["pruned"] else ""
    out = [f"# Report: {group}", "",
           f"{len(jobs)} jobs: {counts['finished']} finished, {counts['failed']} failed, {counts['running']} running"
           f"{pruned}; sorted by {jobs[0].metric if jobs else 'val/loss'} (best first).", "",
           "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows(jobs)]
    out.append("")
    out += [f"![{p.stem}]({p.name})\n" for p in images]
    out += [f"- {n}" for n in notes]
    return "\n".join(out).rstrip() + "\n"


def write_csv(path: Path, jobs: list[Job]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    metric = jobs[0].metric if jobs else "val/loss"
    tags = source_tags(jobs)
    writer.writerow(["job", "name", "status", "reason", "metric", "value", "best_val_loss", "final_val_loss",
                     "steps", "tokens", "seconds", "path", "overrides", *tags])
    for j in jobs:
        writer.writerow([j.path.name, j.name, j.status, j.reason, metric, j.value, j.best_val, j.final_val,
                         j.steps, j.tokens, None if j.seconds is None else round(j.seconds, 1), str(j.path),
                         " ".join(j.overrides), *(j.sources.get(t) for t in tags)])
    with atomic_write(path, "w") as f:
        f.write(buffer.getvalue())


def plot_val_loss(path: Path, jobs: list[Job], title: str, metric: str = "val/loss") -> bool:
    """Every job's validation curve (or the curve of its optimised `metric`) on one plot; False
    (nothing written) while none has one."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curve_of = (lambda j: j.val_curve) if metric == "val/loss" else (lambda j: j.metric_curve)
    curves = [j for j in jobs if curve_of(j)]
    if not curves:
        return False
    fig = Figure(figsize=(8, 5), dpi=90)
    FigureCanvasAgg(fig)  # a figure of its own, without pyplot's global state or GUI backends
    ax = fig.add_subplot()
    for job in curves:
        steps, values = zip(*curve_of(job))
        label = shorten(job.name, LABEL_WIDTH) + (f" ({job.status})" if job.status != "finished" else "")
        ax.plot(steps, values, marker="o" if len(steps) <= 20 else None, markersize=3, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=1 if len(curves) <= 12 else 2)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")
    return True
