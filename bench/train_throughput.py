"""Training throughput: gptlab through the Lightning Trainer vs a minimal raw PyTorch loop.

Both sides train the same model (same config and seed, so the same initial weights: checked), on the
same batches (TrainBatches(...).batch(k), k = 0..N-1, of tiny Shakespeare char), with the same
optimizer (AdamW with gptlab's param groups and settings from conf/optim/adamw.yaml, fused=True as on the CPU,
gradient clipping at 1.0, the schedule of gptlab.training.optim) and the same per-step RNG
seeding as LanguageModel.on_train_batch_start (so dropout masks, and therefore losses, match too).

A step's time is the time from the start of one training step to the start of the next (for
Lightning: a Callback's on_train_batch_start to the next one; for the raw loop: the top of one
iteration to the next), so it includes producing the batch, forward, backward, clipping, the
optimizer and scheduler steps and, for Lightning, its hooks, logging and dataloader. The first
--warmup steps of every run are left out. Runs alternate in an ABBA order (raw, lightning,
lightning, raw, ...) so that slow drift of the machine cancels; the table shows the median over all
steady-state steps of all rounds, and

    Lightning overhead % = (lightning median ms/step / raw median ms/step - 1) * 100

MFU = model.flops_per_token(block_size) * tokens/s / peak FLOP/s. The peak is --peak-tflops or, by
default, an estimate: the best time of a large matmul (fp32, or bf16 for --precision bf16-mixed)
on this CPU with the same number of threads. Say which when quoting an MFU.

    python bench/train_throughput.py --preset cpu_quick
    python bench/train_throughput.py --preset baby --batch 12
    python bench/train_throughput.py --sweep-defaults        # CPU defaults, cpu_quick, raw loop
    python bench/train_throughput.py --tiny                  # seconds: 4 steps per side, one round
    python bench/train_throughput.py --health-overhead --preset cpu_quick --rounds 6   # bench/health.py

Writes bench/results/train_throughput-<preset>-b<batch>-<precision>[-compile].json, or
bench/results/train_throughput-sweep.json for --sweep-defaults (or --out).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import shutil
import statistics
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any

import _common as C
import numpy as np
import torch
import torch.nn.functional as F
import yaml

PRESETS = {
    # name: (conf/model yaml, default batch, default steps, default warmup)
    "cpu_quick": ("gpt_micro", 12, 200, 20),  # 4 layers / 4 heads / 128, block 64
    "baby": ("baby_shakespeare", 12, 30, 5),  # 6 layers / 6 heads / 384, block 256
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: cpu_quick "
                   "(--health-overhead: both)")
    p.add_argument("--health-overhead", action="store_true", help="instead: the health statistics' overhead, "
                   "interleaved against the same run without them (bench/health.py: --preset, --rounds, --steps, "
                   "--warmup, --tiny and --out go to it)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 12; baby is also measured at 64)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: 200 cpu_quick, 30 baby, 12 baby with batch > 16)")
    p.add_argument("--warmup", type=int, default=None, help="steps left out at the start of each run "
                   "(default: 20 cpu_quick, 5 baby, 3 baby with batch > 16; raise it with --compile)")
    p.add_argument("--rounds", type=int, default=None, help="ABBA rounds; each runs both sides once (default: 2; "
                   "--health-overhead: 4)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model on both sides")
    p.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true",
                   help="Lightning precision; the raw loop uses torch.autocast('cpu', bfloat16, cache_enabled=False) for bf16-mixed, as Lightning does")
    p.add_argument("--num-workers", type=int, default=0, help="dataloader workers on the Lightning side")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak FLOP/s for MFU in TFLOP/s (default: estimated with a large matmul)")
    p.add_argument("--peak-size", type=int, default=2048, help="matrix size of the peak estimate (default: 2048)")
    p.add_argument("--data-steps", type=int, default=200, help="batches timed in the standalone data-cost check")
    p.add_argument("--sweep-defaults", action="store_true",
                   help="instead: ms/step of the alternatives to the CPU defaults on cpu_quick (raw loop; "
                        "num_workers through Lightning)")
    p.add_argument("--no-raw-reseed", action="store_true",
                   help="leave the per-step torch.manual_seed out of the raw loop (then only Lightning pays it and "
                        "dropout masks differ, so losses match only for dropout 0, e.g. cpu_quick)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--data-dir", default=None,
                   help="prepared-corpus cache (default: a temporary directory, removed at the end)")
    p.add_argument("--tiny", action="store_true", help="seconds: cpu_quick, 4 steps per run (1 left out), one "
                   "round, a small peak estimate (checks the code paths; the figures mean nothing)")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/train_throughput-....json)")
    args = p.parse_args(argv)
    if args.health_overhead:
        return args
    args.preset, args.rounds = args.preset or "cpu_quick", args.rounds or 2
    if args.tiny:
        if args.sweep_defaults:
            p.error("--tiny checks the comparison; --sweep-defaults has no tiny mode")
        args.steps, args.warmup, args.rounds, args.data_steps, args.peak_size = 4, 1, 1, 5, 128
    return args


# -- configuration ----------------------------------------------------------------------------------
@dataclass
class Spec:
    preset: str
    model_cfg: dict[str, Any]
    optim_cfg: dict[str, Any]
    block: int
    batch: int
    seed: int
    data_dir: str
    tokens: np.ndarray | None = None
    flops_per_token: int = 0
    params: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def make_spec(preset: str, batch: int | None, seed: int, data_dir: str) -> Spec:
    model_name, default_batch, _, _ = PRESETS[preset]
    model_cfg = C.model_config(model_name, vocab_size=65)  # tiny Shakespeare chars
    optim_cfg = yaml.safe_load((C.ROOT / "conf" / "optim" / "adamw.yaml").read_text())
    return Spec(preset, model_cfg, optim_cfg, model_cfg["block_size"], batch or default_batch, seed, data_dir)


def make_datamodule(spec: Spec, num_workers: int = 0):
    from gptlab.data.datamodule import TokenDataModule

    return TokenDataModule(
        path=str(C.SHAKESPEARE),
        data_dir=spec.data_dir,
        tokenizer="char",
        block_size=spec.block,
        batch_size=spec.batch,
        seed=spec.seed,
        num_workers=num_workers,
    )


def load_data(spec: Spec) -> None:
    from gptlab.models import build_model

    dm = make_datamodule(spec)
    dm.prepare_data()
    dm.setup("fit")
    if dm.vocab_size != spec.model_cfg["vocab_size"]:
        spec.model_cfg["vocab_size"] = dm.vocab_size
    spec.tokens = dm.train_tokens
    spec.extra["tokenizer_state"] = dm.tokenizer.state_dict()
    model = build_model(dict(spec.model_cfg))
    spec.flops_per_token = model.flops_per_token(spec.block)
    spec.params = model.num_params()


def same_init(spec: Spec) -> bool:
    """Does the raw side's model start from the same weights as LanguageModel's?"""
    from gptlab.models import build_model
    from gptlab.training.module import LanguageModel

    torch.manual_seed(spec.seed)
    raw = build_model(dict(spec.model_cfg))
    torch.manual_seed(spec.seed)
    lit = LanguageModel(model=dict(spec.model_cfg), optim=dict(spec.optim_cfg), seed=spec.seed).model
    a, b = raw.state_dict(), lit.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def step_seed(seed: int, k: int) -> int:
    # what LanguageModel.on_train_batch_start does (rank 0, micro-step k)
    return int(np.random.SeedSequence([seed, 0, k]).generate_state(1)[0])


# -- the raw loop -----------------------------------------------------------------------------------
@contextlib.contextmanager
def manual_attention():
    """Swap torch's fused scaled_dot_product_attention for the explicit softmax(QK^T / sqrt(d) + causal
    mask) V (what nanoGPT falls back to without SDPA), to measure what SDPA buys."""
    sdpa = F.scaled_dot_product_attention

    def manual(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **_):
        t, s = q.size(-2), k.size(-2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        if is_causal:
            keep = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
            att = att.masked_fill(~keep, float("-inf"))
        att = F.dropout(F.softmax(att, dim=-1), dropout_p) if dropout_p else F.softmax(att, dim=-1)
        return att @ v

    F.scaled_dot_product_attention = manual
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def run_raw(spec: Spec, steps: int, warmup: int, compile: bool = False, precision: str = "32-true",
            fused: bool = True, reseed: bool = True, attention: str = "sdpa") -> dict[str, Any]:
    if attention == "manual":
        with manual_attention():
            return run_raw(spec, steps, warmup, compile, precision, fused, reseed)
    from gptlab.data.datasets import TrainBatches
    from gptlab.models import build_model
    from gptlab.training.optim import OptimConfig, ParamRoles, build_optimizer, build_schedule, param_groups

    torch.manual_seed(spec.seed)
    model = build_model(dict(spec.model_cfg))
    model.train()
    if compile:
        model.compile()  # what LanguageModel.configure_model does
    # the LightningModule's own parameter groups, optimizer and schedule
    cfg = OptimConfig(**spec.optim_cfg)
    opt = build_optimizer(param_groups(list(model.named_parameters()), ParamRoles.of(model), cfg), cfg, fused)
    sched = build_schedule(opt, cfg, steps)
    data = TrainBatches(spec.tokens, spec.block, spec.batch, seed=spec.seed)
    # cache_enabled=False: what Lightning's MixedPrecision plugin passes (and a different value would
    # make a compiled model recompile when both sides run in one process)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)) \
        if precision == "bf16-mixed" else contextlib.nullcontext

    t_iter, batch_s, losses = [], [], []
    t_start = time.perf_counter()
    for k in range(steps):
        t0 = time.perf_counter()
        t_iter.append(t0)
        x, y, _ = data.batch(k)
        batch_s.append(time.perf_counter() - t0)
        if reseed:
            torch.manual_seed(step_seed(spec.seed, k))
        opt.zero_grad(set_to_none=True)
        with autocast():
            logits = model(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.detach())
    t_iter.append(time.perf_counter())
    periods = [t_iter[i + 1] - t_iter[i] for i in range(warmup, steps - 1)]
    return {
        "side": "raw",
        "periods_s": periods,
        "batch_s": batch_s[warmup : steps - 1],
        "losses": [float(v) for v in losses],
        "wall_s": t_iter[-1] - t_start,
    }


# -- the Lightning path -----------------------------------------------------------------------------
def run_lightning(spec: Spec, steps: int, warmup: int, compile: bool = False, precision: str = "32-true",
                  num_workers: int = 0) -> dict[str, Any]:
    import lightning as L

    from gptlab.training.module import LanguageModel

    class StepTimer(L.Callback):
        def __init__(self):
            self.starts, self.ends, self.losses = [], [], []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.starts.append(time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.ends.append(time.perf_counter())
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.losses.append(loss.detach())

    torch.manual_seed(spec.seed)  # train.py: L.seed_everything(cfg.seed) before building the module
    module = LanguageModel(model=dict(spec.model_cfg), optim=dict(spec.optim_cfg),
                           tokenizer=spec.extra.get("tokenizer_state"), seed=spec.seed, compile=compile)
    dm = make_datamodule(spec, num_workers=num_workers)  # fresh: its sampler state starts at batch 0
    timer = StepTimer()
    root = tempfile.mkdtemp(prefix="gptlab-bench-lightning-")
    try:
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            precision=precision,
            max_steps=steps,
            max_epochs=-1,
            val_check_interval=steps + 1,  # never inside the run
            check_val_every_n_epoch=None,
            limit_val_batches=0,  # nor at the end (LanguageModel stops via should_stop at max_steps)
            num_sanity_val_steps=0,
            gradient_clip_val=1.0,
            accumulate_grad_batches=1,
            log_every_n_steps=10,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[timer],
            default_root_dir=root,
        )
        t0 = time.perf_counter()
        trainer.fit(module, datamodule=dm)
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(root, ignore_errors=True)
    s, e = timer.starts, timer.ends
    if len(s) != steps:
        raise RuntimeError(f"Lightning ran {len(s)} steps, expected {steps}")
    return {
        "side": "lightning",
        "periods_s": [s[i + 1] - s[i] for i in range(warmup, steps - 1)],
        "busy_s": [e[i] - s[i] for i in range(warmup, steps - 1)],
        "between_s": [s[i + 1] - e[i] for i in range(warmup, steps - 1)],
        "losses": [float(v) for v in timer.losses],
        "wall_s": wall,
    }


# -- small measurements ------------------------------------------------------------------------------
def estimate_peak_flops(dtype: torch.dtype, n: int, reps: int = 5) -> float:
    """Best-of-`reps` FLOP/s of an n x n x n matmul: a practical peak for this CPU, threads and dtype."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    c = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=c)  # warm-up
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def data_cost(spec: Spec, n: int) -> dict[str, float]:
    """Standalone: seconds per TrainBatches.batch(k) and per LanguageModel-style reseed."""
    from gptlab.data.datasets import TrainBatches

    data = TrainBatches(spec.tokens, spec.block, spec.batch, seed=spec.seed)
    for k in range(5):
        data.batch(k)
    times, reseed = [], []
    for k in range(n):
        t0 = time.perf_counter()
        data.batch(k)
        t1 = time.perf_counter()
        torch.manual_seed(step_seed(spec.seed, k))
        reseed.append(time.perf_counter() - t1)
        times.append(t1 - t0)
    return {"batch_median_s": statistics.median(times), "reseed_median_s": statistics.median(reseed)}


