"""Quality at equal compute: nanoGPT's documented CPU recipe as a plain PyTorch loop against gptlab's
CPU experiments run through `train.py`, in one run, on the same machine.

nanoGPT's recipe (README, "I only have a macbook"): 4 layers / 4 heads / 128 channels, block 64,
batch 12, 2000 iterations, lr 1e-3 -> 1e-4 (warmup 100, cosine over 2000), AdamW betas (0.9, 0.99),
weight decay 0.1, dropout 0, grad clip 1.0. It reports val loss 1.88. The raw loop below is that
recipe on gptlab's GPT, the same data and the same fixed validation windows as gptlab's val/loss.

    python bench/quality.py                                   # raw recipe + shakespeare_char_cpu + _long
    python bench/quality.py --experiments shakespeare_char_cpu
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, SHAKESPEARE, machine_info, machine_line, table, write_results


def raw_recipe(data_dir: str, steps: int = 2000) -> dict:
    import torch
    import torch.nn.functional as F

    from gptlab.data import TokenDataModule
    from gptlab.data.datasets import TrainBatches
    from gptlab.models import build_model
    from gptlab.training.optim import lr_factor

    T, B, lr, min_lr, warmup = 64, 12, 1e-3, 1e-4, 100
    dm = TokenDataModule(path=str(SHAKESPEARE), data_dir=data_dir, block_size=T)
    dm.prepare_data()
    dm.setup()
    torch.manual_seed(1337)
    model = build_model(dict(vocab_size=65, block_size=T, n_layer=4, n_head=4, n_embd=128, dropout=0.0))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.99), foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, steps, min_lr / lr))
    batches = TrainBatches(dm.train_tokens, T, B, seed=1337)
    t0 = time.perf_counter()
    for k in range(steps):
        x, y, _ = batches.batch(k)
        loss = F.cross_entropy(model(x).view(-1, 65), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    train_s = time.perf_counter() - t0
    return {"name": "nanoGPT CPU recipe, raw loop", "steps": steps, "train_s": train_s,
            "total_s": time.perf_counter() - t0,
            "val_loss": val_loss(model, dm.val_tokens, 240),  # gptlab's validation set for the CPU presets
            "val_loss_all": val_loss(model, dm.val_tokens)}


def val_loss(model, tokens, windows: int | None = None) -> float:
    """Mean next-token loss over `windows` evenly spaced windows of the validation split (gptlab's
    FixedWindows), or over all of it in back-to-back windows when `windows` is None."""
    import torch
    import torch.nn.functional as F

    from gptlab.data.datasets import FixedWindows

    T = model.config.block_size
    ds = FixedWindows(tokens, T, windows or (len(tokens) - 1) // T)
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ds), 64):
            xs, ys = zip(*(ds[j] for j in range(i, min(i + 64, len(ds)))))
            logits = model(torch.stack(xs))
            total += F.cross_entropy(logits.view(-1, logits.size(-1)), torch.stack(ys).reshape(-1), reduction="sum").item()
            n += len(xs) * T
    return total / n


def gptlab_experiment(name: str, data_dir: str, out: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"experiment={name}", f"data.path={SHAKESPEARE}",
         f"data.data_dir={data_dir}", f"hydra.run.dir={out / name}", "~callbacks.progress_bar"],
        cwd=ROOT, capture_output=True, text=True,
    )
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    val = float(re.search(r"final val/loss = ([0-9.]+)", proc.stdout).group(1))
    fit = re.search(r"fit: (\d+) steps in ([0-9.]+)s, of which validation ([0-9.]+)s", proc.stdout)
    steps, fit_s, val_s = int(fit.group(1)), float(fit.group(2)), float(fit.group(3))
    # the whole validation split, with the weights of the last step
    from gptlab import checkpoint
    from gptlab.checkpoint import model_from_checkpoint
    from gptlab.data import TokenDataModule

    model, _ = model_from_checkpoint(checkpoint.load(out / name / "checkpoints" / "last.ckpt"))
    dm = TokenDataModule(path=str(SHAKESPEARE), data_dir=data_dir, block_size=model.config.block_size)
    dm.prepare_data()
    dm.setup()
    return {"name": f"gptlab experiment={name}", "steps": steps, "train_s": fit_s - val_s,
            "fit_s": fit_s, "total_s": total, "val_loss": val, "val_loss_all": val_loss(model, dm.val_tokens)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", default="shakespeare_char_cpu,shakespeare_char_cpu_long")
    parser.add_argument("--skip-raw", action="store_true")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/quality.json)")
    args = parser.parse_args(argv)
    info = machine_info()
    print(machine_line(info))
    rows = []
    with tempfile.TemporaryDirectory(prefix="gptlab-quality-") as tmp:
        data_dir = str(Path(tmp) / "data")
        if not args.skip_raw:
            rows.append(raw_recipe(data_dir))
        for name in filter(None, args.experiments.split(",")):
            rows.append(gptlab_experiment(name, data_dir, Path(tmp)))
    ref = rows[0]["train_s"] if not args.skip_raw else None
    print(table(
        ["run", "steps", "train s", "x raw recipe", "end-to-end s", "val/loss", "whole val split"],
        [[r["name"], r["steps"], f"{r['train_s']:.1f}", f"{r['train_s'] / ref:.2f}" if ref else "-",
          f"{r['total_s']:.1f}", f"{r['val_loss']:.4f}", f"{r['val_loss_all']:.4f}"] for r in rows],
    ))
    print("val/loss: what the run reports (the experiment's data.val_windows evenly spaced windows; 240 for the "
          "raw recipe); whole val split: every token of it, in back-to-back windows, with the last step's weights")
    result = {"machine": info, "runs": rows}
    print(f"wrote {write_results('quality', result, args.out)}")
    return result


if __name__ == "__main__":
    main()
