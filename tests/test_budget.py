"""Compute budgets (gptlab.training.budget): steps from FLOPs or tokens, by hand under DDP and gradient
accumulation, a real run that stops there with its LR schedule ended and DONE saying what was spent,
and the bad inputs refused with one line before anything is written."""

from __future__ import annotations

import json
import math

import hydra
import pytest

from conftest import SHAKESPEARE, TINY, read_scalars
from gptlab.errors import ConfigError
from gptlab.models import build_model
from gptlab.training.budget import Budget, budget_steps, tokens_per_step
from inprocess import compose_config, kept_environ, train_config

# TINY's model: 2 layers, 2 heads, 32 channels, block 32, the 65 characters of tiny Shakespeare
L_, H, C, T, V = 2, 2, 32, 32, 65


def hand_flops_per_token() -> int:
    """6N + 12 L H Q T, N counted by hand: per block two LayerNorms, the qkv and output projections and
    the 4x MLP (weights and biases); the token table (it is the tied head) and the final LayerNorm; the
    position table is a lookup and is not in N."""
    block = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    n = L_ * block + V * C + 2 * C
    return 6 * n + 12 * L_ * H * (C // H) * T


def tiny_model():
    return build_model({"arch": "gpt", "vocab_size": V, "block_size": T, "n_layer": L_, "n_head": H, "n_embd": C})


def test_steps_by_hand_under_ddp_and_accumulation(tmp_path):
    """A DDP Trainer of 2 devices x 2 nodes accumulating 4 micro-batches of 8 windows (built, not
    launched): 1024 tokens per micro-batch, 16384 per optimizer step."""
    from gptlab.training import budget as compute_budget

    assert tiny_model().flops_per_token(T) == hand_flops_per_token()
    assert tokens_per_step(8, 32, devices=2, num_nodes=2, accumulate=4) == 8 * 32 * 16
    flops = 1e11
    expected = math.floor(flops / (hand_flops_per_token() * 8 * 32 * 16))
    assert expected == 128
    assert budget_steps(Budget(flops=flops), hand_flops_per_token(), 8 * 32 * 16) == expected
    assert budget_steps(Budget(tokens=2e6), hand_flops_per_token(), 8 * 32 * 16) == math.floor(2e6 / (8 * 32 * 16))

    cfg = compose_config(["trainer=ddp_cpu", "trainer.num_nodes=2", "trainer.accumulate_grad_batches=4",
                          "data.batch_size=8", f"paths.output_dir={tmp_path}", f"budget.flops={flops}"])
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    assert trainer.world_size == 4
    spend = compute_budget.apply(Budget(flops=flops), cfg, trainer, tiny_model())
    assert spend.steps == expected and trainer.max_steps == expected and cfg.trainer.max_steps == expected
    assert spend.tokens_per_step == 8 * 32 * 16 and spend.flops_per_token == hand_flops_per_token()
    record = spend.record(expected)
    assert record["flops_spent"] == expected * 8 * 32 * 16 * hand_flops_per_token() <= flops


def test_a_budget_run_stops_there_and_says_what_it_spent(tmp_path, data_dir, capsys):
    """budget.tokens=6000 at 8 x 32 tokens per step: 23 steps (the config's max_steps=600 replaced, a
    line says so), the cosine ends at min_lr on the last step, DONE and the trackers hold the spend."""
    from gptlab.run.fit import fit
    from gptlab.run.job import run

    run_dir = tmp_path / "run"
    cfg = train_config([f"data.path={SHAKESPEARE}", *TINY, "budget.tokens=6000", "trainer.val_check_interval=10",
                        "optim=adamw", "optim.warmup_steps=2", "optim.min_lr=1e-4"], run_dir)
    with kept_environ():
        run(lambda: fit(cfg), run_dir)
    steps = 6000 // (8 * 32)
    out = capsys.readouterr().out
    assert f"budget.tokens=6e+03: {steps} steps of 256 tokens" in out and "replaces trainer.max_steps=600" in out
    done = json.loads((run_dir / "DONE").read_text())
    assert done["steps"] == steps
    b = done["budget"]
    assert b["tokens"] == 6000 and b["flops"] is None and b["steps"] == steps and b["tokens_per_step"] == 256
    assert b["flops_per_token"] == hand_flops_per_token() and b["tokens_spent"] == steps * 256
    assert b["flops_spent"] == pytest.approx(steps * 256 * hand_flops_per_token())
    scalars = read_scalars(run_dir / "tensorboard")
    assert scalars["train/tokens"][-1] == (steps - 1, steps * 256)
    assert scalars["budget/flops_spent"][-1][1] == pytest.approx(b["flops_spent"], rel=1e-6)
    from gptlab.training.optim import lr_factor

    # resumed with the same budget (a requeued job): finished, nothing to do
    again = train_config([f"data.path={SHAKESPEARE}", *TINY, "budget.tokens=6000", "optim=adamw",
                          f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"], run_dir)
    with kept_environ():
        outcome = fit(again)
    assert not outcome.trained and outcome.steps == steps and outcome.value == done["value"]
    assert f"finished at step {steps} (trainer.max_steps={steps}); nothing to do" in capsys.readouterr().out
    lr = next(v for k, v in scalars.items() if k.startswith("lr"))
    # the cosine decays over the budget's steps (not the config's 600): at step s the factor of step s
    assert lr[-1][0] == steps - 1
    assert lr[-1][1] == pytest.approx(1e-3 * lr_factor(steps - 1, 2, steps, 0.1), rel=1e-6)
    assert lr[-1][1] < 1e-3 * lr_factor(steps - 1, 2, 600, 0.1) / 5


@pytest.mark.parametrize("overrides, message", [
    (["budget.flops=0"], "budget.flops=0: must be > 0"),
    (["budget.tokens=-5"], "budget.tokens=-5: must be > 0"),
    (["budget.flops=1000"], "budget.flops=1e+03 is too small for one optimizer step: one step (256 tokens x"),
    (["budget.tokens=100"], "budget.tokens=100 is too small for one optimizer step: one step trains on 256 tokens"),
    (["budget.flops=1e12", "budget.tokens=1e6"], "budget.flops=1e+12 and budget.tokens=1e+06: set one of them"),
    (["budget.flops=1e12", "trainer.max_steps=50"], "budget.flops=1e+12 and trainer.max_steps=50 on the command line"),
    (["budget.tokens=1e6", "trainer.max_time={minutes: 1}"], "a time limit could stop the run"),
    (["budget.tokens=1e6", "optim.decay_steps=100"], "drop optim.decay_steps"),
])
def test_bad_budgets_are_one_line_and_leave_nothing(overrides, message, tmp_path, data_dir, capsys):
    from gptlab.run.fit import fit
    from gptlab.run.job import run

    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)  # what Hydra writes before the job starts
    cfg = train_config([f"data.path={SHAKESPEARE}", *TINY, *overrides], run_dir)
    with kept_environ(), pytest.raises(SystemExit) as exit_:
        run(lambda: fit(cfg), run_dir)
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: ") and message in err[0], err
    assert not run_dir.exists()


def test_budget_node_is_typed():
    from gptlab.config import validate_train

    with pytest.raises(ConfigError, match=r"budget.flops='lots': expected a number or null"):
        validate_train(compose_config(["budget.flops=lots"]))
