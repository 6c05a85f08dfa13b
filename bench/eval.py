"""Multiple-choice scoring speed: gptlab's native scorer against lm-evaluation-harness's `hf` model, on
the same weights (a random GPT-2 124M-shaped model, exported with gptlab.hf), the same items and the
same machine, in one run. Goal: native items/s >= 1.5x the harness's (stretch 2x) at no more memory.

Both score every (context, " " + choice) pair of the items and must agree (max |difference| of the
log-likelihoods is reported). The harness runs its own `loglikelihood` (its tokenization, sorting and
batching, `--batch-size` sequences per forward); gptlab packs each item's context and choices into one
sequence (`--native-batch-size` items per forward, by default `--batch-size`; the output head runs
only where a continuation token is predicted, so it holds less than the harness's logits). Memory:
the peak CUDA memory allocated while scoring on a GPU; on a CPU the peak resident memory above what
the process held before scoring (sampled every 5 ms); and the weights' bytes of each model.

Items: --task hellaswag (the official file, in $GPTLAB_DATA_DIR/eval/), the path of a task file, or by
default made-up HellaSwag-shaped items (a ~60-token context and four ~25-token endings).

Timing: after a warm-up of both on the first few items, `--repeats` rounds each score all items with
both scorers, alternating which goes first, so that a change in the machine's load falls on both; the
seconds are each scorer's median, the ratio the median of the rounds' ratios (their range is printed).
The defaults (64 items, 3 rounds) are sized for a few minutes on a 2-core CPU.

    python bench/eval.py                         # GPT-2 124M shape, 64 made-up items, 3 rounds
    python bench/eval.py --task hellaswag --items 1000 --device cuda
    python bench/eval.py --tiny                  # a smoke run of seconds (the test suite runs it)

Writes bench/results/eval.json (or --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (sys.path and the tiktoken cache)
from _common import machine_info, machine_line, table, write_results

import torch

WORDS = ("the a man woman dog child ball kitchen water walks runs picks up puts down slowly then while "
         "after before into onto with without quickly carefully large small red blue green house street car "
         "table chair door window garden tree flower book phone camera guitar river mountain").split()


def made_up_items(n: int, seed: int, ctx_words: int = 45, end_words: int = 18):
    from gptlab.eval.tasks import CHOICE, Item, Task

    rnd = random.Random(seed)
    words = lambda k: " ".join(rnd.choice(WORDS) for _ in range(k))  # noqa: E731
    items = [Item(words(rnd.randint(ctx_words // 2, ctx_words * 3 // 2)).capitalize() + ".",
                  [words(rnd.randint(end_words // 2, end_words * 3 // 2)) + "." for _ in range(4)],
                  rnd.randrange(4)) for _ in range(n)]
    return Task("made_up", CHOICE, items)


class PeakMemory:
    """Peak memory while the block runs: CUDA bytes allocated, or resident bytes above the start."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            import psutil

            proc = psutil.Process()
            self._base = proc.memory_info().rss

            def sample():
                while not self._stop.wait(0.005):
                    self.peak = max(self.peak, proc.memory_info().rss - self._base)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop.set()
            self._thread.join()