def prime(spec: Spec, steps: int, warmup: int, **kwargs) -> None:
    """A short untimed raw run first, so that one-off costs of the process (lazy initialisation, first
    page faults on the token file, loading compiled kernels) do not land on the first timed run."""
    run_raw(spec, min(steps, warmup + 2), warmup, **kwargs)


def quiet_lightning() -> None:
    import lightning.pytorch  # noqa: F401  (sets its loggers' levels on import: import first, then override)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*`limit_val_batches=0`.*")
    warnings.filterwarnings("ignore", message=r".*val_dataloader.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def abba(rounds: int, a: str, b: str) -> list[str]:
    order = []
    for r in range(rounds):
        order += [a, b] if r % 2 == 0 else [b, a]
    return order


# -- the main comparison ----------------------------------------------------------------------------
def compare(args, spec: Spec, steps: int, warmup: int) -> dict[str, Any]:
    threads = torch.get_num_threads()
    print(
        f"[bench] preset {spec.preset}: {spec.model_cfg['n_layer']} layers / {spec.model_cfg['n_head']} heads / "
        f"{spec.model_cfg['n_embd']}, block {spec.block}, batch {spec.batch}, {spec.params:,} params, "
        f"dropout {spec.model_cfg['dropout']}; precision {args.precision}, compile {'on' if args.compile else 'off'}, "
        f"{threads} threads; {steps} steps per run, first {warmup} left out, {args.rounds} ABBA round(s); raw loop "
        f"{'without' if args.no_raw_reseed else 'with'} the per-step reseed"
    )
    init_ok = same_init(spec)
    print(f"[bench] same initial weights on both sides: {init_ok}")

    peak_dtype = torch.bfloat16 if args.precision == "bf16-mixed" else torch.float32
    if args.peak_tflops:
        peak, peak_how = args.peak_tflops * 1e12, "given (--peak-tflops)"
    else:
        peak = estimate_peak_flops(peak_dtype, args.peak_size)
        peak_how = (f"ESTIMATED: best of 5 {args.peak_size}^3 {str(peak_dtype).split('.')[-1]} matmuls on this CPU "
                    f"with {threads} threads (pass --peak-tflops for a datasheet figure)")
    print(f"[bench] peak {peak / 1e12:.3f} TFLOP/s, {peak_how}")

    dc = data_cost(spec, args.data_steps)
    prime(spec, steps, warmup, compile=args.compile, precision=args.precision)
    runs = {"raw": [], "lightning": []}
    for side in abba(args.rounds, "raw", "lightning"):
        if side == "raw":
            r = run_raw(spec, steps, warmup, compile=args.compile, precision=args.precision,
                        reseed=not args.no_raw_reseed)
        else:
            r = run_lightning(spec, steps, warmup, compile=args.compile, precision=args.precision,
                              num_workers=args.num_workers)
        runs[side].append(r)
        print(f"[bench]   {side:9s} run: median {ms(statistics.median(r['periods_s']))} ms/step "
              f"(wall {r['wall_s']:.1f}s)", flush=True)

    tokens_per_step = spec.batch * spec.block
    flops_per_step = spec.flops_per_token * tokens_per_step
    sides = {}
    for side, rs in runs.items():
        periods = [p for r in rs for p in r["periods_s"]]
        st = C.summary(periods)
        med = st["median"]
        sides[side] = {
            "ms_per_step": C.summary([p * 1e3 for p in periods]),
            "per_round_median_ms": [statistics.median(r["periods_s"]) * 1e3 for r in rs],
            "tokens_per_s": tokens_per_step / med,
            "tokens_per_s_mean": tokens_per_step / st["mean"],
            "mfu": flops_per_step / med / peak,
            "wall_s": [r["wall_s"] for r in rs],
            "losses_first_round": rs[0]["losses"],
        }
        if side == "lightning":
            sides[side]["busy_ms"] = C.summary([p * 1e3 for r in rs for p in r["busy_s"]])
            sides[side]["between_steps_ms"] = C.summary([p * 1e3 for r in rs for p in r["between_s"]])
        else:
            sides[side]["batch_ms"] = C.summary([p * 1e3 for r in rs for p in r["batch_s"]])

    raw_ms = sides["raw"]["ms_per_step"]["median"]
    lit_ms = sides["lightning"]["ms_per_step"]["median"]
    overhead = (lit_ms / raw_ms - 1) * 100
    overhead_mean = (sides["lightning"]["ms_per_step"]["mean"] / sides["raw"]["ms_per_step"]["mean"] - 1) * 100
    batch_ms = sides["raw"]["batch_ms"]["median"]
    between_ms = sides["lightning"]["between_steps_ms"]["median"]
    la, lb = runs["raw"][0]["losses"], runs["lightning"][0]["losses"]
    loss_diff = max(abs(x - y) for x, y in zip(la, lb)) if la and lb else None

    rows = []
    for side in ("raw", "lightning"):
        s = sides[side]
        rows.append([
            side,
            f"{s['ms_per_step']['median']:.2f}",
            f"{s['ms_per_step']['p10']:.2f}-{s['ms_per_step']['p90']:.2f}",
            f"{s['ms_per_step']['mean']:.2f}",
            f"{s['tokens_per_s']:,.0f}",
            f"{s['mfu'] * 100:.1f}%",
            " ".join(f"{v:.2f}" for v in s["per_round_median_ms"]),
        ])
    print()
    print(C.table(["side", "ms/step (median)", "p10-p90", "mean", "tokens/s", "MFU", "per-run medians"], rows))
    print(f"\nLightning overhead: {overhead:+.2f}% (median), {overhead_mean:+.2f}% (mean)  "
          f"-> goal <= 3%: {'MET' if overhead <= 3 else 'NOT MET'}")
    print(f"data: TrainBatches.batch {batch_ms:.3f} ms in the raw loop = {batch_ms / raw_ms * 100:.2f}% of a raw step "
          f"(standalone {dc['batch_median_s'] * 1e3:.3f} ms/batch)")
    print(f"Lightning between steps (dataloader next + hooks + logging + scheduler): {between_ms:.3f} ms = "
          f"{between_ms / lit_ms * 100:.2f}% of its step")
    print(f"per-step reseed (LanguageModel.on_train_batch_start: SeedSequence + torch.manual_seed): "
          f"{dc['reseed_median_s'] * 1e3:.3f} ms = {dc['reseed_median_s'] * 1e3 / lit_ms * 100:.2f}% of a Lightning step; "
          + ("Lightning side only (--no-raw-reseed)" if args.no_raw_reseed else "done on both sides"))
    print(f"loss check (first round): max |loss_raw - loss_lightning| over {len(la)} steps = {loss_diff:.3g}")
    print(f"MFU = {spec.flops_per_token:,} FLOPs/token (model.flops_per_token({spec.block})) x tokens/s / "
          f"{peak / 1e12:.3f} TFLOP/s ({'estimated' if not args.peak_tflops else 'given'})")
    return {
        "preset": spec.preset,
        "model": {k: v for k, v in spec.model_cfg.items()},
        "optim": spec.optim_cfg,
        "params": spec.params,
        "block_size": spec.block,
        "batch_size": spec.batch,
        "tokens_per_step": tokens_per_step,
        "flops_per_token": spec.flops_per_token,
        "threads": threads,
        "steps": steps,
        "warmup": warmup,
        "order": abba(args.rounds, "raw", "lightning"),
        "same_init": init_ok,
        "peak_flops": peak,
        "peak_estimated": not args.peak_tflops,
        "peak_how": peak_how,
        "sides": sides,
        "lightning_overhead_pct": overhead,
        "lightning_overhead_pct_mean": overhead_mean,
        "goal_overhead_le_3pct": overhead <= 3,
        "data": {
            "batch_ms_in_raw_loop": batch_ms,
            "batch_pct_of_raw_step": batch_ms / raw_ms * 100,
            "batch_ms_standalone": dc["batch_median_s"] * 1e3,
            "lightning_between_steps_ms": between_ms,
            "lightning_between_steps_pct": between_ms / lit_ms * 100,
            "reseed_ms": dc["reseed_median_s"] * 1e3,
            "reseed_in_raw_loop": not args.no_raw_reseed,
        },
        "max_abs_loss_diff_first_round": loss_diff,
    }


# -- the sweep of CPU defaults ----------------------------------------------------------------------
def optimizer_step_ms(spec: Spec, reps: int = 200) -> dict[str, float]:
    """The optimizer step alone, foreach vs fused AdamW, interleaved step by step: unlike whole training
    steps this is immune to the machine drifting between runs."""
    from gptlab.models import build_model

    model = build_model(dict(spec.model_cfg))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opts = {k: torch.optim.AdamW(model.parameters(), lr=1e-6, **{k: True}) for k in ("foreach", "fused")}
    times: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(reps):
        for k, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v[reps // 10:]) * 1e3 for k, v in times.items()}


def sweep(args, spec: Spec, steps: int, warmup: int) -> dict[str, Any]:
    base_threads = torch.get_num_threads()
    variants = [
        # name, path, kwargs, threads, what it changes
        ("baseline", "raw", {}, None, f"AdamW fused, SDPA, eager, fp32, {base_threads} threads"),
        ("adamw foreach", "raw", {"fused": False}, None, "AdamW(foreach=True) instead of fused"),
        ("manual attention", "raw", {"attention": "manual"}, None, "softmax(QK^T/sqrt(d) + mask) V instead of SDPA"),
        ("compile", "raw", {"compile": True}, None, "model.compile()"),
        ("bf16 autocast", "raw", {"precision": "bf16-mixed"}, None, "torch.autocast('cpu', bfloat16, cache_enabled=False)"),
        ("threads=1", "raw", {}, 1, "torch.set_num_threads(1)"),
        ("threads=2", "raw", {}, 2, "torch.set_num_threads(2)"),
        ("lightning num_workers=0", "lightning", {"num_workers": 0}, None, "baseline of the num_workers pair"),
        ("lightning num_workers=1", "lightning", {"num_workers": 1}, None, "one dataloader worker process"),
    ]
    print(f"[bench] sweep of CPU defaults on cpu_quick (batch {spec.batch}): {steps} steps per run, first {warmup} "
          f"left out, {args.rounds} round(s), order reversed every other round")
    prime(spec, steps, warmup)
    times: dict[str, list[float]] = {v[0]: [] for v in variants}
    errors: dict[str, str] = {}
    for r in range(args.rounds):
        for name, path, kwargs, threads, _ in (variants if r % 2 == 0 else variants[::-1]):
            if name in errors:
                continue
            torch.set_num_threads(threads or base_threads)
            try:
                fn = run_raw if path == "raw" else run_lightning
                res = fn(spec, steps, warmup, **kwargs)
                times[name] += res["periods_s"]
                print(f"[bench]   {name:24s} {ms(statistics.median(res['periods_s']))} ms/step", flush=True)
            except Exception as e:  # e.g. fused AdamW or the compiler unavailable
                errors[name] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                print(f"[bench]   {name:24s} FAILED: {errors[name]}")
                traceback.print_exc(limit=2)
            finally:
                torch.set_num_threads(base_threads)

    base = {"raw": statistics.median(times["baseline"]) if times["baseline"] else None,
            "lightning": statistics.median(times["lightning num_workers=0"])
            if times["lightning num_workers=0"] else None}
    rows, results = [], []
    for name, path, kwargs, threads, what in variants:
        if name in errors or not times[name]:
            rows.append([name, path, "error", "", errors.get(name, "")[:60]])
            results.append({"variant": name, "path": path, "change": what, "error": errors.get(name)})
            continue
        med = statistics.median(times[name])
        rel = med / base[path] if base[path] else float("nan")
        rows.append([name, path, f"{med * 1e3:.2f}", f"{rel:.3f}", what])
        results.append({"variant": name, "path": path, "change": what, "ms_per_step": C.summary(
            [t * 1e3 for t in times[name]]), "ratio_to_baseline": rel})
    print()
    print(C.table(["variant", "path", "ms/step (median)", "x baseline", "change"], rows, left=(0, 1, 4)))
    print("x baseline: raw rows vs 'baseline', lightning rows vs 'lightning num_workers=0' (lower is faster)")
    opt_ms = optimizer_step_ms(spec)
    print(f"optimizer step alone ({spec.params:,} params, interleaved): foreach {opt_ms['foreach']:.2f} ms, "
          f"fused {opt_ms['fused']:.2f} ms ({opt_ms['foreach'] / opt_ms['fused']:.2f}x)")
    return {"preset": "cpu_quick", "batch_size": spec.batch, "steps": steps, "warmup": warmup,
            "base_threads": base_threads, "variants": results, "optimizer_step_ms": opt_ms}


def health_argv(args) -> list[str]:
    """bench/health.py's arguments for --health-overhead."""
    argv = [f"--{k}={v}" for k, v in (("preset", args.preset), ("rounds", args.rounds), ("steps", args.steps),
                                      ("warmup", args.warmup), ("out", args.out)) if v is not None]
    return argv + (["--tiny"] if args.tiny else [])


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.health_overhead:
        import health  # bench/health.py

        return health.main(health_argv(args))
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_lightning()
    preset = "cpu_quick" if args.sweep_defaults else args.preset
    _, _, default_steps, default_warmup = PRESETS[preset]
    if preset == "baby" and (args.batch or 12) > 16:
        default_steps, default_warmup = 12, 3  # batch 64: several seconds per step on a small CPU
    steps = args.steps or default_steps
    warmup = args.warmup if args.warmup is not None else default_warmup
    if steps < warmup + 2:
        raise SystemExit(f"--steps {steps} must be at least --warmup + 2 = {warmup + 2}")
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="gptlab-bench-data-")
    info = C.machine_info()
    print(f"[bench] {C.machine_line(info)}")
    try:
        spec = make_spec(preset, args.batch, args.seed, data_dir)
        load_data(spec)
        data = {"benchmark": "train_throughput", "args": vars(args), "machine": info}
        if args.sweep_defaults:
            data["sweep"] = sweep(args, spec, steps, warmup)
            name = "train_throughput-sweep"
        else:
            data["result"] = compare(args, spec, steps, warmup)
            name = f"train_throughput-{preset}-b{spec.batch}-{args.precision}" + ("-compile" if args.compile else "")
        data["machine_after"] = {"loadavg_1_5_15": C.machine_info(torch_too=False)["loadavg_1_5_15"]}
    finally:
        if not args.data_dir:
            shutil.rmtree(data_dir, ignore_errors=True)
    path = C.write_results(name, data, args.out)
    print(f"results: {path}")
    return data


if __name__ == "__main__":
    main()
