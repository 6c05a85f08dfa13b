"""Quality at equal compute: nanoGPT's documented CPU recipe as a plain PyTorch loop against gptlab's
CPU experiments run through `train.py`, in one run, on the same machine; then the record preset with
each of its model options switched off, at equal wall-clock (the ablation table).

nanoGPT's recipe (README, "I only have a macbook"): 4 layers / 4 heads / 128 channels, block 64,
batch 12, 2000 iterations, lr 1e-3 -> 1e-4 (warmup 100, cosine over 2000), AdamW betas (0.9, 0.99),
weight decay 0.1, dropout 0, grad clip 1.0. It reports val loss 1.88. The raw loop below is that
recipe on gptlab's GPT, the same data and the same fixed validation windows as gptlab's val/loss. It
is timed before and after the presets, and every "x raw" divides by the mean of the two.

Equal wall-clock: each run of the ablation trains for the record's steps x (the record's ms/step /
its own), both measured side by side in this process just before (interleaved rounds of real
optimizer steps, medians), so that it spends the record's training time at its own step cost, at
the same machine speed. Steps rather than seconds (trainer.max_time): a machine whose speed drifts
during the ablation would give the later runs fewer steps for the same seconds. The record preset
is trained twice (two seeds) to show how far apart runs land by chance.

    python bench/quality.py                                   # everything (35-60 minutes on a 2-core CPU)
    python bench/quality.py --experiments shakespeare_char_cpu --no-ablation
    python bench/quality.py --skip-raw --experiments shakespeare_char_cpu_record --ablate pos
    python bench/quality.py --tiny                            # seconds, in this process: raw loop, record, pos ablation
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import _common as C
from _common import machine_info, machine_line, table, write_results


def train_step(model, opt, x, y) -> None:
    """One plain optimizer step: forward, cross-entropy, backward, clipping at 1.0, the update."""
    import torch
    import torch.nn.functional as F

    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def raw_recipe(data_dir: str, steps: int = 2000, shape: dict | None = None) -> dict:
    """nanoGPT's recipe for `steps` steps; `shape` changes the model's (--tiny: a 2-layer model)."""
    import torch

    from gptlab.data import TokenDataModule
    from gptlab.data.datasets import TrainBatches
    from gptlab.models import build_model
    from gptlab.training.optim import lr_factor

    T, B, lr, min_lr, warmup = 64, 12, 1e-3, 1e-4, 100
    dm = TokenDataModule(path=str(C.SHAKESPEARE), data_dir=data_dir, block_size=T)
    dm.prepare_data()
    dm.setup()
    torch.manual_seed(1337)
    model = build_model({"vocab_size": 65, "block_size": T, "n_layer": 4, "n_head": 4, "n_embd": 128, "dropout": 0.0,
                         **(shape or {})})
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.99), foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, steps, min_lr / lr))
    batches = TrainBatches(dm.train_tokens, T, B, seed=1337)
    t0 = time.perf_counter()
    for k in range(steps):
        x, y, _ = batches.batch(k)
        train_step(model, opt, x, y)
        sched.step()
    train_s = time.perf_counter() - t0
    return {"name": "nanoGPT CPU recipe, raw loop", "steps": steps, "train_s": train_s, "params": model.num_params(),
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


RECORD = "shakespeare_char_cpu_record"
# The model switches of gptlab.models.gpt; an ablation sets one of them back to its value in conf/model/gpt_micro.yaml
# (GPT-2's), for each one on which the record preset differs.
OPTIONS = ("pos", "norm", "mlp", "qk_norm", "n_kv_head", "bias", "tie_weights")


TINY_MODEL = ("model.n_layer=2", "model.n_head=2", "model.n_embd=32", "data.batch_size=4")


def compose(experiment: str, overrides: list[str]):
    return C.compose([f"experiment={experiment}", *overrides])


def ablations(experiment: str) -> dict[str, list[str]]:
    """{option: [the override that switches it off]} for each option the experiment changes."""
    from omegaconf import OmegaConf

    record = OmegaConf.to_container(compose(experiment, []).model, resolve=True)
    base = C.model_config("gpt_micro")
    value = lambda v: "null" if v is None else str(v).lower()  # noqa: E731
    return {f"{k}: {value(record.get(k))} -> {value(base[k])}": [f"model.{k}={value(base[k])}"]
            for k in OPTIONS if record.get(k) != base.get(k)}


def step_ms(experiment: str, variants: dict[str, list[str]], rounds: int = 8, steps: int = 8) -> dict[str, dict]:
    """ms per optimizer step (forward, backward, clipping, the experiment's optimizer) of each variant
    at the experiment's batch and context, measured in interleaved rounds so that drift hits all alike."""
    import torch
    from omegaconf import OmegaConf

    from gptlab.config import RUN_SWITCHES
    from gptlab.models import build_model
    from gptlab.training.optim import OptimConfig, ParamRoles, build_optimizer, fused_by_default, param_groups

    setups = {}
    for name, overrides in variants.items():
        cfg = compose(experiment, overrides)
        shape = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items()
                 if k not in RUN_SWITCHES}
        shape["vocab_size"] = shape.get("vocab_size") or 65
        torch.manual_seed(0)
        model = build_model(shape)
        optim = OptimConfig(**OmegaConf.to_container(cfg.optim, resolve=True))
        groups = param_groups(list(model.named_parameters()), ParamRoles.of(model), optim)
        opt = build_optimizer(groups, optim, fused_by_default(torch.device("cpu")))
        B, T = cfg.data.batch_size, shape["block_size"]
        batch = torch.randint(0, shape["vocab_size"], (2, B, T))
        setups[name] = (model, opt, batch)
    times = {name: [] for name in variants}
    for r in range(rounds + 1):  # round 0 warms up
        for name, (model, opt, (x, y)) in setups.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                train_step(model, opt, x, y)
            if r:
                times[name].append(1000 * (time.perf_counter() - t0) / steps)
    return {name: {"ms_per_step": statistics.median(times[name])} for name in variants}