def rounds(scorers: dict[str, Callable[[], Any]], device: torch.device, repeats: int) -> dict[str, dict]:
    """Each scorer run `repeats` times, the scorers taking turns (round r starts with scorer r mod n):
    per scorer its seconds of each round, its last result and its peak memory bytes over the rounds."""
    names = list(scorers)
    out = {name: {"seconds": [], "result": None, "peak": 0} for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            with PeakMemory(device) as mem:
                started = time.perf_counter()
                out[name]["result"] = scorers[name]()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                out[name]["seconds"].append(time.perf_counter() - started)
            out[name]["peak"] = max(out[name]["peak"], mem.peak)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default=None, help="hellaswag, lambada or a .jsonl task file (default: made-up items)")
    p.add_argument("--items", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward of the harness")
    p.add_argument("--native-batch-size", type=int, default=None,
                   help="items per forward of the native scorer (default: --batch-size)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--repeats", type=int, default=3, help="rounds of both scorers over all items")
    p.add_argument("--warm-up-items", type=int, default=8, help="items each scorer scores once before timing")
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--n-embd", type=int, default=768)
    p.add_argument("--n-head", type=int, default=12)
    p.add_argument("--tiny", action="store_true", help="a smoke run of seconds: a 1-layer model, 8 items")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.tiny:
        args.items, args.n_layer, args.n_embd, args.n_head, args.repeats, args.batch_size = 8, 1, 16, 2, 1, 4
        args.warm_up_items = 0
    native_batch = args.native_batch_size or args.batch_size

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from gptlab.data.tokenizers import BPETokenizer
    from gptlab.eval import load_task, score_task
    from gptlab.hf.convert import export_hf
    from gptlab.loading import DTYPES, pick_device
    from gptlab.models import build_model

    info = machine_info()
    print(machine_line(info))
    device, dtype = pick_device(args.device), DTYPES[args.dtype]
    task = load_task(args.task, limit=args.items) if args.task else made_up_items(args.items, seed=0)
    tokenizer = BPETokenizer("gpt2")
    torch.manual_seed(0)
    model = build_model(dict(vocab_size=50257, block_size=1024, n_layer=args.n_layer, n_head=args.n_head,
                             n_embd=args.n_embd)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model, Path(tmp) / "hf", tokenizer)
        hf = HFLM(pretrained=str(Path(tmp) / "hf"), batch_size=args.batch_size, device=str(device),
                  dtype=args.dtype)
    model.to(device=device, dtype=dtype)
    pairs = [(item.context, task.continuation(c)) for item in task.items for c in item.choices]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]

    def native_on(t):
        with torch.inference_mode():
            return score_task(model, tokenizer, t, native_batch)

    warm = sum(len(item.choices) for item in task.items[:args.warm_up_items])
    if warm:  # first calls pay for allocations and kernel choices
        native_on(dataclasses.replace(task, items=task.items[:args.warm_up_items]))
        hf.loglikelihood(requests[:warm], disable_tqdm=True)
    timed = rounds({"native": lambda: native_on(task),
                    "harness": lambda: hf.loglikelihood(requests, disable_tqdm=True)}, device, args.repeats)
    native_s, harness_s = (statistics.median(timed[k]["seconds"]) for k in ("native", "harness"))
    native, harness = timed["native"]["result"], timed["harness"]["result"]
    native_mem, harness_mem = timed["native"]["peak"], timed["harness"]["peak"]
    ratios = [h / n for h, n in zip(timed["harness"]["seconds"], timed["native"]["seconds"])]
    ours = [s[0] for item_scores in native for s in item_scores]
    diff = max(abs(a - b[0]) for a, b in zip(ours, harness))
    n = len(task.items)
    weights = {name: sum(t.numel() * t.element_size() for t in m.state_dict().values())
               for name, m in (("native", model), ("harness", hf.model))}
    rows = [["gptlab native", f"{n / native_s:.1f}", f"{native_s:.3f}", f"{native_mem / 2**20:.1f}",
             f"{weights['native'] / 2**20:.1f}"],
            ["harness hf", f"{n / harness_s:.1f}", f"{harness_s:.3f}", f"{harness_mem / 2**20:.1f}",
             f"{weights['harness'] / 2**20:.1f}"]]
    print(table(["scorer", "items/s", "seconds", "peak MiB", "weights MiB"], rows))
    ratio = statistics.median(ratios)
    print(f"[bench] {n} items ({len(pairs)} continuations) on {device} ({args.dtype}): native/harness items/s "
          f"= {ratio:.2f}x (goal >= 1.5x; {len(ratios)} rounds, {min(ratios):.2f}x..{max(ratios):.2f}x), "
          f"peak memory {native_mem / 2**20:.1f} vs {harness_mem / 2**20:.1f} MiB; "
          f"max |log-likelihood difference| {diff:.2e}")
    result = {"machine": info, "args": vars(args), "items": n, "continuations": len(pairs),
              "native": {"seconds": native_s, "items_per_s": n / native_s, "peak_bytes": native_mem,
                         "round_seconds": timed["native"]["seconds"]},
              "harness": {"seconds": harness_s, "items_per_s": n / harness_s, "peak_bytes": harness_mem,
                          "round_seconds": timed["harness"]["seconds"]},
              "speedup": ratio, "round_speedups": ratios, "max_abs_ll_diff": diff, "weights_bytes": weights}
    print(f"[bench] wrote {write_results('eval', result, args.out)}")
    return result


if __name__ == "__main__":
    main()
