"""Generation speed with and without the key/value cache (gptlab.sampling.generate).

The model is conf/model/<--model>.yaml (default baby_shakespeare: GPT 6 layers / 6 heads / 384,
block 256) with vocab 65, randomly initialised under a fixed seed, eval mode, fp32, no grad. The
prompt is one token. For every length both sides run in this process, alternating which goes first
from repeat to repeat (so slow drift of the machine cancels); the table shows the median of the
repeats and the speedup = no-cache time / cache time.

    python bench/generate.py                       # 256, 500, 1000 new tokens, 3 repeats
    python bench/generate.py --tiny                # seconds: a 2-layer model of block 16, past its block

Writes bench/results/generate.json (or --out).
"""

from __future__ import annotations

import argparse
import statistics
import time

import _common as C
import torch

from gptlab.models import build_model
from gptlab.sampling import generate


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", default="256,500,1000", help="comma-separated lengths (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per length and side (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--batch", type=int, default=1, help="sequences generated at once (default: %(default)s)")
    p.add_argument("--model", default="baby_shakespeare", help="a conf/model/*.yaml name (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=65, help="vocabulary (65: tiny Shakespeare chars)")
    p.add_argument("--sample", action="store_true",
                   help="sample (temperature 1, a torch.Generator seeded the same for both sides) instead of greedy")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--warmup-tokens", type=int, default=8, help="untimed warm-up generation per side")
    p.add_argument("--tiny", action="store_true", help="seconds: 2 layers of 32 channels, block 16, 8 and 24 new "
                   "tokens, 2 repeats (checks the code paths; the figures mean nothing)")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/generate.json)")
    args = p.parse_args(argv)
    if args.tiny:
        args.new_tokens, args.repeats, args.warmup_tokens = "8,24", 2, 2
    return args


TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16)


def load_model(name: str, vocab_size: int, seed: int, tiny: bool = False) -> torch.nn.Module:
    cfg = C.model_config(name, vocab_size=vocab_size, **(TINY if tiny else {}))
    torch.manual_seed(seed)
    model = build_model(cfg)
    model.eval()
    return model


def timed_generate(model, prompt, n: int, use_cache: bool, sample: bool, seed: int) -> tuple[float, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed) if sample else None
    t0 = time.perf_counter()
    with torch.no_grad():
        out = generate(model, prompt, n, greedy=not sample, temperature=1.0, use_cache=use_cache, generator=gen)
    return time.perf_counter() - t0, out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = C.int_list(args.new_tokens)
    model = load_model(args.model, args.vocab_size, args.seed, args.tiny)
    block = model.config.block_size
    info = C.machine_info()
    print(f"[bench] {C.machine_line(info)}")
    print(
        f"[bench] generate: {args.model} ({model.num_params():,} params, block {block}), batch {args.batch}, "
        f"1-token prompt, fp32, {'sampling (fixed seed)' if args.sample else 'greedy'}, {args.repeats} repeat(s)"
    )
    prompt = torch.zeros((args.batch, 1), dtype=torch.long)

    # warm-up: first calls allocate and pick kernels
    for use_cache in (True, False):
        timed_generate(model, prompt, args.warmup_tokens, use_cache, args.sample, args.seed)

    results = []
    rows = []
    for n in lengths:
        times = {True: [], False: []}
        outputs = {}
        for r in range(args.repeats):
            order = (True, False) if r % 2 == 0 else (False, True)
            for use_cache in order:
                dt, out = timed_generate(model, prompt, n, use_cache, args.sample, args.seed)
                times[use_cache].append(dt)
                outputs[use_cache] = out
        t_cache = statistics.median(times[True])
        t_full = statistics.median(times[False])
        # Until the sequence outgrows block_size both paths compute the same logits, so the first
        # min(n, block) new tokens should agree (an argmax tie broken differently by rounding aside).
        same_upto = min(n, block)
        a, b = outputs[True][:, 1 : 1 + same_upto], outputs[False][:, 1 : 1 + same_upto]
        agree = bool(torch.equal(a, b))
        first_diff = None if agree else int((a != b).any(dim=0).nonzero()[0, 0])
        speedup = t_full / t_cache
        tokens = n * args.batch
        results.append(
            {
                "new_tokens": n,
                "cache_s": times[True],
                "no_cache_s": times[False],
                "cache_median_s": t_cache,
                "no_cache_median_s": t_full,
                "cache_tokens_per_s": tokens / t_cache,
                "no_cache_tokens_per_s": tokens / t_full,
                "speedup_cache_over_no_cache": speedup,
                "outputs_agree_first_tokens": same_upto,
                "outputs_agree": agree,
                "first_disagreement": first_diff,
            }
        )
        rows.append(
            [
                n,
                f"{t_cache:.3f}",
                f"{tokens / t_cache:,.1f}",
                f"{t_full:.3f}",
                f"{tokens / t_full:,.1f}",
                f"{speedup:.2f}x",
                f"yes ({same_upto})" if agree else f"NO (token {first_diff})",
            ]
        )
        print(f"[bench]   {n} tokens: cache {t_cache:.3f}s, no cache {t_full:.3f}s", flush=True)

    print()
    print(
        C.table(
            ["new tokens", "cache s", "cache tok/s", "no-cache s", "no-cache tok/s", "cache/no-cache",
             "same tokens"],
            rows,
        )
    )
    goal = None
    at_1000 = [r for r in results if r["new_tokens"] == 1000]
    if at_1000:
        s = at_1000[0]["speedup_cache_over_no_cache"]
        goal = {"target": ">= 5x at 1000 tokens", "speedup": s, "met": s >= 5.0}
        print(f"\ngoal >= 5x at 1000 new tokens: {s:.2f}x -> {'MET' if s >= 5 else 'NOT MET'}")
    print("speedup = median no-cache time / median cache time (same process, alternating order)")
    data = {
        "benchmark": "generate",
        "args": vars(args),
        "machine": info,
        "model": {"name": args.model, "params": model.num_params(), "block_size": block,
                  "n_layer": model.config.n_layer, "n_head": model.config.n_head, "n_embd": model.config.n_embd,
                  "vocab_size": model.config.vocab_size, "dtype": "float32"},
        "results": results,
        "goal": goal,
    }
    path = C.write_results("generate", data, args.out)
    print(f"results: {path}")
    return data


if __name__ == "__main__":
    main()
