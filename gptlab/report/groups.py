"""Seeds and groups: the jobs of a sweep that differ only by `seed=` form a group; each group's final
and best values get n, mean, standard deviation and a 95% interval, and each group is compared with a
baseline group: the difference of the means, its 95% interval and Welch's t-test p-value,
Holm-corrected over the groups compared. The statistics are scipy's.

    interval of a mean:        mean +- t(0.975, n - 1) * std / sqrt(n)          (Student's t)
    difference:                mean(group) - mean(baseline), its interval and p from
                               scipy.stats.ttest_ind(group, baseline, equal_var=False)   (Welch)
    Holm:                      the i-th smallest of m p-values times (m - i + 1), kept monotone, <= 1

A group needs 2 finished jobs for an interval and a test; with one it shows its value and says so.
Failed and running jobs are left out of the statistics and listed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gptlab.errors import ConfigError
from gptlab.report.collect import Job
from gptlab.run.naming import is_noise, key_of, run_name

DEFAULT_METRICS = ("val/loss", "val/bpb")
KINDS = ("final", "best")
LEVEL = 0.95


def scipy_stats():
    """scipy.stats, or one line saying how to install it."""
    try:
        from scipy import stats
    except ImportError:
        raise ConfigError('the statistics of seeds and scaling laws need scipy: pip install "gptlab[sweep]"') from None
    return stats


@dataclass
class Stat:
    n: int
    mean: float | None = None
    std: float | None = None
    low: float | None = None  # the 95% interval of the mean (None with fewer than 2 values)
    high: float | None = None
    values: list[float] = field(default_factory=list)


@dataclass
class Comparison:
    diff: float
    low: float | None = None  # Welch's 95% interval of the difference
    high: float | None = None
    p: float | None = None
    p_holm: float | None = None


@dataclass
class Group:
    name: str
    overrides: tuple[str, ...]  # what its jobs share but the seed
    jobs: list[Job]  # every job, finished or not
    stats: dict[str, Stat] = field(default_factory=dict)  # by column, e.g. "final val/loss"
    vs_baseline: dict[str, Comparison] = field(default_factory=dict)

    @property
    def finished(self) -> list[Job]:
        return [j for j in self.jobs if j.status == "finished"]


def has_seeds(jobs: list[Job]) -> bool:
    return any(key_of(o) == "seed" for j in jobs for o in j.overrides)


def group_jobs(jobs: list[Job]) -> list[Group]:
    """Jobs with the same overrides but the seed, in the order of their first job's number."""
    from gptlab.report.collect import natural

    keyed: dict[tuple[str, ...], list[Job]] = {}
    for job in sorted(jobs, key=lambda j: natural(j.path.name)):
        key = tuple(sorted(o for o in job.overrides if key_of(o) != "seed" and not is_noise(o)))
        keyed.setdefault(key, []).append(job)
    common = set.intersection(*(set(k) for k in keyed)) if keyed else set()
    return [Group(run_name(key, common, "base"), key, members) for key, members in keyed.items()]


def columns(metrics: list[str]) -> list[str]:
    return [f"{kind} {metric}" for metric in metrics for kind in KINDS]


def value(job: Job, column: str) -> float | None:
    kind, metric = column.split(" ", 1)
    return job.final(metric) if kind == "final" else job.best(metric)


def summarize(values: list[float]) -> Stat:
    import numpy as np

    stats = scipy_stats()
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return Stat(0)
    if len(x) < 2:
        return Stat(1, float(x[0]), values=list(values))
    std = float(x.std(ddof=1))
    low, high = (x.mean(), x.mean()) if std == 0 else stats.t.interval(LEVEL, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    return Stat(len(x), float(x.mean()), std, float(low), float(high), list(values))


def compare(values: list[float], baseline: list[float]) -> Comparison | None:
    """Welch's test of mean(values) - mean(baseline); None without 2 values on each side."""
    import numpy as np

    stats = scipy_stats()
    if len(values) < 2 or len(baseline) < 2:
        return None if not values or not baseline else Comparison(float(np.mean(values) - np.mean(baseline)))
    result = stats.ttest_ind(values, baseline, equal_var=False)
    ci = result.confidence_interval(LEVEL)
    finite = [v if math.isfinite(v) else None for v in (ci.low, ci.high, result.pvalue)]
    return Comparison(float(np.mean(values) - np.mean(baseline)), *finite)


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of the p-values that are not None (family: those)."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m, out, running = len(order), list(pvalues), 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def find_baseline(groups: list[Group], spec: str | None) -> Group:
    """The group named `spec`, or whose overrides include every override of `spec` (comma-separated);
    the first group without one."""
    if not spec:
        return groups[0]
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    exact = [g for g in groups if g.name == spec]
    found = exact or [g for g in groups if all(w in g.overrides for w in wanted)]
    names = "; ".join(g.name for g in groups)
    if not found:
        raise ConfigError(f"--baseline {spec!r} matches no group; the groups are: {names}")
    if len(found) > 1:
        raise ConfigError(f"--baseline {spec!r} matches {len(found)} groups ({'; '.join(g.name for g in found)}); "
                          f"name one of: {names}")
    return found[0]


def check_metrics(jobs: list[Job], metrics: list[str]) -> None:
    logged = {tag for j in jobs if j.status == "finished" for tag in j.curves}
    for metric in metrics:
        if logged and metric not in logged:
            raise ConfigError(f"unknown metric {metric!r}: the finished jobs logged {', '.join(sorted(logged))}")


@dataclass
class GroupReport:
    groups: list[Group]
    baseline: Group
    columns: list[str]  # the statistics, e.g. "final val/loss", "best val/loss", ...
    left_out: list[Job]  # failed and running jobs

    @property
    def primary(self) -> str:
        return self.columns[0]


def analyse(jobs: list[Job], metrics: list[str] | None = None, baseline: str | None = None) -> GroupReport:
    """Group `jobs` by all but their seed and compute every group's statistics and comparisons.
    `metrics`: those chosen (first: the primary), before val/loss and val/bpb."""
    chosen = list(metrics or [])
    check_metrics(jobs, chosen)
    logged = {tag for j in jobs for tag in j.curves}
    names = list(dict.fromkeys(chosen + [m for m in DEFAULT_METRICS if m in logged or m == "val/loss"]))
    groups = group_jobs(jobs)
    base = find_baseline(groups, baseline)
    cols = columns(names)
    for group in groups:
        for col in cols:
            group.stats[col] = summarize([v for j in group.finished if (v := value(j, col)) is not None])
    others = [g for g in groups if g is not base]
    for col in cols:
        comparisons = [compare(g.stats[col].values, base.stats[col].values) for g in others]
        adjusted = holm([c.p if c else None for c in comparisons])
        for group, comp, p_holm in zip(others, comparisons, adjusted):
            if comp is not None:
                comp.p_holm = p_holm
                group.vs_baseline[col] = comp
    left_out = [j for j in jobs if j.status != "finished"]
    return GroupReport(groups, base, cols, left_out)
