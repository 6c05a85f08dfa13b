"""The sweep report's speed: `python -m gptlab.report` over a sweep of synthetic run directories.

Each synthetic job is what train.py leaves in a job directory (.hydra/config.yaml, overrides.yaml,
hydra.yaml, a TensorBoard event file with train/loss, val/loss and val/bpb curves, DONE with a
compute budget), laid out as an isoFLOP sweep repeated over seeds: budgets x depths x seeds jobs,
their final losses from a Chinchilla-like law L = E + A/N^0.34 + B/D^0.28 plus seeded noise. The
report then does everything at once: the jobs' table, the groups' statistics (the jobs that differ
only by seed), the scaling-law fits with their bootstrap, and every plot.

    python bench/report.py                 # 200 jobs (5 budgets x 8 depths x 5 seeds); goal: < 10 s
    python bench/report.py --tiny          # 12 jobs, a smoke run (the test suite runs it)

Times the report (reading, statistics, fits, writing) in this process, after the imports. Writes
bench/results/report.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

import _common as C

GOAL_SECONDS = 10.0
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28


def write_job(job: Path, overrides: list[str], budget: dict, loss: float, rng: np.random.Generator) -> None:
    from torch.utils.tensorboard import SummaryWriter

    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"optimized_metric": "val/loss", "seed": 1}))
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(
        {"hydra": {"runtime": {"choices": {"experiment": "synthetic"}}, "sweeper": {"_target_": "basic"}}}))
    steps = budget["steps"]
    writer = SummaryWriter(str(job / "tensorboard"))
    for i in range(20):  # train/loss every 5% of the run, val/loss and val/bpb every 25%
        step = max(1, steps * (i + 1) // 20) - 1
        shape = loss + 2.5 * np.exp(-3 * (i + 1) / 20)
        writer.add_scalar("train/loss", shape + rng.normal(0, 0.01), step)
        if (i + 1) % 5 == 0:
            writer.add_scalar("val/loss", shape, step)
            writer.add_scalar("val/bpb", shape / np.log(2), step)
    writer.close()
    (job / "DONE").write_text(json.dumps({"metric": "val/loss", "value": loss, "steps": steps, "seconds": 1.0,
                                          "budget": budget}))


def make_sweep(root: Path, budgets: list[float], depths: list[int], seeds: int) -> int:
    """An isoFLOP sweep of synthetic jobs under `root`; returns the number of jobs."""
    rng = np.random.default_rng(0)
    num = 0
    for c in budgets:
        for d in depths:
            params = 12 * d * (32 * d) ** 2 + 65 * 32 * d  # the 6N term's N of depth d, width 32 d
            per_token = 6 * params + 12 * d * (32 * d) * 64
            steps = max(1, int(c / (per_token * 1536)))
            tokens = steps * 1536
            budget = {"flops": c, "tokens": None, "steps": steps, "tokens_per_step": 1536, "flops_per_token": per_token,
                      "params": params, "tokens_spent": tokens, "flops_spent": tokens * per_token}
            for seed in range(1, seeds + 1):
                loss = E + A / params**ALPHA + B / tokens**BETA + rng.normal(0, 0.005)
                overrides = [f"budget.flops={c:g}", f"model.n_layer={d}", f"model.n_embd={32 * d}",
                             f"model.n_head={d}", f"seed={seed}"]
                write_job(root / str(num), overrides, budget, float(loss), rng)
                num += 1
    return num


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="12 jobs (2 budgets x 3 depths x 2 seeds)")
    parser.add_argument("--out", help="the results file (default bench/results/report.json)")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    from gptlab.report import report

    if args.tiny:
        budgets, depths, seeds = [1e15, 1e16], [2, 4, 6], 2
    else:
        budgets, depths, seeds = [1e15, 3e15, 1e16, 3e16, 1e17], [1, 2, 3, 4, 5, 6, 8, 10], 5
    with tempfile.TemporaryDirectory() as tmp:
        sweep = Path(tmp) / "sweep"
        jobs = make_sweep(sweep, budgets, depths, seeds)
        report(sweep, write=False)  # imports (scipy, TensorBoard's reader) and the page cache, not timed
        started, cpu = time.perf_counter(), time.process_time()
        (rep,) = report(sweep)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        written = sorted(p.name for p in rep.files)
    result = {"jobs": jobs, "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3), "goal_seconds": GOAL_SECONDS,
              "goal_met": seconds < GOAL_SECONDS, "groups": len(rep.seeds.groups) if rep.seeds else 0,
              "exponent_a": rep.scaling.n_law.exponent if rep.scaling and rep.scaling.n_law else None,
              "written": written, "machine": C.machine_info(torch_too=False)}
    print(f"report over {jobs} synthetic jobs: {seconds:.2f} s ({cpu:.2f} s of CPU; goal < {GOAL_SECONDS:.0f} s: "
          f"{'met' if result['goal_met'] else 'NOT met'}); {result['groups']} groups; wrote {', '.join(written)}")
    print(f"results: {C.write_results('report', result, args.out)}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["goal_met"] else 1)
