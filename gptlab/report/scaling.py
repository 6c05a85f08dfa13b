"""Scaling laws from an isoFLOP sweep, after Hoffmann et al. 2022 (Chinchilla), approach 2.

Each finished job trained a model of N parameters (the N of 6N in its FLOPs per token) on D tokens
for a FLOP budget C (its DONE's `budget`). For each budget:

    a least-squares parabola of the final val/loss in log10 N; its minimum is N_opt(C),
    and likewise in log10 D: D_opt(C);

then over the budgets, straight lines in log-log (scipy.stats.linregress):

    N_opt = k C^a        D_opt = k' C^b

with 95% intervals of a and b from a seeded bootstrap: the jobs of each budget resampled with
replacement, every fit redone, the 2.5 and 97.5 percentiles of the exponents kept (resamples where a
budget has fewer than 3 distinct sizes or no minimum are left out of that budget, or out altogether
with fewer than 2 budgets). A minimum outside the sizes tried is an extrapolation and is marked so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from gptlab.report.collect import Job
from gptlab.report.groups import scipy_stats

RESAMPLES = 1000
SEED = 0


@dataclass
class Point:
    flops: float  # the budget C
    params: float  # N
    tokens: float  # D
    loss: float


@dataclass
class BudgetFit:
    flops: float
    points: list[Point]
    n_coef: np.ndarray | None = None  # loss = c0 x^2 + c1 x + c2, x = log10 N
    n_opt: float | None = None
    d_opt: float | None = None
    loss_opt: float | None = None
    extrapolated: bool = False  # the minimum lies outside the sizes tried


@dataclass
class PowerLaw:
    exponent: float
    coefficient: float
    low: float | None = None  # the exponent's 95% bootstrap interval
    high: float | None = None


@dataclass
class ScalingFit:
    budgets: list[BudgetFit]
    n_law: PowerLaw | None = None  # N_opt = k C^a
    d_law: PowerLaw | None = None  # D_opt = k' C^b
    resamples: int = 0  # bootstrap resamples that gave both fits
    notes: list[str] = field(default_factory=list)


def points_of(jobs: list[Job], metric: str = "val/loss") -> list[Point]:
    """The finished jobs with a FLOP budget and a final value of `metric`."""
    out = []
    for job in jobs:
        b, loss = job.budget, job.final(metric)
        if job.status == "finished" and b.get("flops") and b.get("params") and b.get("tokens_spent") and loss is not None:
            if math.isfinite(loss):
                out.append(Point(float(b["flops"]), float(b["params"]), float(b["tokens_spent"]), float(loss)))
    return out


def is_isoflop(points: list[Point]) -> bool:
    """Some budget has 3 or more model sizes: a parabola can be fitted."""
    sizes: dict[float, set[float]] = {}
    for p in points:
        sizes.setdefault(p.flops, set()).add(p.params)
    return any(len(s) >= 3 for s in sizes.values())


def parabolas(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The least-squares parabola (c0 x^2 + c1 x + c2) of each row of `x` against the same row of `y`,
    as rows of coefficients; NaN where a row has fewer than 3 distinct x."""
    design = np.stack([x**2, x, np.ones_like(x)], axis=-1)  # rows x points x 3
    distinct = (np.diff(np.sort(x, axis=1), axis=1) > 0).sum(axis=1) + 1
    ok = distinct >= 3
    coef = np.full((len(x), 3), np.nan)
    if ok.any():
        d = design[ok]
        dt = d.transpose(0, 2, 1)
        coef[ok] = np.linalg.solve(dt @ d, dt @ y[ok][..., None])[..., 0]
    return coef


