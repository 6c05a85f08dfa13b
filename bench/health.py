"""Overhead of the training health statistics and the spike guard (docs/health.md).

The same gptlab run (train.py's `fit`, in this process) three ways: `none` (~callbacks.health
~callbacks.spikes: the module then checks the loss for NaN itself, the same one host sync per step),
`default` (conf/callbacks/default.yaml as shipped) and `verbose` (callbacks.health.interval=1 and
histograms at every validation). Two measurements:

wall clock  A step's time runs from one on_train_batch_start to the next, so it holds every hook, log
            call and host sync; the first --warmup steps and the last one (it validates) are left out.
            Runs alternate in ABBA order so that drift of the machine cancels. The median step is a
            plain step; the mean also carries the logged steps (every trainer.log_every_n_steps) and
            the sampled ones (every callbacks.health.interval), i.e. the amortised cost:

                overhead % = (ms/step of the variant / ms/step of `none` - 1) * 100   (median; mean)

            Paired by round (each ABBA round runs every variant once): the overhead of each round's
            median step against that round's `none`, their mean and its 95% t-interval (the sweep
            report's statistics). The machine's drift between rounds falls out of the pairs; with
            short runs and many rounds the interval says whether a 1% difference is resolved at all.

CPU time    One `none` and one `default` run on one thread, with every call of the statistics' own
            code timed by time.process_time: the callbacks' hooks, the forward-pass work on sampled
            steps, and gradient clipping (which computes the norm itself when the statistics do not).
            (default's timed CPU - none's) / steps / none's median step CPU is the statistics' share of
            a step, amortised over logged and sampled steps; it holds on a loaded machine too. Lightning's
            calls into the two callbacks (a few microseconds each, ~12 a step) are not in it.

Goal: `default` at most 1% on the quick CPU preset (cpu_quick) and on baby_shakespeare (baby).

    python bench/health.py                              # both presets, both measurements
    python bench/health.py --preset baby --rounds 6
    python bench/health.py --measure cpu                # CPU-time accounting only (a loaded machine)
    python bench/health.py --tiny                       # seconds: a smoke test of this script
    python bench/train_throughput.py --health-overhead --preset cpu_quick --rounds 6   # the same

Writes bench/results/health.json (or --out).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import statistics
import tempfile
import time
from collections import defaultdict
from typing import Any

import _common as C
import lightning as L
import torch

from gptlab.report.groups import summarize

PRESETS = {
    # name: (overrides, wall-clock steps, warmup, CPU-time steps: multiples of the interval and of logging)
    "cpu_quick": (["experiment=shakespeare_char_cpu"], 200, 20, 100),
    # 60 steps: the sampled step 49 is inside the wall-clock window
    "baby": (["experiment=shakespeare_char_cpu", "model=baby_shakespeare", "data.batch_size=12"], 60, 5, 50),
    "tiny": (["model=gpt_nano", "model.n_embd=32", "model.n_layer=2", "model.n_head=2", "model.block_size=32",
              "data.batch_size=8", "data.val_windows=16", "callbacks.health.interval=2"], 6, 2, 6),
}
NESTED = {"LanguageModel.grad_norm"}  # timed inside another timed call: shown, not added
VARIANTS = {
    "none": ["~callbacks.health", "~callbacks.spikes"],
    "default": [],
    "verbose": ["callbacks.health.interval=1", "callbacks.health.histograms_every_n_validations=1"],
}


class StepTimer(L.Callback):
    """Seconds (of `clock`) from each training step's start to the next one's."""

    last: StepTimer | None = None
    clock = time.perf_counter

    def __init__(self) -> None:
        StepTimer.last = self
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(StepTimer.clock())

    def step_seconds(self, warmup: int) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])][warmup:]


def run_once(preset: str, variant: str, data: str, steps: int, warmup: int) -> list[float]:
    overrides = [*PRESETS[preset][0], *VARIANTS[variant], f"data.path={data}", f"trainer.max_steps={steps}",
                 f"trainer.val_check_interval={steps}", "~callbacks.progress_bar",
                 f"+callbacks.zz_timer._target_={__name__}.StepTimer"]
    with tempfile.TemporaryDirectory() as run_dir, contextlib.redirect_stdout(io.StringIO()):
        C.fit_in_process(overrides, run_dir)
    return StepTimer.last.step_seconds(warmup)


def abba(rounds: int, names: list[str]) -> list[str]:
    order = []
    for r in range(rounds):
        order += names if r % 2 == 0 else names[::-1]
    return order


def measure_wall(preset: str, args: argparse.Namespace) -> dict[str, Any]:
    _, steps, warmup, _ = PRESETS[preset]
    steps, warmup = args.steps or steps, args.warmup if args.warmup is not None else warmup
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    if not args.tiny:
        run_once(preset, "none", args.data, min(steps, warmup + 2), warmup)  # caches, imports, the prepared corpus
    order = abba(args.rounds, args.variants)
    medians = []  # each run's median step, in `order`
    for variant in order:
        seconds = run_once(preset, variant, args.data, steps, warmup)
        times[variant] += seconds
        medians.append(statistics.median(seconds) * 1e3)
    out: dict[str, Any] = {"steps": steps, "warmup": warmup, "rounds": args.rounds, "order": order}
    for stat, key in ((statistics.median, ""), (statistics.fmean, "_mean")):
        ms = {v: stat(t) * 1e3 for v, t in times.items()}
        out["ms_per_step" + key] = ms
        out["overhead_pct" + key] = {v: (m / ms["none"] - 1) * 100 for v, m in ms.items() if v != "none"}
    n = len(args.variants)
    rounds = [dict(zip(order[i:i + n], medians[i:i + n])) for i in range(0, len(order), n)]
    out["round_median_ms"] = rounds
    out["overhead_pct_paired"] = {}
    for v in args.variants:
        if v != "none":
            stat = summarize([(r[v] / r["none"] - 1) * 100 for r in rounds])
            out["overhead_pct_paired"][v] = {"mean": stat.mean, "low": stat.low, "high": stat.high, "values": stat.values}
    return out


@contextlib.contextmanager
def timed_statistics(totals: dict[str, float]):
    """Add the process_time of every call of the statistics' code to `totals` (by function)."""
    from gptlab.training import health, spikes
    from gptlab.training.module import LanguageModel

    def timed(name: str, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            t0 = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] += time.process_time() - t0
        return wrapper

    targets = [(cls, name) for cls in (health.TrainingHealth, spikes.SpikeGuard) for name in vars(cls)
               if name.startswith("on_")]
    targets += [(health, "max_attention_logit"), (LanguageModel, "configure_gradient_clipping"),
                (LanguageModel, "grad_norm")]  # (the last runs inside the hooks: NESTED)
    saved = [(owner, name, vars(owner)[name]) for owner, name in targets]
    for owner, name, fn in saved:
        setattr(owner, name, timed(f"{owner.__name__.rsplit('.')[-1]}.{name}", fn))
    factory = health.TrainingHealth._activation_hook  # its hooks run inside the forward pass
    health.TrainingHealth._activation_hook = lambda self, key: timed("activation hooks", factory(self, key))
    try:
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
        health.TrainingHealth._activation_hook = factory