def gptlab_experiment(name: str, data_dir: str, out: Path, overrides: tuple[str, ...] = (), label: str | None = None,
                      in_process: bool = False) -> dict:
    run_dir = out / re.sub(r"[^A-Za-z0-9_.-]+", "_", label or name)
    t0 = time.perf_counter()
    code, stdout, stderr = C.train_py([f"experiment={name}", f"data.path={C.SHAKESPEARE}", f"data.data_dir={data_dir}",
                                       f"hydra.run.dir={run_dir}", "~callbacks.progress_bar", *overrides], in_process)
    total = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"{name} {' '.join(overrides)} failed:\n{stderr[-3000:]}")
    val = float(re.search(r"final val/loss = ([0-9.]+)", stdout).group(1))
    fit = re.search(r"fit: (\d+) steps in ([0-9.]+)s, of which validation ([0-9.]+)s", stdout)
    steps, fit_s, val_s = int(fit.group(1)), float(fit.group(2)), float(fit.group(3))
    params = int(re.search(r"with ([0-9,]+) parameters", stdout).group(1).replace(",", ""))
    # the whole validation split, with the weights of the last step
    from gptlab import checkpoint
    from gptlab.checkpoint import model_from_checkpoint
    from gptlab.data import TokenDataModule

    model, _ = model_from_checkpoint(checkpoint.load(run_dir / "checkpoints" / "last.ckpt"))
    dm = TokenDataModule(path=str(C.SHAKESPEARE), data_dir=data_dir, block_size=model.config.block_size)
    dm.prepare_data()
    dm.setup()
    shutil.rmtree(run_dir, ignore_errors=True)
    print(f"[bench]   {steps} steps, {fit_s - val_s:.1f}s training, {total:.1f}s end to end: val/loss {val:.4f}", flush=True)
    return {"name": label or f"gptlab experiment={name}", "overrides": list(overrides), "steps": steps,
            "params": params, "train_s": fit_s - val_s, "ms_per_step": 1000 * (fit_s - val_s) / steps,
            "fit_s": fit_s, "total_s": total, "val_loss": val, "val_loss_all": val_loss(model, dm.val_tokens)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", default=f"shakespeare_char_cpu,shakespeare_char_cpu_long,{RECORD}")
    parser.add_argument("--skip-raw", action="store_true")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--no-ablation", action="store_true", help=f"skip the ablation of {RECORD}")
    which.add_argument("--ablate", default=None, help="only these options (comma-separated model keys, e.g. pos,mlp)")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 20 steps per run")
    parser.add_argument("--tiny", action="store_true", help="seconds: 3 raw steps of a 2-layer model, the record and "
                        "its pos ablation for 4 steps each in this process, one seed (checks the code paths; the "
                        "figures mean nothing)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/quality.json)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.experiments, args.ablate, args.no_ablation = "", "pos", False
    info = machine_info()
    print(machine_line(info), flush=True)
    experiments = [e for e in args.experiments.split(",") if e]
    todo = {} if args.no_ablation else ablations(RECORD)
    if args.ablate:
        keys = {label.split(":")[0]: label for label in todo}
        unknown = set(args.ablate.split(",")) - set(keys)
        if unknown:
            parser.error(f"--ablate {args.ablate}: {RECORD} changes only {','.join(keys)}")
        todo = {keys[k]: todo[keys[k]] for k in args.ablate.split(",")}
    rows, ablated = [], []
    quick = ("trainer.max_steps=20", "trainer.val_check_interval=10") if args.quick else ()
    if args.tiny:  # a model of 2 layers x 32 channels (the probe's too), 4 steps
        todo = {k: [*TINY_MODEL, *v] for k, v in todo.items()}
        quick = (*TINY_MODEL, "trainer.max_steps=4", "trainer.val_check_interval=4", "data.val_windows=16",
                 "~callbacks.text_sample", "~callbacks.attention_maps")
    with tempfile.TemporaryDirectory(prefix="gptlab-quality-") as tmp:
        data_dir = str(Path(tmp) / "data")
        raws = []

        def raw(when: str) -> None:
            print(f"[bench] nanoGPT's CPU recipe, raw loop ({when})", flush=True)
            raws.append({**raw_recipe(data_dir, steps=3 if args.tiny else 20 if args.quick else 2000,
                                      shape=dict(n_layer=2, n_head=2, n_embd=32) if args.tiny else None), "when": when})
            raws[-1]["name"] += f" ({when})"
            rows.append(raws[-1])
            print(f"[bench]   {raws[-1]['train_s']:.1f}s training: val/loss {raws[-1]['val_loss']:.4f}", flush=True)

        if not args.skip_raw:
            raw("before")
        for name in experiments:
            print(f"[bench] experiment={name}", flush=True)
            rows.append(gptlab_experiment(name, data_dir, Path(tmp), quick))
        if not args.skip_raw and experiments:
            # timed again after the presets: the ratios divide by the mean of both, so that the machine's
            # drift over the presets' minutes moves the reference with them
            raw("after")
        if todo:
            record = next((r for r in rows if r["name"] == f"gptlab experiment={RECORD}"), None)
            if record is None:
                print(f"[bench] experiment={RECORD} (the ablation's reference)", flush=True)
                record = gptlab_experiment(RECORD, data_dir, Path(tmp), quick, in_process=args.tiny)
            print(f"[bench] ms/step of {RECORD} and each ablation, side by side", flush=True)
            probe = step_ms(RECORD, {"record": list(TINY_MODEL) if args.tiny else [], **todo},
                            **(dict(rounds=1, steps=2) if args.tiny else {}))
            ablated.append({**record, "option": f"none ({RECORD})", "probe_ms_per_step": probe["record"]["ms_per_step"]})
            # the record again with another seed (initialization and data order): the chance spread
            variants = {**({} if args.tiny else {"none, seed 1338": (["seed=1338"], "record")}),
                        **{k: (v, k) for k, v in todo.items()}}
            for option, (overrides, cost) in variants.items():
                steps = round(record["steps"] * probe["record"]["ms_per_step"] / probe[cost]["ms_per_step"])
                print(f"[bench] {RECORD} {' '.join(overrides)}: {steps} steps", flush=True)
                row = gptlab_experiment(RECORD, data_dir, Path(tmp), (*quick, *overrides, f"trainer.max_steps={steps}"),
                                        label=option, in_process=args.tiny)
                ablated.append({**row, "option": option, "probe_ms_per_step": probe[cost]["ms_per_step"]})
    ref = statistics.mean(r["train_s"] for r in raws) if raws else None
    print(table(
        ["run", "params", "steps", "ms/step", "train s", "x raw recipe", "end-to-end s", "x raw (end to end)",
         "val/loss", "whole val split"],
        [[r["name"], f"{r.get('params', 0.0):,}" if r.get("params") else "-", r["steps"],
          f"{1000 * r['train_s'] / r['steps']:.0f}", f"{r['train_s']:.1f}", f"{r['train_s'] / ref:.2f}" if ref else "-",
          f"{r['total_s']:.1f}", f"{r['total_s'] / ref:.2f}" if ref else "-",
          f"{r['val_loss']:.4f}", f"{r['val_loss_all']:.4f}"] for r in rows],
    ))
    print("val/loss: what the run reports (the experiment's data.val_windows evenly spaced windows; 240 for the "
          "raw recipe); whole val split: every token of it, in back-to-back windows, with the last step's weights; "
          "x raw: against the raw recipe's training time (the mean of its runs before and after the presets)")
    if len(raws) == 2:
        print(f"raw recipe: {raws[0]['train_s']:.1f}s before the presets, {raws[1]['train_s']:.1f}s after "
              f"(mean {ref:.1f}s)")
    if ablated:
        base = ablated[0]  # the record preset's row above; ablated[1]: the same with another seed
        for a in ablated:
            a["delta_val_loss"] = a["val_loss"] - base["val_loss"]
            a["train_equal_speed_s"] = a["steps"] * a["probe_ms_per_step"] / 1000
        print(f"\nablation of {RECORD}: each option switched off, at the record's training time (steps from the "
              "side-by-side ms/step)")
        print(table(
            ["option switched off", "params", "probe ms/step", "steps", "steps x probe s", "ms/step in the run",
             "train s", "val/loss", "vs record", "whole val split", "vs record"],
            [[a["option"], f"{a['params']:,}", f"{a['probe_ms_per_step']:.0f}", a["steps"],
              f"{a['train_equal_speed_s']:.1f}", f"{a['ms_per_step']:.0f}", f"{a['train_s']:.1f}", f"{a['val_loss']:.4f}",
              f"{a['delta_val_loss']:+.4f}" if a is not base else "", f"{a['val_loss_all']:.4f}",
              f"{a['val_loss_all'] - base['val_loss_all']:+.4f}" if a is not base else ""] for a in ablated],
        ))
        seeds = [a for a in ablated if a["option"] == "none, seed 1338"]
        noise = f"{abs(seeds[0]['val_loss'] - base['val_loss']):.4f}" if seeds else "(one seed run)"
        print(f"vs record: val/loss minus the record's (positive: switching the option off costs, so the record keeps "
              f"it); the record's two seeds land {noise} apart. steps x probe s: the training time at the "
              "probe's machine speed, equal by construction; train s: the run's own clock, which moves with the "
              "machine's drift")
    goals = {}
    record_row = next((r for r in rows if r["name"] == f"gptlab experiment={RECORD}"), None)
    if ref and record_row:
        x = record_row["total_s"] / ref
        goals = {"record": {"x_raw_end_to_end": x, "val_loss": record_row["val_loss"],
                            "met": x <= 4 and record_row["val_loss"] <= 1.50},
                 "stretch": {"met": x <= 6 and record_row["val_loss"] <= 1.47}}
        print(f"\nrecord: val/loss {record_row['val_loss']:.4f} in {x:.2f}x the raw recipe's training time, end to end: "
              f"goal <= 1.50 within 4x {'MET' if goals['record']['met'] else 'NOT MET'}; "
              f"stretch <= 1.47 within 6x {'MET' if goals['stretch']['met'] else 'NOT MET'}")
    result = {"machine": info, "runs": rows, "raw_reference_train_s": ref, "ablation": ablated, "goals": goals}
    print(f"wrote {write_results('quality', result, args.out)}")
    return result


if __name__ == "__main__":
    main()
