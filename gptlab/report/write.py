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
LEGEND_MAX = 24  # more lines than this: no legend (unreadable, and slow to lay out)


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


def _shows(jobs: list[Job]) -> tuple[bool, bool]:
    """(whether the optimised metric gets a column of its own, whether the FLOPs spent get one)."""
    return bool(jobs) and jobs[0].metric != "val/loss", any(j.budget for j in jobs)


def columns(jobs: list[Job]) -> list[str]:
    metric, flops = _shows(jobs)
    return ["job", "name", "status", *([jobs[0].metric] if metric else []), "best val/loss", "final val/loss",
            *source_tags(jobs), "steps", "tokens", *(["FLOPs"] if flops else []), "time"]


def fmt_flops(job: Job) -> str:
    spent = job.budget.get("flops_spent")
    return "-" if spent is None else f"{spent:.3g}"


def rows(jobs: list[Job]) -> list[list[str]]:
    metric, flops = _shows(jobs)
    tags = source_tags(jobs)
    return [
        [job.path.name, job.name, fmt_status(job), *([fmt_float(job.value)] if metric else []),
         fmt_float(job.best_val), fmt_float(job.final_val), *(fmt_float(job.sources.get(t)) for t in tags),
         fmt_count(job.steps), fmt_count(job.tokens), *([fmt_flops(job)] if flops else []), fmt_seconds(job.seconds)]
        for job in jobs
    ]


def align(table: list[list[str]], text_columns: int) -> str:
    """A header row and rows as aligned text: the first `text_columns` left, the rest (numbers) right."""
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.rjust(w) if i >= text_columns else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def text_table(jobs: list[Job]) -> str:
    return align([columns(jobs), *rows(jobs)], 3)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def md_table(head: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|",
            *("| " + " | ".join(_md_cell(c) for c in r) + " |" for r in body)]


def markdown(group: Path, jobs: list[Job], images: list[Path], notes: list[str], sections: list[str] = ()) -> str:
    """`sections`: more Markdown lines after the jobs' table (the groups' statistics, the scaling laws)."""
    head = columns(jobs)
    counts = {s: sum(j.status == s for j in jobs) for s in ("finished", "failed", "running", "pruned")}
    pruned = f", {counts['pruned']} pruned" if counts["pruned"] else ""
    out = [f"# Report: {group}", "",
           f"{len(jobs)} jobs: {counts['finished']} finished, {counts['failed']} failed, {counts['running']} running"
           f"{pruned}; sorted by {jobs[0].metric if jobs else 'val/loss'} (best first).", "",
           *md_table(head, rows(jobs)), ""]
    out += sections
    out += md_images(images)
    out += [f"- {n}" for n in notes]
    return "\n".join(out).rstrip() + "\n"


def write_rows(path: Path, header: list[str], body) -> None:
    """A CSV file, written whole or not at all."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(body)
    with atomic_write(path, "w") as f:
        f.write(buffer.getvalue())


def md_images(images: list[Path]) -> list[str]:
    return [f"![{p.stem}]({p.name})\n" for p in images]


def write_csv(path: Path, jobs: list[Job], groups: dict[Path, str] | None = None) -> None:
    """report.csv: a row per job; `groups`: the seed group of each job (by its path), a column of its own."""
    metric = jobs[0].metric if jobs else "val/loss"
    groups = groups or {}
    tags = source_tags(jobs)
    write_rows(path, ["job", "name", "status", "reason", "metric", "value", "best_val_loss", "final_val_loss", "steps",
                      "tokens", "seconds", "path", "overrides", "budget_flops", "budget_tokens", "params", "flops_spent",
                      "group", *tags],
               ([j.path.name, j.name, j.status, j.reason, metric, j.value, j.best_val, j.final_val, j.steps, j.tokens,
                 None if j.seconds is None else round(j.seconds, 1), str(j.path), " ".join(j.overrides),
                 *(j.budget.get(k) for k in ("flops", "tokens", "params", "flops_spent")), groups.get(j.path),
                 *(j.sources.get(t) for t in tags)]
                for j in jobs))


def new_figure(ncols: int = 1):
    """(figure, axes) of a figure of its own, without pyplot's global state or GUI backends; `ncols`
    above 1: a row of that many axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8 if ncols == 1 else 5 * ncols, 5), dpi=90)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols)


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")


def plot_val_loss(path: Path, jobs: list[Job], title: str, metric: str = "val/loss") -> bool:
    """Every job's validation curve (or the curve of its optimised `metric`) on one plot; False
    (nothing written) while none has one."""
    curve_of = (lambda j: j.val_curve) if metric == "val/loss" else (lambda j: j.metric_curve)
    curves = [j for j in jobs if curve_of(j)]
    if not curves:
        return False
    fig, ax = new_figure()
    for job in curves:
        steps, values = zip(*curve_of(job))
        label = shorten(job.name, LABEL_WIDTH) + (f" ({job.status})" if job.status != "finished" else "")
        ax.plot(steps, values, marker="o" if len(steps) <= 20 else None, markersize=3, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3)
    if len(curves) <= LEGEND_MAX:
        ax.legend(fontsize="small", ncol=1 if len(curves) <= 12 else 2)
    save_figure(fig, path)
    return True
