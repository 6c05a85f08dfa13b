"""Overhead of the training health statistics and the spike guard (docs/health.md).

The same gptlab run (train.py's `fit`, in this process) three ways: `none` (~callbacks.health
~callbacks.spikes: the module then checks the loss for NaN itself, the same one host sync per step),
`default` (conf/callbacks/default.yaml as shipped) and `verbose` (callbacks.health.interval=1 and
histograms at every validation). A step's time runs from one on_train_batch_start to the next, so it
holds every hook, log call and host sync; the first --warmup steps and the one validation (at the
last step) are left out. Runs alternate in ABBA order so that drift of the machine cancels;

    overhead % = (median ms/step of the variant / median ms/step of `none` - 1) * 100

Goal: `default` at most 1% on the quick CPU preset (cpu_quick) and on baby_shakespeare (baby).

    python bench/health.py                              # both presets, default and verbose vs none
    python bench/health.py --preset baby --rounds 3
    python bench/health.py --tiny                       # seconds: a smoke test of this script

Writes bench/results/health.json (or --out).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from typing import Any

import _common as C
import lightning as L

PRESETS = {
    # name: (overrides, steps, warmup)
    "cpu_quick": (["experiment=shakespeare_char_cpu"], 200, 20),
    "baby": (["experiment=shakespeare_char_cpu", "model=baby_shakespeare", "data.batch_size=12"], 40, 5),
    "tiny": (["model=gpt_nano", "model.n_embd=32", "model.n_layer=2", "model.n_head=2", "model.block_size=32",
              "data.batch_size=8", "data.val_windows=16", "callbacks.health.interval=2"], 6, 2),
}
VARIANTS = {
    "none": ["~callbacks.health", "~callbacks.spikes"],
    "default": [],
    "verbose": ["callbacks.health.interval=1", "callbacks.health.histograms_every_n_validations=1"],
}


class StepTimer(L.Callback):
    """Wall-clock seconds from each training step's start to the next one's."""

    last: StepTimer | None = None

    def __init__(self) -> None:
        StepTimer.last = self
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    def step_seconds(self, warmup: int) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])][warmup:]


def run_once(preset: str, variant: str, data: str, steps: int, warmup: int) -> list[float]:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from gptlab.run.fit import fit

    overrides = [*PRESETS[preset][0], *VARIANTS[variant], f"data.path={data}", f"trainer.max_steps={steps}",
                 f"trainer.val_check_interval={steps}", "~callbacks.progress_bar",
                 f"+callbacks.zz_timer._target_={__name__}.StepTimer"]
    with tempfile.TemporaryDirectory() as run_dir:
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(C.ROOT / "conf")):
            cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
        GlobalHydra.instance().clear()
        HydraConfig().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
            cfg.paths.output_dir = cfg.paths.log_dir = run_dir
        with contextlib.redirect_stdout(io.StringIO()):
            fit(cfg)
    return StepTimer.last.step_seconds(warmup)


def abba(rounds: int, names: list[str]) -> list[str]:
    order = []
    for r in range(rounds):
        order += names if r % 2 == 0 else names[::-1]
    return order


def measure(preset: str, args: argparse.Namespace) -> dict[str, Any]:
    _, steps, warmup = PRESETS[preset]
    steps, warmup = args.steps or steps, args.warmup if args.warmup is not None else warmup
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    run_once(preset, "none", args.data, min(steps, warmup + 2), warmup)  # caches, imports, the prepared corpus
    for variant in abba(args.rounds, args.variants):
        times[variant] += run_once(preset, variant, args.data, steps, warmup)
    medians = {v: statistics.median(t) for v, t in times.items()}
    return {"steps": steps, "warmup": warmup, "rounds": args.rounds,
            "ms_per_step": {v: m * 1e3 for v, m in medians.items()},
            "overhead_pct": {v: (m / medians["none"] - 1) * 100 for v, m in medians.items() if v != "none"}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), action="append", help="default: cpu_quick and baby")
    p.add_argument("--rounds", type=int, default=4, help="ABBA rounds over the variants (default: 4)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: the preset's)")
    p.add_argument("--warmup", type=int, default=None, help="steps left out at the start of each run")
    p.add_argument("--variants", default="none,default,verbose", help="comma-separated; `none` is the baseline")
    p.add_argument("--data", default=None, help="the corpus (default: tiny Shakespeare, see bench/README.md)")
    p.add_argument("--tiny", action="store_true", help="a smoke test in seconds: the tiny preset, 1 round")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/health.json)")
    args = p.parse_args(argv)
    args.data = args.data or str(C.SHAKESPEARE)
    if args.tiny:
        args.preset, args.rounds = ["tiny"], 1
    args.variants = [v for v in args.variants.split(",") if v]
    if "none" not in args.variants or any(v not in VARIANTS for v in args.variants):
        p.error(f"--variants: choose from {sorted(VARIANTS)}, `none` included")
    results = {"machine": C.machine_info(), "presets": {}}
    for preset in args.preset or ["cpu_quick", "baby"]:
        results["presets"][preset] = r = measure(preset, args)
        rows = [[v, f"{r['ms_per_step'][v]:.2f}", "-" if v == "none" else f"{r['overhead_pct'][v]:+.2f}%"]
                for v in args.variants]
        print(f"{preset}: {r['steps']} steps x {r['rounds']} rounds per variant, medians")
        print(C.table(["variant", "ms/step", "overhead"], rows))
    path = C.write_results("health", results, args.out)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
