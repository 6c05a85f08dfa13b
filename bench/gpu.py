"""GPU throughput: the baby GPT preset and GPT-2 124M, each through Lightning and through a raw PyTorch
loop, and 1000-token sampling in bfloat16 with and without the KV cache. One run, both sides of every
comparison (most of its time is torch.compile).

    python bench/gpu.py                          # all sections on the GPU
    python bench/gpu.py --only baby,sample       # some of them (baby, gpt2, sample)
    python bench/gpu.py --peak-flops 989e12      # MFU against this peak (default: Lightning's table)
    python bench/gpu.py --device cpu --quick     # tiny sizes, a few steps: checks the code paths on a CPU
    python bench/gpu.py --tiny                   # --quick on the GPU; without CUDA it says so and skips

Sections
  baby    conf/model/baby_shakespeare.yaml (6 layers / 6 heads / 384, block 256, dropout 0.2) on tiny
          Shakespeare characters, batch 64 (experiment=shakespeare_char), bf16-mixed, model.compile=true.
  gpt2    conf/model/gpt2.yaml (124M, block 1024, dropout 0) on tiny Shakespeare in GPT-2 BPE, batch
          16 x 1024 tokens, bf16-mixed, compiled.
  sample  the baby model in bfloat16 weights (sample.py dtype=bfloat16), one sequence, 1000 new tokens,
          top_k 200 at temperature 0.8, KV cache vs recomputing the window, eager (sample.py's default).

Both training sides build the model from the same config and seed, the optimizer from
gptlab.training.optim (AdamW with gptlab's groups and conf/optim/adamw.yaml; foreach, as gptlab picks
under mixed precision with clipping), the warmup + cosine schedule, clipping at 1.0, the same batches
(TrainBatches(...).batch(k), pinned, copied non_blocking) and the per-step reseed of
LanguageModel.on_train_batch_start. The Lightning side is LanguageModel in a Trainer without
logger, progress bar, checkpoints or validation: it measures the module and the loop, not train.py's
callbacks. Training steps are timed as one window per run: synchronize, the steps after --warmup
(which include compiling), synchronize; ms/step = window / steps in it. Runs alternate raw,
lightning, lightning, raw, ... (--rounds); each starts from torch._dynamo.reset() (the inductor
cache on disk makes the later compiles cheap).

    Lightning overhead % = (lightning ms/step / raw ms/step - 1) * 100, medians over the rounds
    MFU = model.flops_per_token(block) x tokens/s / peak FLOP/s of one GPU at the training dtype

The peak is --peak-flops, else Lightning's table (lightning.fabric.utilities.throughput
.get_available_flops), else for a GPU named plainly "NVIDIA H200" (not in that table) the H100 SXM's
dense 989.4 TFLOP/s in bf16/fp16 (the same chip). float32 matmuls may use TF32 here
(torch.set_float32_matmul_precision("high")), on both sides.

Writes bench/results/gpu-<device>[-quick].json (or --out).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import _common as C
import torch
import torch.nn.functional as F
import yaml
from train_throughput import quiet_lightning, step_seed

SECTIONS = ("baby", "gpt2", "sample")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="tiny models and a few steps: checks the code paths")
    p.add_argument("--tiny", action="store_true", help="--quick on --device; skipped (exit status 0) without CUDA")
    p.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections (default: %(default)s)")
    p.add_argument("--precision", choices=["bf16-mixed", "16-mixed", "32-true"], default=None,
                   help="training precision (default: bf16-mixed, 16-mixed on GPUs without bfloat16)")
    p.add_argument("--compile", default=None, help="torch.compile backend for training: inductor, aot_eager, "
                   "eager or none (default: inductor; eager with --device cpu, which skips C++ code generation)")
    p.add_argument("--steps", type=int, default=None, help="baby: steps per run (default: 200; quick: 8)")
    p.add_argument("--warmup", type=int, default=None, help="baby: untimed first steps (default: 20; quick: 2)")
    p.add_argument("--batch", type=int, default=None, help="baby: batch size (default: 64; quick: 8)")
    p.add_argument("--rounds", type=int, default=2, help="baby: raw/lightning rounds, ABBA (default: %(default)s)")
    p.add_argument("--gpt2-steps", type=int, default=None, help="gpt2: steps per run (default: 50; quick: 4)")
    p.add_argument("--gpt2-warmup", type=int, default=None, help="gpt2: untimed first steps (default: 10; quick: 1)")
    p.add_argument("--gpt2-batch", type=int, default=None, help="gpt2: sequences of 1024 (default: 16; quick: 2)")
    p.add_argument("--gpt2-rounds", type=int, default=1, help="gpt2: rounds (default: %(default)s: raw, lightning)")
    p.add_argument("--sample-tokens", type=int, default=None, help="sample: new tokens (default: 1000; quick: 40)")
    p.add_argument("--sample-repeats", type=int, default=3, help="sample: timed runs per side (default: %(default)s)")
    p.add_argument("--peak-flops", type=float, default=None, help="peak FLOP/s of one device for MFU, e.g. 989e12")
    p.add_argument("--data", default=None, help="tiny Shakespeare text (default: $GPTLAB_TEST_DATA or gptlab's cache)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/gpu-<device>[-quick].json)")
    return p.parse_args(argv)


# -- setup ------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One training comparison: what both sides train, and on what."""

    name: str
    model_cfg: dict[str, Any]
    batch: int
    steps: int
    warmup: int
    rounds: int
    tokenizer: str  # "char" or "bpe"
    tokens: Any = None
    flops_per_token: int = 0
    params: int = 0
    results: dict[str, list[dict]] = field(default_factory=lambda: {"raw": [], "lightning": []})


