"""Training-loader cost of token shards and mixtures against a quick-preset training step, and the
loader's memory with 1 and with 100 shards.

Cost: the time to make one training batch the way TokenDataModule does (gptlab.data.datasets.TrainBatches
.batch, plus SourceCounts.add for a mixture) in the quick preset's shape (batch 12 x block 64), for
  - one prepared token array (the baseline, a memmap of --mb MB),
  - a mixture of 2 sources (that array and a second, weights 0.7 / 0.3),
  - 100 llm.c shards of --mb MB each (drawn over all of them, as many memory-mapped at a time as gptlab.data.shards.MAX_OPEN allows),
divided by the median time of a quick-preset training step (gpt_micro, char vocabulary, AdamW, the raw
forward/backward/step of bench/train_throughput.py's raw loop, measured here). Goal: <= 1% each.

Memory: a fresh subprocess per case opens the shards and draws --batches batches; reported is the
growth over the process's memory before it opened them, as peak RSS (VmHWM, which counts the pages of
mapped files it touched: page cache the kernel can drop) and as peak anonymous memory (RssAnon, sampled:
the memory the loader itself holds). Goal: 100 shards of 100 MB grow by at most 50 MB more than 1 shard
does, judged on the anonymous memory; the RSS figure is reported beside it.

Shards are sparse files (a header, then a hole the filesystem reads as zeros): 100 x 100 MB costs no disk.

    python bench/loader.py                 # 100 shards of 100 MB, 2000 batches per case
    python bench/loader.py --tiny          # seconds: 3 shards of 1 MB, 20 batches, memory measured in
                                           # this process (a smoke test of the code, no figures)

Writes bench/results/loader.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import _common as C

HEADER = 1024


def sparse_shard(path: Path, tokens: int) -> Path:
    """An llm.c GPT-2 shard of `tokens` zero tokens, written as a header and a hole."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = 20240520, 1, tokens
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.truncate(HEADER + 2 * tokens)
    return path


def make_shards(directory: Path, n: int, mb: float) -> list[Path]:
    tokens = int(mb * 1e6) // 2
    return [sparse_shard(directory / f"shard_{i:06d}.bin", tokens) for i in range(n)]


def batch_cost(sampler, counts, batches: int) -> float:
    """Median seconds per batch over `batches` batches (after 10 warm-up ones)."""
    for k in range(10):
        sampler.batch(k)
    times = []
    for k in range(10, 10 + batches):
        t = time.perf_counter()
        sampler.batch(k)
        if counts is not None:
            counts.add(sampler, k)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def quick_step(steps: int) -> float:
    """Median seconds of a quick-preset training step (gpt_micro, batch 12 x 64, 65 tokens, AdamW)."""
    import torch
    import torch.nn.functional as F
    import yaml

    from gptlab.models import build_model

    cfg = yaml.safe_load((C.ROOT / "conf" / "model" / "gpt_micro.yaml").read_text())
    cfg.pop("defaults", None)
    base = yaml.safe_load((C.ROOT / "conf" / "model" / "base" / "gpt2.yaml").read_text())
    model = build_model({**base, **cfg, "vocab_size": 65})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x = torch.randint(0, 65, (12, 64))
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, 65), x.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def costs(directory: Path, n_shards: int, mb: float, batches: int) -> dict[str, float]:
    from gptlab.data.datasets import TrainBatches
    from gptlab.data.mixture import Source, SourceCounts
    from gptlab.data.shards import TokenShards

    files = make_shards(directory, n_shards, mb)
    one = TokenShards(files[:1]).tokens(0)  # a plain memmap, as a prepared split is read
    two = TokenShards(files[1:2]).tokens(0)
    out = {"array": batch_cost(TrainBatches(one, 64, 12, seed=0), None, batches)}
    mixture = TrainBatches([one, two], 64, 12, seed=0, weights=[0.7, 0.3])
    counts = SourceCounts([Source("a", 0.7, one, one), Source("b", 0.3, two, two)])
    out["mixture_2"] = batch_cost(mixture, counts, batches)
    out[f"shards_{n_shards}"] = batch_cost(TrainBatches(TokenShards(files), 64, 12, seed=0), None, batches)
    return out


def anon_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


def hwm_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def child_memory(directory: str, n: int, batches: int) -> dict[str, float]:
    """(In a fresh subprocess) open the first n shards of `directory`, draw batches: the memory growth."""
    from gptlab.data.datasets import TrainBatches
    from gptlab.data.shards import TokenShards, shard_files

    files = shard_files(directory)[:n]
    base_anon, base_hwm, peak_anon = anon_kb(), hwm_kb(), 0
    sampler = TrainBatches(TokenShards(files), 64, 12, seed=0)
    for k in range(batches):
        sampler.batch(k)
        if k % 50 == 0:
            peak_anon = max(peak_anon, anon_kb())
    peak_anon = max(peak_anon, anon_kb())
    return {"anon_mb": (peak_anon - base_anon) / 1024, "rss_mb": (hwm_kb() - base_hwm) / 1024}


def memory(directory: Path, n: int, batches: int, fresh: bool = True) -> dict[str, float]:
    if not fresh:  # --tiny: in this process (the code path, not a figure)
        return child_memory(str(directory), n, batches)
    proc = subprocess.run([sys.executable, __file__, "--child", str(directory), str(n), str(batches)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="3 shards of 1 MB, 20 batches: seconds")
    p.add_argument("--shards", type=int, default=100)
    p.add_argument("--mb", type=float, default=100.0, help="MB per shard")
    p.add_argument("--batches", type=int, default=2000)
    p.add_argument("--steps", type=int, default=30, help="quick-preset steps timed")
    p.add_argument("--tmp", default=None, help="where the sparse shards go (default: the system's temp dir)")
    p.add_argument("--out", default=None)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return print(json.dumps(child_memory(args.child[0], int(args.child[1]), int(args.child[2]))))
    if args.tiny:
        args.shards, args.mb, args.batches, args.steps = 3, 1.0, 20, 3
    info = C.machine_info()
    print(C.machine_line(info))
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        step = quick_step(args.steps)
        cost = costs(Path(tmp), args.shards, args.mb, args.batches)
        mem = {n: memory(Path(tmp), n, args.batches, fresh=not args.tiny) for n in (1, args.shards)}
    rows = [[name, f"{1e6 * s:.1f}", f"{100 * s / step:.3f}%"] for name, s in cost.items()]
    print(f"[bench] quick-preset step: {1e3 * step:.2f} ms (median of {args.steps})")
    print(C.table(["loader", "us/batch", "of a step"], rows))
    print(C.table(["shards", "anon MB", "RSS MB"], [[n, f"{m['anon_mb']:.1f}", f"{m['rss_mb']:.1f}"] for n, m in mem.items()]))
    growth = mem[args.shards]["anon_mb"] - mem[1]["anon_mb"]
    worst = max(cost.values()) / step
    goals = {"cost_le_1pct": worst <= 0.01, "memory_growth_le_50mb": growth <= 50}
    print(f"[bench] worst loader cost {100 * worst:.3f}% of a step (goal <= 1%): {'met' if goals['cost_le_1pct'] else 'MISSED'}; "
          f"memory 1 -> {args.shards} shards +{growth:.1f} MB anon (goal <= 50 MB): "
          f"{'met' if goals['memory_growth_le_50mb'] else 'MISSED'}")
    result = {"machine": info, "args": vars(args), "step_s": step, "batch_s": cost, "memory_mb": mem, "goals": goals}
    path = C.write_results("loader", result, args.out)
    print(f"[bench] wrote {path}")
    return result


if __name__ == "__main__":
    main()
