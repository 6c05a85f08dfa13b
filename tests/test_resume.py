"""Resume: exact after SIGKILL, in the same run directory and TensorBoard run; a requeued finished run is a
no-op; a checkpoint that does not fit the config is refused before anything of its run is touched."""

import shutil

import numpy as np
import pytest
import torch

from gptlab import checkpoint
from gptlab.errors import CheckpointError

from conftest import SHAKESPEARE, TINY, kill_after_checkpoint, read_scalars, train_args
from inprocess import run_main, run_train

pytestmark = pytest.mark.slow  # a SIGKILL'd train.py subprocess and its resume

RESUME_ARGS = ["model.dropout=0.1", "trainer.max_steps=40", "trainer.val_check_interval=8",
               "callbacks.periodic_checkpoint.every_n_train_steps=4", "callbacks.periodic_checkpoint.save_top_k=-1"]


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, data_dir):
    reference = tmp_path / "reference"
    run_train([f"data.path={SHAKESPEARE}", *TINY, *RESUME_ARGS], reference)

    crashed = tmp_path / "crashed"
    newest = kill_after_checkpoint(crashed, train_args(crashed, *RESUME_ARGS), data_dir, step=12)
    assert 12 <= int(newest.stem[4:]) < 40

    # resume that checkpoint from a new invocation (train.py's main, in this process): it continues in its own
    # run directory, and the new invocation's directory does not stay behind (its config is kept in the
    # run's .hydra/resumed-*/)
    stray = tmp_path / "stray"
    assert run_main(train_args(stray, *RESUME_ARGS, f"ckpt_path={newest}")) == 0
    assert not stray.exists()
    assert [p.name for p in (crashed / ".hydra").glob("resumed-*/config.yaml")] == ["config.yaml"]

    ref, got = read_scalars(reference / "tensorboard"), read_scalars(crashed / "tensorboard")
    # the same TensorBoard run, every step exactly once, and the same numbers as without the crash
    assert [s for s, _ in got["train/loss"]] == list(range(40))
    assert [s for s, _ in got["val/loss"]] == [7, 15, 23, 31, 39]
    np.testing.assert_allclose([v for _, v in got["train/loss"]], [v for _, v in ref["train/loss"]], rtol=0, atol=1e-6)
    assert abs(got["val/loss"][-1][1] - ref["val/loss"][-1][1]) <= 1e-6
    assert checkpoint.load(crashed / "checkpoints" / "last.ckpt")["global_step"] == 40


@pytest.fixture
def copied_run(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    return run


def test_resume_continues_step_count_and_tensorboard_run(copied_run):
    run_train([f"data.path={SHAKESPEARE}", *TINY, "trainer.max_steps=30", "trainer.val_check_interval=10",
               f"ckpt_path={copied_run / 'checkpoints' / 'last.ckpt'}"], copied_run.parent / "elsewhere")
    ckpt = torch.load(copied_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 30 and ckpt["TokenDataModule"]["next_train_batch"] == 30
    scalars = read_scalars(copied_run / "tensorboard")
    assert [s for s, _ in scalars["train/loss"]] == list(range(30))
    assert [s for s, _ in scalars["val/loss"]] == [9, 19, 29]
    assert len(list((copied_run / "tensorboard").glob("events.out.tfevents.*"))) == 2


def test_requeued_finished_run_is_a_no_op_that_reports_its_metric(copied_run):
    last = copied_run / "checkpoints" / "last.ckpt"
    before = (last.read_bytes(), sorted(p.name for p in copied_run.rglob("*")))
    value = run_train([f"data.path={SHAKESPEARE}", *TINY, "trainer.max_steps=20", "resume=auto"], copied_run)
    logged = read_scalars(copied_run / "tensorboard")["val/loss"][-1][1]
    assert value == pytest.approx(logged, abs=1e-6)
    assert last.read_bytes() == before[0]  # nothing trained, nothing rewritten
    assert sorted(p.name for p in copied_run.rglob("*") if p.name != "DONE") == before[1]


def test_a_finished_run_is_not_reported_for_data_of_another_vocabulary(copied_run):
    """A requeue of a finished char run given BPE data would report the char run's loss as this data's."""
    last = copied_run / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointError, match="different vocabulary \\(char, 65 characters\\) than data gives now \\(bpe"):
        run_train([f"data.path={SHAKESPEARE}", *TINY, "data.tokenizer=bpe", "trainer.max_steps=20", f"ckpt_path={last}"],
                  copied_run)


@pytest.mark.parametrize("change, needle", [
    (["model.n_layer=3"], "model.n_layer=3 (checkpoint: 2)"),
    (["model.n_embd=48", "model.n_head=3"], "model.n_embd=48 (checkpoint: 32)"),
    (["data.tokenizer=bpe"], "different vocabulary (char, 65 characters)"),
])
def test_a_checkpoint_that_does_not_fit_is_refused_before_its_run_is_touched(copied_run, change, needle):
    before = sorted((p.name, p.stat().st_size) for p in copied_run.rglob("*"))
    overrides = [f"data.path={SHAKESPEARE}", *TINY, "trainer.max_steps=30", "resume=auto"]
    overrides = [o for o in overrides if o.split("=")[0] not in {c.split("=")[0] for c in change}] + change
    with pytest.raises(CheckpointError, match="ckpt_path=.*last.ckpt") as info:
        run_train(overrides, copied_run)
    assert needle in str(info.value) and "\n" not in str(info.value)
    # no event file with purge_step, no checkpoint, nothing at all was written into the run
    assert sorted((p.name, p.stat().st_size) for p in copied_run.rglob("*")) == before
