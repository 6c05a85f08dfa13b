"""Mixed precision, torch.compile and gradient accumulation through train.py, and what a run records in
TensorBoard (hyperparameters with the best validation loss, throughput and MFU)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from gptlab.checkpoint import COMPILE_PREFIX, model_from_checkpoint
from gptlab.checkpoint import load as load_checkpoint
from gptlab.models import build_model
from gptlab.training.optim import lr_factor

from conftest import SHAKESPEARE, TINY, read_scalars, run_script, train_args
from inprocess import run_sample, run_train

B, T = 8, 32  # TINY's data.batch_size and model.block_size
TINY_MODEL = dict(arch="gpt", vocab_size=65, block_size=T, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
PEAK = 1e11  # a made-up peak FLOP/s, so that MFU is computed on CPU


def hparams_plugin(tb_dir: Path) -> dict:
    """The HPARAMS tab's data of a TensorBoard run: hyperparameters and metric names."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    ea = EventAccumulator(str(tb_dir), size_guidance={"tensors": 0})
    ea.Reload()
    out: dict = {"metrics": [], "hparams": {}}
    for content in ea.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("experiment"):
            out["metrics"] += [m.name.tag for m in data.experiment.metric_infos]
        if data.HasField("session_start_info"):
            for name, value in data.session_start_info.hparams.items():
                out["hparams"][name] = getattr(value, value.WhichOneof("kind"))
    return out


@pytest.fixture(scope="module")
def bf16_accum_run(tmp_path_factory, data_dir) -> Path:
    """bf16-mixed autocast on CPU with 2 accumulated micro-batches per optimizer step."""
    run_dir = tmp_path_factory.mktemp("bf16") / "run"
    run_train(
        [
            f"data.path={SHAKESPEARE}",
            *TINY,
            "trainer=cpu",
            "trainer.precision=bf16-mixed",
            "trainer.accumulate_grad_batches=2",
            "trainer.max_steps=6",
            "trainer.val_check_interval=3",
            "optim.warmup_steps=2",
            "optim.lr=1e-3",
            "optim.min_lr=1e-4",
            "callbacks.throughput.window_size=2",
            f"callbacks.throughput.available_flops={PEAK}",
        ],
        run_dir,
    )
    return run_dir


@pytest.mark.slow
def test_bf16_mixed_trains_end_to_end(bf16_accum_run):
    scalars = read_scalars(bf16_accum_run / "tensorboard")
    losses = [v for _, v in scalars["train/loss"]]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert all(math.isfinite(v) for _, v in scalars["val/loss"])
    assert hparams_plugin(bf16_accum_run / "tensorboard")["hparams"]["trainer/precision"] == "bf16-mixed"
    # weights stay float32 (autocast computes in bf16), so the checkpoint samples anywhere
    ckpt = load_checkpoint(bf16_accum_run / "checkpoints" / "last.ckpt")
    assert {v.dtype for v in ckpt["state_dict"].values()} == {torch.float32}


