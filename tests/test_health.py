"""Training health statistics (gptlab.training.health) against reference computations, and the spike
guard's policies (gptlab.training.spikes) on spikes provoked by a test-only callback (health_probes)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from gptlab import checkpoint
from gptlab.config import validate_train
from gptlab.errors import ConfigError, LossSpikeError, NonFiniteLossError
from gptlab.training.health import max_attention_logit

from conftest import SHAKESPEARE, TINY, read_scalars, train_args
from inprocess import compose_config, run_main, run_train

PROBE = "+callbacks.probe._target_=health_probes.Probe"
# spikes judged from step 6 on, checkpoints every 4 steps kept, the schedule independent of max_steps
GUARD = ["callbacks.spikes.warmup=6", "callbacks.spikes.k=4", "callbacks.periodic_checkpoint.every_n_train_steps=4",
         "callbacks.periodic_checkpoint.save_top_k=-1", "optim.decay_steps=40", "trainer.val_check_interval=100"]


def args(*extra: str) -> list[str]:
    return [f"data.path={SHAKESPEARE}", *TINY, *extra]


def probe_record(run_dir: Path, rank: int = 0) -> dict:
    return json.loads((run_dir / f"health_probe_rank{rank}.json").read_text())


def test_statistics_equal_reference_computations(tmp_path, data_dir):
    from health_probes import NormProbe

    run_dir = tmp_path / "run"
    run_train(args("trainer.max_steps=10", "trainer.val_check_interval=10", "callbacks.health.interval=5",
                   "trainer.gradient_clip_val=0.5", "+callbacks.norms._target_=health_probes.NormProbe"), run_dir)
    probe, scalars = NormProbe.last, read_scalars(run_dir / "tensorboard")
    # the global norm before clipping, as an independent computation over all gradients
    reference = [torch.cat([g.flatten() for g in grads]).norm().item() for grads in probe.pre]
    assert [s for s, _ in scalars["train/grad_norm"]] == list(range(10))
    torch.testing.assert_close([v for _, v in scalars["train/grad_norm"]], reference, rtol=1e-5, atol=0)
    # clipping with that norm leaves exactly what torch's clip_grad_norm_ leaves
    for pre, post in zip(probe.pre, probe.post):
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in pre]
        for p, g in zip(params, pre):
            p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        for p, g in zip(params, post):
            torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=0)
    clipped = sum(r > 0.5 for r in reference) / 10
    assert [v for s, v in scalars["train/clip_fraction"]][-1] == pytest.approx(float(reference[-1] > 0.5))
    assert sum(v for _, v in scalars["train/clip_fraction"]) / 10 == pytest.approx(clipped)
    # update-to-weight RMS ratio of the sampled steps (4 and 9), per optimizer group, from snapshots
    ckpt = checkpoint.load(run_dir / "checkpoints" / "last.ckpt")
    groups = ckpt["optimizer_states"][0]["param_groups"]
    for step in (4, 9):
        before, after = probe.params[step]
        for group in groups:
            idx = group["params"]
            delta = torch.cat([(after[i] - before[i]).flatten() for i in idx]).norm()
            weight = torch.cat([before[i].flatten() for i in idx]).norm()
            logged = dict(scalars[f"update_ratio/group_{group['name']}"])[step]
            assert logged == pytest.approx((delta / weight).item(), rel=1e-4)
            assert 0 < logged < 1
    n_layer = 2
    for key in ("act_rms", "attn_logit_max", "grad_norm", "param_norm"):
        for i in range(n_layer):
            assert [s for s, _ in scalars[f"{key}/block{i}"]] == [4, 9]
    # activations and attention scores of the sampled steps, recomputed from each block's input
    assert sorted(probe.sampled) == [4, 9]
    for step, reference in probe.sampled.items():
        for key, value in reference.items():
            assert dict(scalars[key])[step] == pytest.approx(value, rel=1e-5)
    # the hooks live for the forward pass of a sampled step only
    assert probe.hooks_after == [0] * 10


def test_max_attention_logit_matches_the_explicit_scores():
    # grouped queries (4 heads on 2 key heads) too, and a large score past the causal mask that must not count
    q, k = torch.randn(3, 4, 9, 8), torch.randn(3, 2, 9, 8)
    k[:, :, -1] *= 100
    scores = q @ k.repeat_interleave(2, dim=1).transpose(-2, -1) / 8 ** 0.5
    expected = scores.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), -torch.inf).amax()
    assert max_attention_logit(q, k).item() == pytest.approx(expected.item(), rel=1e-6)
    assert max_attention_logit(q, k).item() < scores.amax().item()


def test_skip_discards_that_update_and_holds_the_schedule(tmp_path, data_dir, capsys):
    # policy rollback before any checkpoint exists: it skips instead, and says so once
    run_dir = tmp_path / "run"
    run_train(args("trainer.max_steps=14", *GUARD, "callbacks.periodic_checkpoint.every_n_train_steps=50",
                   "callbacks.spikes.policy=rollback", PROBE, "+callbacks.probe.corrupt_step=10"), run_dir)
    assert capsys.readouterr().out.count("no checkpoint before this step yet; skipping the update instead") == 1
    rec = probe_record(run_dir)
    assert [(e["step"], e["kind"], e["action"]) for e in rec["events"]] == [(10, "spike", "skip")]
    assert rec["unchanged"] == {"10": True}  # no update at the spike's step
    # the data moves on (one batch per step), the schedule does not advance over the skipped step
    assert rec["next_batch"] == list(range(1, 15))  # (the index after the batch in hand)
    assert rec["scheduler_epoch"] == list(range(11)) + [s - 1 for s in range(11, 14)]
    assert rec["lr"][11] == rec["lr"][10]
    scalars = read_scalars(run_dir / "tensorboard")
    assert dict(scalars["train/spikes"])[9] == 0 and dict(scalars["train/spikes"])[10] == 1


def test_rollback_restores_the_checkpoint_and_goes_on_past_the_spike(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    overrides = args("trainer.max_steps=16", *GUARD, "callbacks.spikes.policy=rollback", "callbacks.spikes.lr_scale=0.5",
                     PROBE, "+callbacks.probe.lr_spike_step=9")
    run_train(overrides, run_dir)
    rec = probe_record(run_dir)
    rollbacks = [e for e in rec["events"] if e["action"] == "rollback"]
    assert rollbacks and rollbacks[0]["step"] == 10 and Path(rollbacks[0]["checkpoint"]).name == "step000008.ckpt"
    saved = checkpoint.load(run_dir / "checkpoints" / "step000008.ckpt")
    # after the rolled-back step the weights are the checkpoint's, exactly
    with torch.no_grad():
        expected = torch.cat([saved["state_dict"]["model." + n].flatten() for n, _ in _names(saved)])
    torch.testing.assert_close(torch.tensor(rec["weights_after"]["10"]), expected, rtol=0, atol=0)
    # the batches go on past the spike (no batch is replayed), the learning rate is halved
    assert rec["next_batch"] == list(range(1, 17))
    assert rec["lr"][12] == pytest.approx(0.5 * _lr_at(run_dir, 12), rel=1e-6)
    assert not any(e["kind"] == "non-finite" for e in rec["events"][1:])

    # SIGKILL during the recovery (resume from the checkpoint it rolled back to) and after it (from the
    # next checkpoint) both end where the uninterrupted run ended
    for resume_from in ("step000008.ckpt", "step000012.ckpt"):
        copy = tmp_path / f"from-{resume_from}"
        shutil.copytree(run_dir, copy)
        resume_step = checkpoint.info(copy / "checkpoints" / resume_from).step
        for ckpt in (copy / "checkpoints").glob("*.ckpt"):
            if ckpt.name != resume_from and checkpoint.info(ckpt).step >= resume_step:
                ckpt.unlink()  # what a kill at that point would have left
        run_train(overrides + [f"ckpt_path={copy / 'checkpoints' / resume_from}"], tmp_path / "stray")
        again = probe_record(copy)
        assert again["final"] == rec["final"], f"resumed from {resume_from}"
        assert [e["step"] for e in again["events"]] == [e["step"] for e in rec["events"]]


def _names(ckpt: dict) -> list[tuple[str, None]]:
    from gptlab.models import build_model

    model = build_model(ckpt["hyper_parameters"]["model"])
    return [(n, None) for n, _ in model.named_parameters()]


def _lr_at(run_dir: Path, step: int) -> float:
    from gptlab.training.optim import OptimConfig, lr_factor

    cfg = OptimConfig(**checkpoint.load(run_dir / "checkpoints" / "last.ckpt")["hyper_parameters"]["optim"])
    return cfg.lr * lr_factor(step, cfg.warmup_steps, cfg.decay_steps, cfg.min_lr / cfg.lr)


def test_stop_ends_the_run_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    with pytest.raises(LossSpikeError, match=r"loss spike \([\d.]+\) at step 10; stopping"):
        run_train(args("trainer.max_steps=16", *GUARD, "callbacks.spikes.policy=stop", PROBE,
                       "+callbacks.probe.corrupt_step=10"), run_dir)
    assert max(checkpoint.info(p).step for p in (run_dir / "checkpoints").glob("*.ckpt")) == 8


def test_cap_on_consecutive_skips_ends_the_run(tmp_path, data_dir):
    with pytest.raises(LossSpikeError, match=r"3 loss spikes in a row .*max_consecutive=2"):
        run_train(args("trainer.max_steps=30", *GUARD, "callbacks.spikes.policy=skip", "callbacks.spikes.max_consecutive=2",
                       PROBE, "+callbacks.probe.lr_spike_step=9", "+callbacks.probe.lr_factor=1e6"), tmp_path / "run")


def test_non_finite_validation_is_caught_before_the_text_sample(tmp_path, data_dir):
    # without the rule, the text sample's torch.multinomial raised a RuntimeError on such a model
    with pytest.raises(NonFiniteLossError, match="non-finite validation loss at step 2; stopping"):
        run_train(args("trainer.max_steps=4", "trainer.val_check_interval=2", PROBE,
                       "+callbacks.probe.nan_weights_at_validation=true"), tmp_path / "run")
    with pytest.raises(NonFiniteLossError, match="non-finite validation loss at step 2"):
        run_train(args("trainer.max_steps=4", "trainer.val_check_interval=2", "~callbacks.spikes", PROBE,
                       "+callbacks.probe.nan_weights_at_validation=true"), tmp_path / "bare")


@pytest.mark.parametrize("override, needle", [
    ("callbacks.spikes.k=0", "callbacks.spikes.k=0: must be > 0.0"),
    ("callbacks.spikes.k=-1.5", "callbacks.spikes.k=-1.5: must be > 0.0"),
    ("callbacks.health.interval=0", "callbacks.health.interval=0: must be >= 1"),
    ("callbacks.spikes.policy=retry", "callbacks.spikes.policy='retry': choose one of warn, skip, rollback, stop"),
])
def test_bad_settings_are_one_line_errors(override, needle):
    with pytest.raises(ConfigError) as info:
        validate_train(compose_config([override]))
    assert str(info.value) == needle


def test_diverging_run_stops_with_the_non_finite_error(tmp_path, data_dir):
    # AdamW at optim.lr=60 without warmup diverges: NonFiniteLossError (train.py: one `Error:` line, exit 1)
    with pytest.raises(NonFiniteLossError, match=r"non-finite (training loss|gradient norm) \((nan|inf)\) at step \d+; stopping"):
        run_train(args("trainer.max_steps=30", "trainer.val_check_interval=10", "optim=adamw", "optim.lr=60",
                       "optim.warmup_steps=0"), tmp_path / "run")


@pytest.mark.slow
def test_ddp_ranks_take_the_same_decision(tmp_path, data_dir, monkeypatch):
    # 2 CPU processes (rank 0: train.py's main in this one), rank 1 alone sees the corrupted batch: both
    # skip that step, weights stay equal
    run_dir = tmp_path / "ddp"
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    assert run_main(train_args(run_dir, "trainer=ddp_cpu", "trainer.devices=2", "trainer.max_steps=10", *GUARD,
                               "callbacks.health.interval=5", "callbacks.spikes.policy=skip", PROBE,
                               "+callbacks.probe.corrupt_step=8", "+callbacks.probe.corrupt_rank=1")) == 0
    ranks = [probe_record(run_dir, r) for r in (0, 1)]
    assert [(e["step"], e["action"]) for e in ranks[0]["events"]] == [(8, "skip")]
    assert ranks[0]["events"] == ranks[1]["events"]
    assert ranks[0]["unchanged"] == ranks[1]["unchanged"] == {"8": True}
    assert ranks[0]["final"] == ranks[1]["final"]
    done = json.loads((run_dir / "DONE").read_text())
    assert [(e["step"], e["action"]) for e in done["spikes"]] == [(8, "skip")]
    # the sampled steps' statistics, over both ranks' batches, reached the tracker (no rank waited alone)
    scalars = read_scalars(run_dir / "tensorboard")
    assert [s for s, _ in scalars["attn_logit_max/block0"]] == [s for s, _ in scalars["act_rms/block1"]] == [4, 9]
