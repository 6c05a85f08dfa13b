"""Bits per byte at equal training time: char vs GPT-2 BPE vs a trained 4096-token BPE on tiny
Shakespeare, each trained by `train.py` for the same wall-clock budget on this machine, in one run.

Loss per token cannot be compared across tokenizers (a BPE token is ~3.3 characters); bits per UTF-8
byte of the validation text can (gptlab logs it as val/bpb next to val/loss). The setup, and why:

- The same model for every tokenizer: the quick CPU preset (`experiment=shakespeare_char_cpu`: 4
  layers, 4 heads, 128 channels, Muon, batch 24), only the vocabulary differs (its embedding, tied to
  the head, is vocab x 128 parameters: 6.4M of GPT-2's 7.2M).
- The same text per window: model.block_size = --context-bytes / (bytes per token of the validation
  split), so every model sees the same bytes of context, and with the same batch of 24 windows each
  step covers about the same bytes of training text. A BPE step then costs what its model costs (a
  50,257-way softmax for GPT-2), and each tokenizer gets the steps the budget allows.
- Equal time: Lightning's `trainer.max_time` (DD:HH:MM:SS) stops training after --seconds of fit
  (the clock starts at on_train_start), trainer.max_steps is out of reach, and validation runs once,
  at the stop (gptlab validates when training stops early), so validating costs no training time.
- The LR schedule decays over the steps the budget will hold: a short probe run of the same command
  (--probe-steps steps) measures the steady step time (the median step after its first 5), and
  optim.decay_steps = 0.95 x --seconds / step time (the cosine then ends a little before the clock
  and the last steps run at min_lr, instead of the clock cutting the decay short when the machine
  runs slower than the probe); optim.warmup_steps = min(the preset's 50, a tenth of that).
  Budgets in steps (max_steps) would be simpler but not equal time; a schedule without decay needs
  no estimate but loses ~0.1 nats at this size to every tokenizer alike.

Reported: val/loss and val/bpb as the run logs them (its 240 fixed validation windows), read from
the run's TensorBoard events, and the bpb of the whole validation split (back-to-back windows, the
last checkpoint), the same ~111k characters of text for every tokenizer.

    python bench/bpb.py                        # 120 s per tokenizer (+ probes, data, evaluation)
    python bench/bpb.py --seconds 300
    python bench/bpb.py --quick                # smoke run: 10 s each
    python bench/bpb.py --tiny                 # seconds: char only, a 2-layer model, 2 s of training in this process

Writes bench/results/bpb.json (or --out).
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import tempfile
import time
from pathlib import Path

import _common as C

TOKENIZERS = {  # name: (data.* overrides, description)
    "char": ({"tokenizer": "char"}, "characters"),
    "gpt2": ({"tokenizer": "bpe", "encoding": "gpt2"}, "GPT-2 BPE (tiktoken)"),
    "bpe4096": ({"tokenizer": "bpe_train", "vocab_size": 4096}, "byte-level BPE trained on the training split"),
}
BATCH = 24  # the quick CPU preset's data.batch_size
TINY_MODEL = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32"]
WARMUP = 50  # the preset's optim.warmup_steps (Muon)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, default=None, help="training time per tokenizer (default: 120; --quick: 10)")
    p.add_argument("--tokenizers", default=",".join(TOKENIZERS), help="comma-separated, of: " + ", ".join(TOKENIZERS))
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary of the trained BPE (default: %(default)s)")
    p.add_argument("--context-bytes", type=int, default=128,
                   help="bytes of text per window; block_size = this / bytes per token (default: %(default)s)")
    p.add_argument("--probe-steps", type=int, default=None, help="steps of the step-time probe (default: 30; --quick: 12)")
    p.add_argument("--no-whole-val", action="store_true", help="skip the whole-validation-split bpb")
    p.add_argument("--quick", action="store_true", help="smoke run: 10 s each, 12-step probes")
    p.add_argument("--tiny", action="store_true", help="seconds: char only, 2 layers x 32 channels, 32 bytes of "
                   "context, no probe, 2 s of training, train.py's run in this process (checks the code "
                   "paths; the figures mean nothing)")
    p.add_argument("--keep", action="store_true", help="keep the run directories (printed)")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/bpb.json)")
    args = p.parse_args(argv)
    args.model = []  # model.* overrides of the quick preset's model
    if args.tiny:
        args.tokenizers, args.seconds, args.context_bytes = "char", 2, 32
        args.model = TINY_MODEL
    args.seconds = args.seconds or (10 if args.quick else 120)
    args.probe_steps = args.probe_steps or (12 if args.quick else 30)
    if args.seconds < 1 or args.probe_steps < 8:
        p.error("--seconds must be >= 1 and --probe-steps >= 8")
    return args


# -- data: prepared once in this process, shared by every run through data.data_dir -----------------
def prepare(name: str, data: dict, data_dir: str):
    from gptlab.data import TokenDataModule

    dm = TokenDataModule(path=str(C.SHAKESPEARE), data_dir=data_dir, **data)
    dm.setup()
    tok = dm.tokenizer
    sizes = tok.token_bytes()
    val_bytes = int(sizes[dm.val_tokens].sum())
    return {"name": name, "vocab": tok.vocab_size, "train_tokens": len(dm.train_tokens),
            "val_tokens": len(dm.val_tokens), "val_bytes": val_bytes,
            "bytes_per_token": val_bytes / len(dm.val_tokens)}, dm, sizes


# -- runs of train.py ----------------------------------------------------------------------------------
def overrides(data: dict, data_dir: str, block: int, run_dir: Path, model: list[str]) -> list[str]:
    return [*model,
        f"data.path={C.SHAKESPEARE}", f"data.data_dir={data_dir}", f"data.batch_size={BATCH}",
        *(f"data.{k}={v}" for k, v in data.items()),
        f"model.block_size={block}", f"hydra.run.dir={run_dir}",
        # what runs at validation or beside training, and is no part of the comparison
        "~callbacks.progress_bar", "~callbacks.text_sample", "~callbacks.attention_maps",
        "~callbacks.periodic_checkpoint", "~callbacks.throughput",
    ]


def train(args: list[str], in_process: bool = False) -> tuple[str, float]:
    t0 = time.perf_counter()
    code, out, err = C.train_py(args, in_process)
    if code != 0:
        raise SystemExit(f"train.py {' '.join(args)} failed ({code}):\n{out[-1500:]}\n{err[-3000:]}")
    return out, time.perf_counter() - t0


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float, float]]]:
    """(step, wall time, value) of every scalar in the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: [(e.step, e.wall_time, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def probe(data: dict, data_dir: str, block: int, steps: int, work: Path, model: list[str]) -> float:
    """Seconds per optimizer step of this configuration, steady state (after the first 5 steps)."""
    run_dir = work / "probe"
    train(overrides(data, data_dir, block, run_dir, model) + [
        f"trainer.max_steps={steps}", "trainer.log_every_n_steps=1", "data.val_windows=4",
        f"optim.warmup_steps={steps}",
    ])
    events = [e for e in scalars(run_dir)["train/loss"] if e[0] >= 5]
    # the median step: a hiccup of the machine during the probe does not move the estimate
    return statistics.median((w1 - w0) / (s1 - s0) for (s0, w0, _), (s1, w1, _) in zip(events, events[1:]))


def max_time(seconds: int) -> str:
    d, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return f"{d:02d}:{h:02d}:{m:02d}:{s:02d}"


def run(name: str, data: dict, data_dir: str, block: int, step_s: float, seconds: int, work: Path,
        model: list[str], in_process: bool = False) -> dict:
    decay = max(2, int(0.95 * seconds / step_s))
    warmup = min(WARMUP, decay // 10)
    run_dir = work / name
    out, wall = train(overrides(data, data_dir, block, run_dir, model) + [
        "trainer.max_steps=100000000", f"+trainer.max_time='{max_time(seconds)}'",
        "trainer.val_check_interval=100000000", f"optim.decay_steps={decay}", f"optim.warmup_steps={warmup}",
    ], in_process)
    fit = re.search(r"fit: (\d+) steps in ([0-9.]+)s, of which validation ([0-9.]+)s", out)
    params = re.search(r"with ([0-9,]+) parameters", out)
    steps, fit_s, val_s = int(fit.group(1)), float(fit.group(2)), float(fit.group(3))
    tb = scalars(run_dir)
    return {"run_dir": str(run_dir), "block_size": block, "probe_step_s": step_s, "decay_steps": decay,
            "warmup_steps": warmup, "steps": steps, "train_s": fit_s - val_s, "fit_s": fit_s, "wall_s": wall,
            "params": int(params.group(1).replace(",", "")), "tokens_per_s": steps * BATCH * block / (fit_s - val_s),
            "val_loss": tb["val/loss"][-1][2], "val_bpb": tb["val/bpb"][-1][2], "val_step": tb["val/bpb"][-1][0]}


def whole_val_bpb(run_dir: str, val_tokens, token_bytes) -> float:
    """Bits per byte over the whole validation split in back-to-back windows, with the last weights."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from gptlab import checkpoint
    from gptlab.checkpoint import model_from_checkpoint

    model, _ = model_from_checkpoint(checkpoint.load(Path(run_dir) / "checkpoints" / "last.ckpt"))
    model.eval()
    T, V = model.config.block_size, model.config.vocab_size
    n = (len(val_tokens) - 1) // T
    rows = np.asarray(val_tokens[: n * T + 1], dtype=np.int64)
    x = torch.from_numpy(rows[:-1].reshape(n, T))
    y = torch.from_numpy(rows[1:].reshape(n, T))
    sizes = torch.as_tensor(token_bytes, dtype=torch.long)
    batch = max(1, (16 << 20) // (T * V))  # ~64 MB of float32 logits at a time
    nats, nbytes = 0.0, 0
    with torch.no_grad():
        for i in range(0, n, batch):
            logits = model(x[i:i + batch])
            losses = F.cross_entropy(logits.view(-1, V).float(), y[i:i + batch].reshape(-1), reduction="none")
            b = sizes[y[i:i + batch].reshape(-1)]
            nats += float((losses * (b > 0)).sum())
            nbytes += int(b.sum())
    return nats / math.log(2) / max(1, nbytes)


def main(argv=None) -> dict:
    args = parse_args(argv)
    names = [n.strip() for n in args.tokenizers.split(",") if n.strip()]
    unknown = [n for n in names if n not in TOKENIZERS]
    if unknown:
        raise SystemExit(f"--tokenizers: unknown {unknown}; choose from {', '.join(TOKENIZERS)}")
    info = C.machine_info()
    print(f"[bench] {C.machine_line(info)}")
    print(f"[bench] {', '.join(names)} on tiny Shakespeare, {args.seconds} s of training each, "
          f"{args.context_bytes} bytes of context, batch {BATCH}; the quick CPU preset's model and optimizer")
    rows = []
    tmp = tempfile.mkdtemp(prefix="gptlab-bench-bpb-")
    work = Path(tmp)
    try:
        data_dir = str(work / "data")
        for name in names:
            data = dict(TOKENIZERS[name][0])
            if name == "bpe4096":
                data["vocab_size"] = args.vocab
            t0 = time.perf_counter()
            row, dm, token_bytes = prepare(name, data, data_dir)
            row.update(tokenizer=TOKENIZERS[name][1], prepare_s=time.perf_counter() - t0)
            block = max(8, round(args.context_bytes / row["bytes_per_token"]))
            # --tiny: no probe run, a schedule of 20 steps over the budget
            step_s = args.seconds / 20 if args.tiny else probe(data, data_dir, block, args.probe_steps,
                                                               work / f"{name}-probe", args.model)
            row.update(run(name, data, data_dir, block, step_s, args.seconds, work, args.model, in_process=args.tiny))
            row["whole_val_bpb"] = None if args.no_whole_val else whole_val_bpb(row["run_dir"], dm.val_tokens, token_bytes)
            row["train_bytes_per_s"] = row["tokens_per_s"] * row["bytes_per_token"]
            rows.append(row)
            print(f"[bench]   {name}: block {block}, {row['steps']} steps in {row['train_s']:.1f}s "
                  f"(decay over {row['decay_steps']}), val/bpb {row['val_bpb']:.4f}", flush=True)
    finally:
        if args.keep:
            print(f"[bench] kept {tmp}")
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)

    ref = next((r for r in rows if r["name"] == "char"), rows[0])
    print()
    print(C.table(
        ["tokenizer", "vocab", "params", "block", "bytes/token", "steps", "decay", "train s", "tokens/s", "bytes/s",
         "val/loss", "val/bpb", "x " + ref["name"], "whole val bpb"],
        [[r["name"], f"{r['vocab']:,}", f"{r['params']:,}", r["block_size"], f"{r['bytes_per_token']:.2f}",
          r["steps"], r["decay_steps"], f"{r['train_s']:.1f}", f"{r['tokens_per_s']:,.0f}", f"{r['train_bytes_per_s']:,.0f}",
          f"{r['val_loss']:.4f}", f"{r['val_bpb']:.4f}", f"{r['val_bpb'] / ref['val_bpb']:.3f}",
          "-" if r["whole_val_bpb"] is None else f"{r['whole_val_bpb']:.4f}"] for r in rows],
    ))
    print("val/loss: nats per token (not comparable across tokenizers); val/bpb: bits per UTF-8 byte of the run's "
          "validation windows; whole val bpb: every byte of the validation split, back-to-back windows; "
          f"x {ref['name']}: val/bpb ratio; bytes/s: training text per second (tokens/s x bytes/token); decay: "
          "optim.decay_steps from the probe (steps well below it: the machine was slower than during the probe)")
    data = {"benchmark": "bpb", "args": vars(args), "machine": info,
            "machine_after": {"loadavg_1_5_15": C.machine_info(torch_too=False)["loadavg_1_5_15"]},
            "batch_size": BATCH, "runs": rows}
    print(f"results: {C.write_results('bpb', data, args.out)}")
    return data


if __name__ == "__main__":
    main()