def measure_cpu(preset: str, args: argparse.Namespace) -> dict[str, Any]:
    steps = args.steps or PRESETS[preset][3]
    threads = torch.get_num_threads()
    out: dict[str, Any] = {"steps": steps, "threads": 1}
    torch.set_num_threads(1)
    StepTimer.clock = time.process_time
    try:
        for variant in ("none", "default"):
            totals: dict[str, float] = defaultdict(float)
            with timed_statistics(totals):
                per_step = run_once(preset, variant, args.data, steps, min(5, steps - 2))
            out[variant] = {"step_cpu_ms": statistics.median(per_step) * 1e3,
                            "timed_ms_per_step": {k: v / steps * 1e3 for k, v in sorted(totals.items())}}
    finally:
        torch.set_num_threads(threads)
        StepTimer.clock = time.perf_counter
    timed = {v: sum(t for k, t in out[v]["timed_ms_per_step"].items() if k not in NESTED) for v in ("none", "default")}
    out["statistics_ms_per_step"] = timed["default"] - timed["none"]
    out["statistics_pct_of_step"] = out["statistics_ms_per_step"] / out["none"]["step_cpu_ms"] * 100
    return out


def paired(p: dict[str, Any]) -> str:
    if p["low"] is None:
        return f"{p['mean']:+.2f}% (1 round: no interval)"
    return f"{p['mean']:+.2f}% [{p['low']:+.2f}%, {p['high']:+.2f}%]"