def corpus(arg: str | None) -> str:
    if arg and not os.path.isfile(arg):
        raise SystemExit(f"--data {arg}: no such file")
    return arg or str(C.SHAKESPEARE)


def datamodule(run: Run, path: str, data_dir: str, seed: int, pin: bool):
    from gptlab.data.datamodule import TokenDataModule

    return TokenDataModule(path=path, data_dir=data_dir, tokenizer=run.tokenizer, block_size=run.model_cfg["block_size"],
                           batch_size=run.batch, seed=seed, pin_memory=pin)


def load_tokens(run: Run, path: str, data_dir: str, seed: int) -> None:
    from gptlab.models import build_model

    dm = datamodule(run, path, data_dir, seed, pin=False)
    dm.setup("fit")
    run.model_cfg["vocab_size"] = dm.vocab_size
    run.tokens = dm.train_tokens
    model = build_model(dict(run.model_cfg))
    run.flops_per_token = model.flops_per_token(run.model_cfg["block_size"])
    run.params = model.num_params()


def autocast(device: torch.device, precision: str):
    """What Lightning's MixedPrecision plugin enters around each step (cache_enabled=False)."""
    if precision == "32-true":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reseed(seed: int, k: int, device: torch.device) -> None:
    """LanguageModel.on_train_batch_start: dropout masks from (seed, rank 0, micro-step k)."""
    s = step_seed(seed, k)
    torch.default_generator.manual_seed(s)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index or 0].manual_seed(s)


def optimizer_for(model, run: Run, device: torch.device, precision: str):
    from gptlab.training.optim import OptimConfig, ParamRoles, build_optimizer, build_schedule, fused_by_default, param_groups

    cfg = OptimConfig(**yaml.safe_load((C.ROOT / "conf" / "optim" / "adamw.yaml").read_text()))
    fused = fused_by_default(device, precision, 1.0)
    opt = build_optimizer(param_groups(list(model.named_parameters()), ParamRoles.of(model), cfg), cfg, fused)
    return opt, build_schedule(opt, cfg, run.steps), cfg


