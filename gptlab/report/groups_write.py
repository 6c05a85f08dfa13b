"""The groups' statistics (gptlab.report.groups) as text, Markdown, groups.csv and two plots: the mean
validation curve of each group with its 95% band, and a dot-and-interval chart of the primary statistic."""

from __future__ import annotations

import re
from pathlib import Path

from gptlab.report.groups import Group, GroupReport, Stat, summarize
from gptlab.report.write import (LABEL_WIDTH, LEGEND_MAX, align, fmt_float, md_images, md_table, new_figure, save_figure,
                                 shorten, write_rows)

HEAD = ["group", "n", "mean", "std", "95% interval", "diff vs baseline", "95% interval of diff", "p (Welch)",
        "p (Holm)"]


def fmt_interval(low: float | None, high: float | None) -> str:
    return "-" if low is None or high is None else f"[{low:.4f}, {high:.4f}]"


def fmt_p(p: float | None) -> str:
    return "-" if p is None else f"{p:.3g}"


def row(rep: GroupReport, group: Group, column: str) -> list[str]:
    stat: Stat = group.stats[column]
    name = group.name + (" (baseline)" if group is rep.baseline else "")
    interval = fmt_interval(stat.low, stat.high) if stat.n >= 2 else (f"n={stat.n}: no interval" if stat.n else "-")
    comp = group.vs_baseline.get(column)
    if group is rep.baseline:
        diff = ["-", "-", "-", "-"]
    elif comp is None:
        diff = ["-", "no finished job", "-", "-"]
    else:
        sign = f"{comp.diff:+.4f}"
        diff = [sign, fmt_interval(comp.low, comp.high) if comp.low is not None else "needs n >= 2 on both sides",
                fmt_p(comp.p), fmt_p(comp.p_holm)]
    return [shorten(name, LABEL_WIDTH), str(stat.n), fmt_float(stat.mean), fmt_float(stat.std), interval, *diff]


def text(rep: GroupReport) -> str:
    """The primary statistic's table (the console's view)."""
    lines = [f"{len(rep.groups)} groups (jobs that differ only by seed), {rep.primary}:",
             align([HEAD, *(row(rep, g, rep.primary) for g in rep.groups)], 1)]
    lines += [f"left out: job {j.path.name} ({j.name}): {j.status}" + (f": {j.reason}" if j.reason else "")
              for j in rep.left_out]
    return "\n".join(lines)


def markdown(rep: GroupReport, images: list[Path]) -> list[str]:
    out = ["## Groups: jobs that differ only by seed", "",
           f"Baseline: {rep.baseline.name}. 95% intervals: Student's t for a group's mean, Welch's for a difference "
           f"of means (group - baseline); p: Welch's t-test, Holm-corrected over the groups compared with the "
           f"baseline (p (Holm)). An interval needs 2 finished jobs.", ""]
    for column in rep.columns:
        out += [f"### {column}", "", *md_table(HEAD, [row(rep, g, column) for g in rep.groups]), ""]
    if rep.left_out:
        out += ["Left out of the statistics:", ""]
        out += [f"- job {j.path.name} ({j.name}): {j.status}" + (f": {j.reason}" if j.reason else "")
                for j in rep.left_out]
        out.append("")
    return out + md_images(images)


def csv_row(rep: GroupReport, g: Group, column: str) -> list:
    s, c = g.stats[column], g.vs_baseline.get(column)
    return [g.name, column, g is rep.baseline, s.n, s.mean, s.std, s.low, s.high,
            *((c.diff, c.low, c.high, c.p, c.p_holm) if c else (None,) * 5),
            " ".join(repr(v) for v in s.values), " ".join(j.path.name for j in g.finished)]


def write_csv(path: Path, rep: GroupReport) -> None:
    write_rows(path, ["group", "statistic", "baseline", "n", "mean", "std", "ci_low", "ci_high", "diff", "diff_low",
                      "diff_high", "p", "p_holm", "values", "jobs"],
               (csv_row(rep, g, column) for column in rep.columns for g in rep.groups))


def plot_curves(path: Path, rep: GroupReport, tag: str = "val/loss") -> bool:
    """Each group's mean curve over the steps all its finished jobs logged, with the 95% band."""
    fig, ax = new_figure()
    drawn = False
    for group in rep.groups:
        curves = [dict(j.curves[tag]) for j in group.finished if j.curves.get(tag)]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not steps:
            continue
        stats = [summarize([c[s] for c in curves]) for s in steps]
        line, = ax.plot(steps, [s.mean for s in stats], label=f"{shorten(group.name, LABEL_WIDTH)} (n={len(curves)})")
        if len(curves) >= 2:
            ax.fill_between(steps, [s.low for s in stats], [s.high for s in stats], color=line.get_color(), alpha=0.2)
        drawn = True
    if not drawn:
        return False
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"{tag}: mean and 95% interval")
    ax.grid(alpha=0.3)
    if len(rep.groups) <= LEGEND_MAX:
        ax.legend(fontsize="small")
    save_figure(fig, path)
    return True


def plot_dots(path: Path, rep: GroupReport) -> bool:
    """The primary statistic per group: the seeds' values, their mean and its 95% interval."""
    column = rep.primary
    groups = [g for g in rep.groups if g.stats[column].n][::-1]  # the first group on top
    if not groups:
        return False
    fig, ax = new_figure()
    stats = [g.stats[column] for g in groups]
    ax.scatter([v for s in stats for v in s.values], [y for y, s in enumerate(stats) for _ in s.values],
               color="tab:gray", alpha=0.6, s=14, zorder=2)
    # one-seed groups: a dot without a bar
    err = [[s.mean - s.low if s.low is not None else 0 for s in stats],
           [s.high - s.mean if s.high is not None else 0 for s in stats]]
    ax.errorbar([s.mean for s in stats], range(len(stats)), xerr=err, fmt="o", color="tab:blue", capsize=4, zorder=3)
    base = rep.baseline.stats[column].mean
    if base is not None:
        ax.axvline(base, color="tab:red", linestyle="--", alpha=0.6, label=f"baseline mean ({rep.baseline.name})")
        ax.legend(fontsize="small")
    ax.set_yticks(range(len(groups)), [shorten(g.name, 40) for g in groups], fontsize="small")
    ax.set_xlabel(f"{column}: seeds (gray), mean and 95% interval (blue)")
    ax.grid(alpha=0.3, axis="x")
    save_figure(fig, path)
    return True


def plot_name(column: str) -> str:
    return "groups_" + re.sub(r"[^A-Za-z0-9]+", "_", column).strip("_") + ".png"
