"""Optimizers (gptlab.training.optim): AdamW's groups and fused default; optim=muon, Muon for the hidden
matrices and AdamW for the rest, checked against torch's own optimizers, and a run that resumes to the
same numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gptlab.errors import ConfigError
from gptlab.training import LanguageModel
from gptlab.training.muon import Muon, orthogonalize

from conftest import SHAKESPEARE, TINY, read_scalars
from inprocess import run_train

TINY_GPT = {"arch": "gpt", "vocab_size": 65, "block_size": 8, "n_layer": 2, "n_head": 2, "n_embd": 16}


def _run(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[list[torch.Tensor]]) -> None:
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.step()


def test_orthogonalize_flattens_the_spectrum():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(48, 32))
    v, _ = torch.linalg.qr(torch.randn(32, 32))
    g = u @ torch.diag(torch.logspace(-1, 1, 32)) @ v.T  # singular values 0.1 ... 10
    s = torch.linalg.svdvals(orthogonalize(g))
    assert 0.6 < s.min() and s.max() < 1.25, s  # what 5 Newton-Schulz steps promise: ~U V^T
    assert orthogonalize(g.T).shape == (32, 48)


def test_adamw_part_matches_torch_adamw():
    torch.manual_seed(0)
    shapes = [(10, 6), (6,)]
    ours = [torch.randn(s) for s in shapes]
    ref = [p.clone() for p in ours]
    grads = [[torch.randn(s) for s in shapes] for _ in range(5)]
    kw = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    _run(Muon([{"params": ours[:1], "weight_decay": 0.1}, {"params": ours[1:], "weight_decay": 0.0}], **kw),
         ours, grads)
    _run(torch.optim.AdamW([{"params": ref[:1], "weight_decay": 0.1}, {"params": ref[1:], "weight_decay": 0.0}],
                           foreach=False, **kw), ref, grads)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(24, 8), (8, 24)])
def test_muon_part_matches_torch_muon(shape):
    """torch.optim.Muon (RMS matched to AdamW) runs Newton-Schulz in bfloat16, ours in float32 on the
    CPU: the updates agree to bfloat16 precision."""
    torch.manual_seed(0)
    start = torch.randn(shape)
    ours, ref = start.clone(), start.clone()
    grads = [[torch.randn(shape)] for _ in range(4)]
    _run(Muon([{"params": [ours], "muon": True}], lr=0.02, weight_decay=0.1, momentum=0.95), [ours], grads)
    _run(torch.optim.Muon([ref], lr=0.02, weight_decay=0.1, momentum=0.95, adjust_lr_fn="match_rms_adamw"),
         [ref], grads)
    moved = (ref - start).norm()
    assert moved > 0.1
    assert (ours - ref).norm() / moved < 0.03


def test_muon_refuses_non_matrices():
    with pytest.raises(ValueError, match="whole weight matrices"):
        Muon([{"params": [torch.zeros(4, requires_grad=True)], "muon": True}])


def test_optim_muon_groups_and_errors():
    module = LanguageModel(model=TINY_GPT, optim={"name": "muon", "lr": 4e-3, "muon_lr": 1e-2, "decay_steps": 10})
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, Muon)
    groups = {g["name"]: g for g in optimizer.param_groups}
    names = {id(p): n for n, p in module.model.named_parameters()}
    muon = sorted(names[id(p)] for p in groups["muon"]["params"])
    # every Linear weight of the blocks (qkv, attention out, MLP in and out), nothing else
    assert muon == sorted(n for n, p in module.model.named_parameters() if p.dim() == 2 and ".h." in n)
    assert len(muon) == 4 * 2
    assert sorted(names[id(p)] for p in groups["decay"]["params"]) == ["transformer.wpe.weight",
                                                                        "transformer.wte.weight"]
    initial = {name: g["initial_lr"] for name, g in groups.items()}  # the peaks the schedule scales
    assert initial == {"muon": 1e-2, "decay": 4e-3, "no_decay": 4e-3}
    assert groups["muon"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0

    with pytest.raises(ConfigError, match="'adamw' or 'muon'"):
        LanguageModel(model=TINY_GPT, optim={"name": "sgd"})
    for p in module.model.parameters():  # what FSDP shows the optimizer: flat 1-D shards
        p.data = p.data.reshape(-1)
    with pytest.raises(ConfigError, match="FSDP"):
        module.configure_optimizers()


def test_muon_run_resumes_to_the_same_numbers(tmp_path, data_dir):
    """Muon's momentum buffers travel in the checkpoint (loaded with weights_only=True): 6 steps, then
    6 more after a restart, log what 12 uninterrupted steps log."""
    common = [f"data.path={SHAKESPEARE}", *TINY, "optim=muon", "optim.warmup_steps=2", "optim.decay_steps=12",
              "trainer.val_check_interval=6"]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run_train([*common, "trainer.max_steps=12"], reference)
    run_train([*common, "trainer.max_steps=6"], resumed)
    run_train([*common, "trainer.max_steps=12", "resume=auto"], resumed)
    ref, got = read_scalars(reference / "tensorboard"), read_scalars(resumed / "tensorboard")
    assert [s for s, _ in got["train/loss"]] == list(range(12))
    np.testing.assert_allclose([v for _, v in got["train/loss"]], [v for _, v in ref["train/loss"]], rtol=0, atol=1e-6)
    assert {"lr/muon", "lr/decay", "lr/no_decay"} <= set(got)
    losses = [v for _, v in ref["train/loss"]]
    assert losses[-1] < losses[0] - 0.5  # it learns


def test_lr_factor_follows_whichever_of_steps_and_time_runs_out_first():
    from gptlab.training.optim import lr_factor

    assert lr_factor(4, 5, 100, 0.1, time_used=0.9) == pytest.approx((4 + 1) / 6)  # warmup counts steps
    assert lr_factor(50, 0, 100, 0.1) == pytest.approx(0.55)  # half way by steps
    assert lr_factor(50, 0, 100, 0.1, time_used=0.5) == pytest.approx(0.55)
    assert lr_factor(10, 0, 100, 0.1, time_used=0.5) == pytest.approx(0.55)  # time ahead of the steps
    assert lr_factor(10, 0, None, 0.1, time_used=1.0) == pytest.approx(0.1)  # a time budget alone
    assert lr_factor(100, 0, None, 0.1, time_used=0.0) == pytest.approx(1.0)


def test_a_time_budget_stops_the_run_ends_the_cosine_and_carries_through_a_resume(tmp_path, data_dir):
    """trainer.max_time with trainer.max_steps=-1: Lightning's Timer stops the run, the LR decays over
    the budget (to min_lr at its end), and a resume continues the same clock."""
    common = [f"data.path={SHAKESPEARE}", *TINY, "optim.lr=1e-3", "optim.min_lr=1e-4", "optim.warmup_steps=2",
              "trainer.max_steps=-1", "trainer.val_check_interval=100000"]
    run_dir = tmp_path / "run"
    run_train([*common, "trainer.max_time={seconds: 2}"], run_dir)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    first = ckpt["global_step"]
    assert first > 10
    lrs = [v for _, v in read_scalars(run_dir / "tensorboard")["lr/decay"]]
    assert len(lrs) == first
    assert max(lrs) > 9e-4 and all(a >= b for a, b in zip(lrs[2:], lrs[3:]))  # warmup, then only down
    assert lrs[-1] < 1e-4 + 0.05 * 9e-4  # the cosine's end, at the budget's end
    timer = next(v for k, v in ckpt["callbacks"].items() if k.startswith("Timer"))
    assert 2.0 <= timer["time_elapsed"]["train"] < 10

    run_train([*common, "trainer.max_time={seconds: 4}", "resume=auto"], run_dir)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] > first
    logged = read_scalars(run_dir / "tensorboard")
    assert [s for s, _ in logged["lr/decay"]] == list(range(ckpt["global_step"]))  # one axis, no step twice
    assert [s for s, _ in logged["train/loss"]] == list(range(ckpt["global_step"]))
    lrs = dict(logged["lr/decay"])
    assert lrs[first] < 0.75 * 1e-3  # the resumed run starts half way through its 4 s, not at the peak
    assert lrs[ckpt["global_step"] - 1] < 1e-4 + 0.05 * 9e-4
    # a requeue of the finished run: nothing to train, the final metric reported
    assert run_train([*common, "trainer.max_time={seconds: 4}", "resume=auto"], run_dir) == pytest.approx(
        ckpt["gptlab"]["metrics"]["val/loss"])
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == ckpt["global_step"]


def test_a_schedule_needs_steps_or_a_time_budget(tmp_path, data_dir):
    with pytest.raises(ConfigError, match="trainer.max_time"):
        run_train([f"data.path={SHAKESPEARE}", *TINY, "trainer.max_steps=-1"], tmp_path / "run")


@pytest.mark.parametrize("precision, clip, fused", [("32-true", 1.0, True), ("bf16-mixed", 0.0, True),
                                                    ("bf16-mixed", 1.0, False)])
def test_fused_adamw_by_default_except_where_lightning_cannot_clip(precision, clip, fused):
    import lightning as L

    module = LanguageModel(model=TINY_GPT, optim={"decay_steps": 10})
    module.trainer = L.Trainer(accelerator="cpu", precision=precision, gradient_clip_val=clip, max_steps=10,
                               logger=False, enable_checkpointing=False, enable_progress_bar=False)
    defaults = module.configure_optimizers()["optimizer"].defaults
    assert bool(defaults["fused"]) is fused and bool(defaults["foreach"]) is not fused


def test_weight_decay_groups_survive_flattened_parameters():
    """FSDP (use_orig_params) shows each parameter as a flat 1-D shard when the optimizer is built."""
    module = LanguageModel(model=TINY_GPT, optim={"decay_steps": 10})
    matrices = {id(p) for p in module.model.parameters() if p.dim() >= 2}
    assert matrices
    for p in module.model.parameters():
        p.data = p.data.reshape(-1)
    decay, no_decay = module.configure_optimizers()["optimizer"].param_groups
    assert {id(p) for p in decay["params"]} == matrices
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(module.model.parameters()))