def report(preset: str, r: dict[str, Any], variants: list[str]) -> None:
    if "wall" in r:
        w = r["wall"]
        rows = [[v, f"{w['ms_per_step'][v]:.2f}", f"{w['ms_per_step_mean'][v]:.2f}"]
                + (["-", "-", "-"] if v == "none" else
                   [f"{w['overhead_pct'][v]:+.2f}%", f"{w['overhead_pct_mean'][v]:+.2f}%", paired(w["overhead_pct_paired"][v])])
                for v in variants]
        print(f"{preset}, wall clock: {w['steps']} steps x {w['rounds']} rounds per variant, ABBA")
        print(C.table(["variant", "median ms/step", "mean ms/step", "overhead (median)", "overhead (mean)",
                       "overhead (paired by round, 95% interval)"], rows))
    if "cpu" in r:
        c = r["cpu"]
        parts = ", ".join(f"{k} {v * 1e3:.0f} us" for k, v in c["default"]["timed_ms_per_step"].items() if v >= 1e-3)
        print(f"{preset}, CPU time (1 thread, {c['steps']} steps): the statistics {c['statistics_ms_per_step']:.3f} ms "
              f"per step = {c['statistics_pct_of_step']:.3f}% of a step ({c['none']['step_cpu_ms']:.1f} ms CPU); "
              f"clipping without them {c['none']['timed_ms_per_step'].get('LanguageModel.configure_gradient_clipping', 0) * 1e3:.0f} us; "
              f"default, per step: {parts}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), action="append", help="default: cpu_quick and baby")
    p.add_argument("--rounds", type=int, default=4, help="ABBA rounds over the variants (default: 4)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: the preset's)")
    p.add_argument("--warmup", type=int, default=None, help="steps left out at the start of each run")
    p.add_argument("--variants", default=None, help="comma-separated; `none` is the baseline (default: "
                   "none,default,verbose; --tiny: none,default)")
    p.add_argument("--measure", choices=["wall", "cpu", "both"], default="both", help="wall clock, CPU time or both")
    p.add_argument("--data", default=None, help="the corpus (default: tiny Shakespeare, see bench/README.md)")
    p.add_argument("--tiny", action="store_true", help="a smoke test in seconds: the tiny preset, 1 round, no priming run")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/health.json)")
    args = p.parse_args(argv)
    args.data = args.data or str(C.SHAKESPEARE)
    if args.tiny:
        args.preset, args.rounds = ["tiny"], 1
    args.variants = [v for v in (args.variants or ("none,default" if args.tiny else "none,default,verbose")).split(",") if v]
    if "none" not in args.variants or any(v not in VARIANTS for v in args.variants):
        p.error(f"--variants: choose from {sorted(VARIANTS)}, `none` included")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    results = {"machine": C.machine_info(), "presets": {}}
    print(f"[bench] {C.machine_line(results['machine'])}")
    for preset in args.preset or ["cpu_quick", "baby"]:
        results["presets"][preset] = r = {}
        if args.measure in ("wall", "both"):
            r["wall"] = measure_wall(preset, args)
        if args.measure in ("cpu", "both"):
            r["cpu"] = measure_cpu(preset, args)
        report(preset, r, args.variants)
    path = C.write_results("health", results, args.out)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
