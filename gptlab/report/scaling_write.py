"""An isoFLOP sweep's scaling laws (gptlab.report.scaling) as a section of report.md, scaling.csv and two
plots: isoflop.png (final loss against N for each budget, the parabolas and their minima) and
frontier.png (N_opt and D_opt against C with the fitted power laws)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gptlab.report.scaling import PowerLaw, ScalingFit
from gptlab.report.write import md_images, md_table, new_figure, save_figure, write_rows


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def fmt_law(law: PowerLaw | None, name: str, x: str) -> str:
    if law is None:
        return f"{name}: not fitted"
    interval = f" [{law.low:.3f}, {law.high:.3f}]" if law.low is not None else " (no interval)"
    return f"{name} = {law.coefficient:.3g} C^{x}, {x} = {law.exponent:.3f}{interval}"


def text(result: ScalingFit) -> str:
    lines = ["scaling laws (isoFLOP, Chinchilla approach 2):",
             *(f"  C={f.flops:.3g}: N_opt={fmt(f.n_opt)}{' (extrapolated)' if f.extrapolated else ''}, "
               f"D_opt={fmt(f.d_opt)}" for f in result.budgets),
             "  " + fmt_law(result.n_law, "N_opt", "a"), "  " + fmt_law(result.d_law, "D_opt", "b")]
    return "\n".join(lines + [f"  note: {n}" for n in result.notes])


def markdown(result: ScalingFit, images: list[Path]) -> list[str]:
    rows = [[f"{f.flops:.3g}", str(len(f.points)), fmt(f.n_opt) + (" (extrapolated)" if f.extrapolated else ""),
             fmt(f.d_opt), "-" if f.loss_opt is None else f"{f.loss_opt:.4f}"] for f in result.budgets]
    out = ["## Scaling laws: isoFLOP profiles (Chinchilla approach 2)", "",
           "Per FLOP budget C, a parabola of the final val/loss in log10 N (and in log10 D) gives the "
           "loss-optimal model size N_opt and token count D_opt; straight lines through them in log-log give "
           "the exponents. N: parameters of the 6N term (no embedding lookups); D: tokens trained on. Intervals: "
           f"95% percentile bootstrap ({result.resamples} resamples of each budget's jobs).", "",
           *md_table(["budget C (FLOPs)", "jobs", "N_opt", "D_opt", "loss at N_opt"], rows), "",
           "- " + fmt_law(result.n_law, "N_opt", "a"), "- " + fmt_law(result.d_law, "D_opt", "b")]
    return out + [f"- {n}" for n in result.notes] + [""] + md_images(images)


def write_csv(path: Path, result: ScalingFit) -> None:
    rows = [[name, f.flops, getattr(f, attr), None, None] for f in result.budgets
            for name, attr in (("N_opt", "n_opt"), ("D_opt", "d_opt"), ("loss_opt", "loss_opt"))]
    for name, law in (("a", result.n_law), ("b", result.d_law)):
        if law is not None:
            rows += [[name, None, law.exponent, law.low, law.high], [f"k ({name})", None, law.coefficient, None, None]]
    write_rows(path, ["quantity", "budget_flops", "value", "low", "high"], rows)


def plot_isoflop(path: Path, result: ScalingFit, metric: str = "val/loss") -> None:
    fig, ax = new_figure()
    for i, f in enumerate(result.budgets):
        color = f"C{i % 10}"
        ax.scatter([p.params for p in f.points], [p.loss for p in f.points], color=color, s=18,
                   label=f"C = {f.flops:.3g} FLOPs")
        if f.n_coef is not None:
            x = np.log10([p.params for p in f.points] + [f.n_opt])
            grid = np.linspace(x.min() - 0.1, x.max() + 0.1, 100)
            ax.plot(10**grid, np.polyval(f.n_coef, grid), color=color, alpha=0.7)
            ax.scatter([f.n_opt], [f.loss_opt], marker="*", s=160, color=color, edgecolor="black", zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N (6N term)")
    ax.set_ylabel(f"final {metric}")
    ax.set_title("isoFLOP profiles: minima starred", fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    save_figure(fig, path)


def plot_frontier(path: Path, result: ScalingFit) -> None:
    fig, axes = new_figure(ncols=2)
    for ax, law, attr, label in ((axes[0], result.n_law, "n_opt", "N_opt (parameters)"),
                                 (axes[1], result.d_law, "d_opt", "D_opt (tokens)")):
        found = [(f.flops, getattr(f, attr)) for f in result.budgets if getattr(f, attr)]
        if found:
            ax.scatter(*zip(*found), color="tab:blue", zorder=3)
        if law is not None:
            c = np.geomspace(min(f.flops for f in result.budgets), max(f.flops for f in result.budgets), 50)
            ax.plot(c, law.coefficient * c**law.exponent, color="tab:red",
                    label=f"{law.coefficient:.3g} C^{law.exponent:.3f}")
            ax.legend(fontsize="small")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("budget C (FLOPs)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    save_figure(fig, path)