@pytest.mark.slow
def test_accumulation_counts_optimizer_steps_and_every_token(bf16_accum_run):
    scalars = read_scalars(bf16_accum_run / "tensorboard")
    # the schedule advances once per optimizer step: after N steps the LR is the schedule at N,
    # not at 2N micro-batches (warmup 2, cosine decay to min_lr = lr/10 at max_steps=6)
    lrs = dict(scalars["lr/decay"])
    assert sorted(lrs) == list(range(6))
    for step, lr in lrs.items():
        assert lr == pytest.approx(1e-3 * lr_factor(step, 2, 6, 0.1), rel=1e-5)
    # every micro-batch's tokens count: 2 x B x T per optimizer step
    assert dict(scalars["train/tokens"]) == {s: (s + 1) * 2 * B * T for s in range(6)}
    # val_check_interval counts optimizer steps, not micro-batches: validation after steps 3 and 6
    assert [s for s, _ in scalars["val/loss"]] == [2, 5]
    ckpt = load_checkpoint(bf16_accum_run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 6
    assert ckpt["gptlab"]["micro_step"] == 12 and ckpt["gptlab"]["tokens_seen"] == 12 * B * T


@pytest.mark.slow
def test_tensorboard_hparams_with_best_val_loss(bf16_accum_run):
    plugin = hparams_plugin(bf16_accum_run / "tensorboard")
    assert plugin["metrics"] == ["hp/best_val_loss"]
    hp = plugin["hparams"]
    assert hp["model/n_layer"] == 2 and hp["optim/lr"] == pytest.approx(1e-3)
    assert hp["trainer/accumulate_grad_batches"] == 2 and hp["seed"] == 1337
    scalars = read_scalars(bf16_accum_run / "tensorboard")
    best = [v for _, v in scalars["hp/best_val_loss"] if math.isfinite(v)]
    assert best and best[-1] == pytest.approx(min(v for _, v in scalars["val/loss"]))


@pytest.mark.slow
def test_throughput_and_mfu_scalars(bf16_accum_run):
    scalars = read_scalars(bf16_accum_run / "tensorboard")
    for tag in ("train/device/items_per_sec", "train/device/flops_per_sec", "train/device/mfu",
                "validate/device/items_per_sec"):
        assert tag in scalars and all(v > 0 for _, v in scalars[tag]), tag
    # items are tokens; FLOPs are the model's training FLOPs per token times tokens; MFU over the peak
    flops_per_token = build_model(TINY_MODEL).flops_per_token(T)
    tokens_per_sec = dict(scalars["train/device/items_per_sec"])
    flops_per_sec = dict(scalars["train/device/flops_per_sec"])
    mfu = dict(scalars["train/device/mfu"])
    for step in flops_per_sec:
        assert flops_per_sec[step] == pytest.approx(tokens_per_sec[step] * flops_per_token, rel=1e-4)
        assert mfu[step] == pytest.approx(flops_per_sec[step] / PEAK, rel=1e-4)
    assert dict(scalars["train/lengths"])[5] == 12 * B * T


def test_compiled_training_checkpoint_loads_uncompiled_and_samples(tmp_path, data_dir):
    """model.compile=<backend> compiles in place; aot_eager traces forward and backward like inductor
    but skips its C++ code generation (a minute per model on a small CPU). In-process: train.train and
    sample.sample on composed configs."""
    value = run_train(
        [f"data.path={SHAKESPEARE}", f"paths.data_dir={data_dir}", *TINY, "trainer=cpu", "model.compile=aot_eager",
         "trainer.max_steps=2", "trainer.val_check_interval=2", "callbacks.text_sample.max_new_tokens=4"],
        tmp_path,
    )
    assert math.isfinite(value)
    ckpt_path = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint(ckpt_path)
    assert "compile" not in ckpt["hyper_parameters"]["model"]  # how it ran is not what it is
    assert not [k for k in ckpt["state_dict"] if COMPILE_PREFIX in k]
    model, _ = model_from_checkpoint(ckpt, ckpt_path)  # strict load into an eager model
    assert not hasattr(model, "_orig_mod")
    # sample.py compiles the loaded model too (compile=true would use inductor)
    texts = run_sample([f"ckpt_path={ckpt_path}", "compile=eager", "max_new_tokens=5", "num_samples=1",
                        "prompt=KING:", "device=cpu"])
    assert len(texts) == 1 and texts[0].startswith("KING:") and len(texts[0]) == len("KING:") + 5


@pytest.mark.skipif(not os.environ.get("GPTLAB_TEST_INDUCTOR"), reason="set GPTLAB_TEST_INDUCTOR=1: inductor "
                    "compiles C++ for a minute or more on CPU")
def test_compile_true_with_inductor(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    run_script("train.py", train_args(run_dir, "trainer=cpu", "model.compile=true", "trainer.max_steps=2",
                                      "trainer.val_check_interval=2"), data_dir, timeout=900)
    ckpt_path = run_dir / "checkpoints" / "last.ckpt"
    assert not [k for k in load_checkpoint(ckpt_path)["state_dict"] if COMPILE_PREFIX in k]
    run_script("sample.py", [f"ckpt_path={ckpt_path}", "compile=true", "max_new_tokens=5", "num_samples=1"],
               data_dir, timeout=900)