# -- the two sides ----------------------------------------------------------------------------------
def run_raw(run: Run, device: torch.device, precision: str, backend: str | None, seed: int) -> dict[str, Any]:
    from gptlab.data.datasets import TrainBatches
    from gptlab.models import build_model

    torch._dynamo.reset()
    torch.manual_seed(seed)
    model = build_model(dict(run.model_cfg)).to(device).train()
    if backend:
        model.compile(backend=backend)  # what LanguageModel.configure_model does
    opt, sched, _ = optimizer_for(model, run, device, precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")
    data = TrainBatches(run.tokens, run.model_cfg["block_size"], run.batch, seed=seed)
    pin = device.type == "cuda"
    losses, t0 = [], 0.0
    for k in range(run.steps):
        if k == run.warmup:
            sync(device)
            t0 = time.perf_counter()
        x, y, _ = data.batch(k)
        if pin:
            x, y = x.pin_memory(), y.pin_memory()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        reseed(seed, k, device)
        with autocast(device, precision):  # as LanguageModel.loss inside Lightning's autocast
            logits = model(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.reshape(-1))
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    sync(device)
    window = time.perf_counter() - t0
    return {"side": "raw", "window_s": window, "ms_per_step": window / (run.steps - run.warmup) * 1e3,
            "losses": [float(v) for v in losses], "max_memory_gb": max_memory_gb(device)}


def run_lightning(run: Run, device: torch.device, precision: str, backend: str | None, seed: int,
                  path: str, data_dir: str) -> dict[str, Any]:
    import lightning as L

    from gptlab.training.module import LanguageModel

    class Window(L.Callback):
        """Synchronize and read the clock at the start of step `warmup` and the end of the last step."""

        def __init__(self):
            self.t0 = self.t1 = 0.0
            self.losses = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == run.warmup:
                sync(device)
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(outputs["loss"].detach())
            if batch_idx == run.steps - 1:
                sync(device)
                self.t1 = time.perf_counter()

    torch._dynamo.reset()
    torch.manual_seed(seed)  # train.py seeds before building the module
    module = LanguageModel(model=dict(run.model_cfg), optim=yaml.safe_load((C.ROOT / "conf" / "optim" / "adamw.yaml").read_text()),
                           seed=seed, compile=backend or False)
    window = Window()
    root = tempfile.mkdtemp(prefix="gptlab-bench-gpu-")
    try:
        trainer = L.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu", devices=[device.index or 0] if device.type == "cuda" else 1,
            precision=precision, max_steps=run.steps, max_epochs=-1, val_check_interval=run.steps + 1,
            check_val_every_n_epoch=None, limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=1.0,
            log_every_n_steps=10, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[window], default_root_dir=root,
        )
        trainer.fit(module, datamodule=datamodule(run, path, data_dir, seed, pin=device.type == "cuda"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if len(window.losses) != run.steps:
        raise RuntimeError(f"Lightning ran {len(window.losses)} steps, expected {run.steps}")
    opt = trainer.optimizers[0]
    return {"side": "lightning", "window_s": window.t1 - window.t0,
            "ms_per_step": (window.t1 - window.t0) / (run.steps - run.warmup) * 1e3,
            "losses": [float(v) for v in window.losses], "max_memory_gb": max_memory_gb(device),
            "optimizer": f"{type(opt).__name__}(fused={bool(opt.defaults.get('fused'))}, "
                         f"foreach={bool(opt.defaults.get('foreach'))})"}


def max_memory_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    gb = torch.cuda.max_memory_allocated(device) / 1024**3
    torch.cuda.reset_peak_memory_stats(device)
    return gb


def compare(run: Run, args, device, precision, backend, peak, path, data_dir) -> dict[str, Any]:
    cfg = run.model_cfg
    print(f"[bench] {run.name}: {cfg['n_layer']} layers / {cfg['n_head']} heads / {cfg['n_embd']}, block "
          f"{cfg['block_size']}, vocab {cfg['vocab_size']}, dropout {cfg['dropout']}, {run.params:,} params; batch "
          f"{run.batch}, {precision}, compile {backend or 'off'}; {run.steps} steps per run, first {run.warmup} untimed",
          flush=True)
    order = []
    for r in range(run.rounds):
        order += ["raw", "lightning"] if r % 2 == 0 else ["lightning", "raw"]
    for side in order:
        t = time.perf_counter()
        res = (run_raw(run, device, precision, backend, args.seed) if side == "raw"
               else run_lightning(run, device, precision, backend, args.seed, path, data_dir))
        run.results[side].append(res)
        print(f"[bench]   {side:9s} {res['ms_per_step']:8.2f} ms/step (run {time.perf_counter() - t:.1f}s)", flush=True)
    tokens_per_step = run.batch * cfg["block_size"]
    sides = {}
    for side, rs in run.results.items():
        ms = statistics.median(r["ms_per_step"] for r in rs)
        tps = tokens_per_step / (ms / 1e3)
        sides[side] = {"ms_per_step": ms, "per_round_ms": [r["ms_per_step"] for r in rs], "tokens_per_s": tps,
                       "mfu": run.flops_per_token * tps / peak if peak else None,
                       "max_memory_gb": rs[-1]["max_memory_gb"], "final_loss": rs[0]["losses"][-1],
                       **({"optimizer": rs[0]["optimizer"]} if "optimizer" in rs[0] else {})}
    la, lb = run.results["raw"][0]["losses"], run.results["lightning"][0]["losses"]
    return {"model": cfg, "params": run.params, "batch": run.batch, "tokens_per_step": tokens_per_step,
            "flops_per_token": run.flops_per_token, "steps": run.steps, "warmup": run.warmup, "order": order,
            "precision": precision, "compile": backend, "sides": sides,
            "lightning_overhead_pct": (sides["lightning"]["ms_per_step"] / sides["raw"]["ms_per_step"] - 1) * 100,
            "max_abs_loss_diff_first_round": max(abs(a - b) for a, b in zip(la, lb))}


# -- sampling ---------------------------------------------------------------------------------------
def bench_sampling(model_cfg: dict, device: torch.device, new_tokens: int, repeats: int, seed: int) -> dict[str, Any]:
    from gptlab.models import build_model
    from gptlab.sampling import generate

    torch.manual_seed(seed)
    dtype = torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
    model = build_model(dict(model_cfg)).to(device=device, dtype=dtype).eval()
    prompt = torch.zeros(1, 1, dtype=torch.long, device=device)

    def timed(use_cache: bool) -> float:
        gen = torch.Generator(device=device).manual_seed(seed)
        sync(device)
        t0 = time.perf_counter()
        out = generate(model, prompt, new_tokens, temperature=0.8, top_k=200, use_cache=use_cache, generator=gen)
        sync(device)
        assert out.shape == (1, new_tokens + 1)
        return time.perf_counter() - t0

    for use_cache in (True, False):  # warm-up: kernels, allocator
        generate(model, prompt, min(new_tokens, 32), use_cache=use_cache)
    times: dict[str, list[float]] = {"kv_cache": [], "recompute": []}
    for r in range(repeats):
        for side in (("kv_cache", "recompute") if r % 2 == 0 else ("recompute", "kv_cache")):
            times[side].append(timed(side == "kv_cache"))
    res = {side: {"median_s": statistics.median(v), "tokens_per_s": new_tokens / statistics.median(v), "runs_s": v}
           for side, v in times.items()}
    res["speedup"] = res["recompute"]["median_s"] / res["kv_cache"]["median_s"]
    res.update(new_tokens=new_tokens, dtype=str(dtype).split(".")[-1], model=model_cfg)
    return res


# -- main -------------------------------------------------------------------------------------------
def gpu_info(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {}
    p = torch.cuda.get_device_properties(device)
    return {"gpu": p.name, "gpu_memory_gb": round(p.total_memory / 1024**3, 1), "capability": f"{p.major}.{p.minor}",
            "cuda": torch.version.cuda, "bf16": torch.cuda.is_bf16_supported()}


def peak_flops(args, device: torch.device, precision: str) -> tuple[float | None, str]:
    if args.peak_flops:
        return args.peak_flops, "given (--peak-flops)"
    from lightning.fabric.utilities.throughput import get_available_flops

    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision, torch.float32)
    if device.type != "cuda":
        return None, "unknown for this device: pass --peak-flops for MFU"
    name = torch.cuda.get_device_name(device)
    flops = get_available_flops(device, dtype)
    if flops:
        return float(flops), f"Lightning's table for {name} at {dtype}"
    if "h200" in name.lower() and dtype in (torch.bfloat16, torch.float16):
        # nvidia-smi calls the SXM part plainly "NVIDIA H200", which Lightning's table lacks; it is the
        # H100 SXM's chip with more memory: the same dense tensor-core rate (NVIDIA's datasheets)
        return 989.4e12, f"{name}: the H100 SXM's dense {dtype} rate (not in Lightning's table)"
    return None, f"unknown for {name}: pass --peak-flops for MFU"


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.tiny:
        if device.type == "cuda" and not torch.cuda.is_available():
            print(f"[bench] gpu --tiny: skipped, no CUDA device here (--device {args.device})")
            return {}
        args.quick = True
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device here; use --device cpu --quick to check the code paths")
    sections = [s for s in args.only.split(",") if s]
    if unknown := set(sections) - set(SECTIONS):
        raise SystemExit(f"--only: unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 for the float32 matmuls that remain
    precision = args.precision or ("16-mixed" if device.type == "cuda" and not torch.cuda.is_bf16_supported()
                                   else "bf16-mixed")
    backend = args.compile or ("eager" if device.type == "cpu" else "inductor")
    backend = None if backend == "none" else backend
    quiet_lightning()
    q = args.quick
    path = corpus(args.data)
    peak, peak_how = peak_flops(args, device, precision)
    info = {**C.machine_info(), **gpu_info(device)}
    print(f"[bench] {C.machine_line(info)}")
    print(f"[bench] device {device}{' ' + info['gpu'] if 'gpu' in info else ''}; peak "
          f"{f'{peak / 1e12:.1f} TFLOP/s' if peak else 'n/a'} ({peak_how}); float32 matmul precision "
          f"{torch.get_float32_matmul_precision()}{'; QUICK: tiny sizes, figures mean nothing' if q else ''}")

    baby_cfg = C.model_config("baby_shakespeare", **(dict(n_layer=2, n_head=2, n_embd=64, block_size=64) if q else {}))
    runs = {
        "baby": Run("baby", baby_cfg, args.batch or (8 if q else 64), args.steps or (8 if q else 200),
                    args.warmup if args.warmup is not None else (2 if q else 20), args.rounds, "char"),
        "gpt2": Run("gpt2-124m", C.model_config("gpt2", **(dict(n_layer=2, n_head=2, n_embd=64, block_size=128) if q else {})),
                    args.gpt2_batch or (2 if q else 16), args.gpt2_steps or (4 if q else 50),
                    args.gpt2_warmup if args.gpt2_warmup is not None else (1 if q else 10), args.gpt2_rounds, "bpe"),
    }
    data: dict[str, Any] = {"benchmark": "gpu", "args": vars(args), "machine": info, "peak_flops": peak,
                            "peak_how": peak_how, "matmul_precision": torch.get_float32_matmul_precision()}
    data_dir = tempfile.mkdtemp(prefix="gptlab-bench-data-")
    started = time.perf_counter()
    try:
        for name in ("baby", "gpt2"):
            if name in sections:
                run = runs[name]
                if run.steps < run.warmup + 1:
                    raise SystemExit(f"{name}: steps ({run.steps}) must exceed warmup ({run.warmup})")
                load_tokens(run, path, data_dir, args.seed)
                data[name] = compare(run, args, device, precision, backend, peak, path, data_dir)
        if "sample" in sections:
            if baby_cfg.get("vocab_size") is None:
                load_tokens(runs["baby"], path, data_dir, args.seed)
            n = args.sample_tokens or (40 if q else 1000)
            print(f"[bench] sample: {n} new tokens from the baby model in bfloat16, KV cache vs recompute", flush=True)
            data["sample"] = bench_sampling(baby_cfg, device, n, args.sample_repeats, args.seed)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    data["wall_s"] = time.perf_counter() - started

    rows = []
    for name in ("baby", "gpt2"):
        for side, s in data.get(name, {}).get("sides", {}).items():
            rows.append([runs[name].name, side, f"{s['ms_per_step']:.2f}", f"{s['tokens_per_s']:,.0f}",
                         f"{s['mfu'] * 100:.1f}%" if s["mfu"] is not None else "n/a",
                         f"{s['max_memory_gb']:.1f}" if s["max_memory_gb"] is not None else "-", f"{s['final_loss']:.3f}"])
    print()
    if rows:
        print(C.table(["run", "side", "ms/step", "tokens/s", "MFU", "max GB", "last loss"], rows, left=(0, 1)))
    for name in ("baby", "gpt2"):
        if name in data:
            d = data[name]
            print(f"{runs[name].name}: Lightning overhead {d['lightning_overhead_pct']:+.1f}% (ms/step, medians of "
                  f"{runs[name].rounds} round(s)); losses of the first round differ by at most "
                  f"{d['max_abs_loss_diff_first_round']:.3g}; Lightning's optimizer {d['sides']['lightning']['optimizer']}")
    if "sample" in data:
        s = data["sample"]
        print(f"sampling {s['new_tokens']} tokens ({s['dtype']}): KV cache {s['kv_cache']['tokens_per_s']:,.0f} tok/s, "
              f"recompute {s['recompute']['tokens_per_s']:,.0f} tok/s: the cache runs at {s['speedup']:.2f}x the "
              f"recompute speed")
    print(f"MFU = flops_per_token x tokens/s / peak ({peak_how}); wall {data['wall_s']:.0f}s")
    name = f"gpu-{device.type}" + ("-quick" if q else "")
    out = C.write_results(name, data, args.out)
    print(f"results: {out}")
    return data


if __name__ == "__main__":
    main()
