"""gptlab.run.console: the step progress bar (no epoch counter, validation shown once, the last line
ended before Lightning's closing message), quiet_lightning, the end-of-run summary and job line."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import pytest
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from conftest import SHAKESPEARE, TINY
from gptlab.run.console import job_line, quiet_lightning, summary
from inprocess import run_sample, run_train

# conf/callbacks/default.yaml: progress_bar is gptlab.run.console.StepProgressBar


def train_with_bar(tmp_path: Path, capfd, plain: bool) -> str:
    """A 20-step in-process run with the bar; stdout and Lightning's log lines in one stream, as a
    terminal shows them."""
    tiny = [a for a in TINY if a != "~callbacks.progress_bar"]
    handler = logging.StreamHandler(sys.stdout)
    lightning_log = logging.getLogger("lightning.pytorch")
    lightning_log.addHandler(handler)
    try:
        quiet_lightning()
        run_train([f"data.path={SHAKESPEARE}", *tiny, "trainer.max_steps=20", "trainer.val_check_interval=10",
                   f"callbacks.progress_bar.plain={plain}"], tmp_path / "run")
    finally:
        lightning_log.removeHandler(handler)
    out, err = capfd.readouterr()
    return out + err


def test_plain_lines_one_per_validation(tmp_path, capfd, data_dir, monkeypatch):
    monkeypatch.setenv("GPTLAB_DATA_DIR", str(data_dir))
    out = train_with_bar(tmp_path, capfd, plain=True)
    assert "Epoch" not in out and "Validation" not in out
    lines = out.splitlines()
    steps = [l for l in lines if l.startswith("step ")]
    assert [l.split()[1] for l in steps] == ["10/20", "20/20"]
    assert all("loss " in l and "val/loss " in l and "tok/s" in l and "elapsed" in l for l in steps)
    assert "ETA" in steps[0] and "ETA" not in steps[1]
    assert "\r" not in out
    # Lightning's closing line on its own line, after the last status line
    stopped = next(i for i, l in enumerate(lines) if "Trainer.fit` stopped" in l)
    assert lines[stopped].startswith("`Trainer.fit` stopped") and lines[stopped - 1] == steps[-1]
    # quiet_lightning: no promotions, the GPU line stays
    assert "Tip:" not in out and "litlogger" not in out and "TPU available" not in out
    assert "GPU available" in out


def test_bar_on_a_terminal(tmp_path, capfd, data_dir, monkeypatch):
    monkeypatch.setenv("GPTLAB_DATA_DIR", str(data_dir))
    out = train_with_bar(tmp_path, capfd, plain=False)
    assert "Epoch" not in out and "/-2" not in out
    assert "step 20/20 |" in out and "val/loss=" in out and "tok/s=" in out
    assert "Validation DataLoader" not in out.split("val:")[-1]
    # the bar's last redraw ends its line before "`Trainer.fit` stopped"
    before = out[: out.index("`Trainer.fit` stopped")]
    assert before.endswith("\n") and "step 20/20" in before.rsplit("\r", 1)[-1]


def test_summary_names_paths_and_working_commands(trained_run, data_dir, monkeypatch):
    monkeypatch.setenv("GPTLAB_DATA_DIR", str(data_dir))
    ckpts = trained_run / "checkpoints"
    best, last = next(ckpts.glob("best-*.ckpt")), ckpts / "last.ckpt"
    text = summary(trained_run, best, last, "val/loss", 3.71234, steps=20, seconds=75.2, tokens=5120)
    assert "val/loss 3.7123 after 20 steps, 5.1k tokens in 1:15" in text
    for path in (trained_run, best, last):
        assert str(path) in text
    assert f"tensorboard --logdir {trained_run / 'tensorboard'}" in text
    command = next(l.strip() for l in text.splitlines() if l.strip().startswith("python sample.py"))
    assert command == f"python sample.py ckpt_path={best}"
    # the printed command works
    samples = run_sample([command.split(" ", 2)[2], "num_samples=1", "max_new_tokens=8", "device=cpu"])
    assert len(samples) == 1 and samples[0]
    # paths under the current directory are shown relative to it
    monkeypatch.chdir(trained_run.parent)
    assert f"ckpt_path={best.relative_to(trained_run.parent)}" in summary(trained_run, best, last, "val/loss", 3.7)


def test_job_line(tmp_path):
    run = tmp_path / "sweep" / "3"
    line = job_line(run, "val/loss", 1.70123, steps=600, seconds=151, name="optim.lr=3e-3,model.n_layer=4")
    assert line == f"[job 3] optim.lr=3e-3,model.n_layer=4: val/loss 1.7012 after 600 steps in 2:31 ({run})"


def test_quiet_lightning_keeps_useful_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_lightning()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        warnings.warn("The 'val_dataloader' does not have many workers which may be a bottleneck.", UserWarning)
        warnings.warn("The number of training batches (3) is smaller than the logging interval", UserWarning)
        sync = ("It is recommended to use `self.log({!r}, ..., sync_dist=True)` when logging on epoch level in "
                "distributed setting")
        for name in ("val/loss/play", "hp/best_val_loss"):  # gptlab reduces these over the ranks itself
            warnings.warn(sync.format(name), PossibleUserWarning)
        warnings.warn(sync.format("my/metric"), PossibleUserWarning)  # a user's own metric: worth saying
    assert [str(w.message) for w in caught] == [
        "The number of training batches (3) is smaller than the logging interval", sync.format("my/metric")]