def minima(coef: np.ndarray) -> np.ndarray:
    """Where each parabola is lowest; NaN where it has no minimum (not convex)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(coef[:, 0] > 0, -coef[:, 1] / (2 * coef[:, 0]), np.nan)


def fit_budget(flops: float, points: list[Point]) -> BudgetFit:
    fit = BudgetFit(flops, points)
    n = np.log10([p.params for p in points])
    d = np.log10([p.tokens for p in points])
    y = np.array([p.loss for p in points])
    coef = parabolas(n[None], y[None])
    n_min, d_min = minima(coef)[0], minima(parabolas(d[None], y[None]))[0]
    if math.isfinite(n_min):
        fit.n_coef, fit.n_opt = coef[0], float(10**n_min)
        fit.loss_opt = float(np.polyval(coef[0], n_min))
        fit.extrapolated = not n.min() <= n_min <= n.max()
    if math.isfinite(d_min):
        fit.d_opt = float(10**d_min)
    return fit


def power_law(flops: list[float], optimum: list[float]) -> PowerLaw | None:
    if len(set(flops)) < 2:
        return None
    line = scipy_stats().linregress(np.log10(flops), np.log10(optimum))
    return PowerLaw(float(line.slope), float(10 ** line.intercept))


def _laws(fits: list[BudgetFit]) -> tuple[PowerLaw | None, PowerLaw | None]:
    n = [(f.flops, f.n_opt) for f in fits if f.n_opt]
    d = [(f.flops, f.d_opt) for f in fits if f.d_opt]
    return (power_law(*zip(*n)) if len(n) >= 2 else None), (power_law(*zip(*d)) if len(d) >= 2 else None)


def bootstrap(by_budget: dict[float, list[Point]], resamples: int = RESAMPLES, seed: int = SEED) -> tuple[list, list]:
    """The exponents a and b of every usable resample (the jobs of each budget drawn with replacement)."""
    rng = np.random.default_rng(seed)
    log_c = np.log10(list(by_budget))
    n_opt, d_opt = [], []  # budgets x resamples: log10 of the minima
    for pts in by_budget.values():
        draw = rng.integers(0, len(pts), (resamples, len(pts)))
        loss = np.array([p.loss for p in pts])[draw]
        n_opt.append(minima(parabolas(np.log10([p.params for p in pts])[draw], loss)))
        d_opt.append(minima(parabolas(np.log10([p.tokens for p in pts])[draw], loss)))
    a, b = [], []
    for n, d in zip(np.array(n_opt).T, np.array(d_opt).T):
        ok_n, ok_d = np.isfinite(n), np.isfinite(d)
        if len(set(log_c[ok_n])) >= 2 and len(set(log_c[ok_d])) >= 2:  # a line through 2 budgets or more
            a.append(float(np.polyfit(log_c[ok_n], n[ok_n], 1)[0]))
            b.append(float(np.polyfit(log_c[ok_d], d[ok_d], 1)[0]))
    return a, b


def fit(points: list[Point], resamples: int = RESAMPLES, seed: int = SEED) -> ScalingFit:
    by_budget: dict[float, list[Point]] = {}
    for p in sorted(points, key=lambda p: (p.flops, p.params)):
        by_budget.setdefault(p.flops, []).append(p)
    result = ScalingFit([fit_budget(c, pts) for c, pts in by_budget.items()])
    for f in result.budgets:
        if f.n_opt is None:
            result.notes.append(f"C={f.flops:.3g}: no minimum (fewer than 3 sizes, or loss not convex in log N)")
        elif f.extrapolated:
            result.notes.append(f"C={f.flops:.3g}: the minimum N_opt={f.n_opt:.3g} lies outside the sizes tried "
                                f"(an extrapolation)")
    result.n_law, result.d_law = _laws(result.budgets)
    if result.n_law is None or result.d_law is None:
        result.notes.append("power laws need minima at 2 or more budgets")
        return result
    a, b = bootstrap(by_budget, resamples, seed)
    result.resamples = len(a)
    if len(a) >= 20:
        result.n_law.low, result.n_law.high = (float(v) for v in np.percentile(a, [2.5, 97.5]))
        result.d_law.low, result.d_law.high = (float(v) for v in np.percentile(b, [2.5, 97.5]))
    else:
        result.notes.append(f"only {len(a)} of {resamples} bootstrap resamples gave both fits: no intervals")
    return result
