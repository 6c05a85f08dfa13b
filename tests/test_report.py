"""`python -m gptlab.report`: the table, report.md/csv and plots of a real (tiny) Optuna sweep, the
job statuses from the DONE / FAILED markers, CSV-logger runs, an outputs directory, an RDB study."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import SHAKESPEARE, TINY
from inprocess import run_main_captured
from gptlab.errors import ConfigError
from gptlab.report import build_report, mark_done, mark_failed, report, sweep_name
from gptlab.report.__main__ import main as cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, data_dir) -> Path:
    """Two Optuna trials of 4 steps each: optim.lr and model.n_layer searched, the rest fixed."""
    sweep_dir = tmp_path_factory.mktemp("report") / "sweep"
    tiny = [a for a in TINY if not a.startswith("model.n_layer=")]
    code, _, err = run_main_captured([
        "-m", f"data.path={SHAKESPEARE}", *tiny, "hparams_search=optuna",
        "hydra.sweeper.n_trials=2", "model.n_layer=choice(1,2)", "model.dropout=0.0",
        "trainer.max_steps=4", "trainer.val_check_interval=2", "callbacks.text_sample.max_new_tokens=4",
        f"hydra.sweep.dir={sweep_dir}", "+hydra.callbacks.report._target_=gptlab.report.SweepReport",
    ])
    assert code == 0, err[-3000:]
    return sweep_dir


@pytest.fixture
def copy(sweep, tmp_path) -> Path:
    """A copy of the sweep that a test may add markers to."""
    return Path(shutil.copytree(sweep, tmp_path / "sweep"))


def finish(job: Path, value: float, steps: int = 4) -> None:
    mark_done(job, "val/loss", value, steps, 1.5)


def test_sweep_report_callback_wrote_the_report(sweep):
    md = (sweep / "report.md").read_text()
    assert "2 jobs: 2 finished, 0 failed, 0 running" in md and md.count("| optim.lr=") == 2
    assert (sweep / "val_loss.png").is_file() and (sweep / "report.csv").is_file()


def test_report_of_a_running_sweep_names_every_job(copy):
    for done in copy.glob("*/DONE"):  # as while the jobs run: no marker yet
        done.unlink()
    rep = build_report(copy, write=False)
    names = [j.name for j in rep.jobs]
    # the sampled values, not what every job shares (data.path, model.dropout=0.0, ...)
    assert len(set(names)) == 2 and all(n.startswith("optim.lr=") for n in names)
    assert not any("dropout" in n or "data.path" in n or "(" in n for n in names)
    assert {j.status for j in rep.jobs} == {"running"}
    for job in rep.jobs:
        assert job.steps == 4 and job.tokens == 4 * 8 * 32  # steps x batch x block
        assert [s for s, _ in job.val_curve] == [2, 4]
        assert job.best_val == min(v for _, v in job.val_curve) and job.final_val == job.val_curve[-1][1]
        assert job.value == job.final_val  # the last logged value of the optimised metric
    values = [j.value for j in rep.jobs]
    assert values == sorted(values)  # best first
    assert names[0] in rep.table and names[1] in rep.table and "running" in rep.table


def test_report_files_and_statuses(copy):
    job0, job1 = copy / "0", copy / "1"
    finish(job0, 9.5)  # finished, but worse than job 1 by its DONE value
    finish(job1, 1.25)
    rep = build_report(copy)
    assert [j.path.name for j in rep.jobs] == ["1", "0"]
    assert [j.value for j in rep.jobs] == [1.25, 9.5]
    assert {p.name for p in rep.files} == {"report.md", "report.csv", "val_loss.png", "optuna_history.png",
                                           "optuna_importance.png"}
    for p in rep.files:
        assert p.is_file() and p.stat().st_size > 0
    assert (copy / "val_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (copy / "report.md").read_text()
    names = {j.path.name: j.name for j in rep.jobs}
    assert names["0"] in md and names["1"] in md and "![val_loss](val_loss.png)" in md
    assert "2 finished, 0 failed, 0 running" in md
    rows = list(csv.DictReader((copy / "report.csv").open()))
    assert [r["job"] for r in rows] == ["1", "0"]
    assert rows[0]["status"] == "finished" and float(rows[0]["value"]) == 1.25 and rows[0]["seconds"] == "1.5"
    assert f"Optuna study read from sqlite:///{copy}/optuna.db" in " ".join(rep.notes), rep.notes

    # a failure: FAILED wins over DONE, its reason is shown truncated and in full in the CSV
    reason = "non-finite training loss (nan) at step 3; stopping. " + "x" * 80
    mark_failed(job1, reason + "\nTraceback (most recent call last): ...")
    rep = build_report(copy)
    failed = next(j for j in rep.jobs if j.path.name == "1")
    assert failed.status == "failed" and failed.reason == reason
    assert rep.jobs[-1] is failed  # after the finished one, whatever it logged
    line = next(l for l in rep.table.splitlines() if l.startswith("1 "))
    assert "failed: non-finite training loss (nan) at step 3" in line and reason not in line
    assert any(r["reason"] == reason for r in csv.DictReader((copy / "report.csv").open()))


def test_cli_prints_the_table_and_writes_files(copy, data_dir, capsys):
    cli([str(copy)])
    out = capsys.readouterr().out
    assert out.count("optim.lr=") == 2
    assert "best val/loss" in out and "wrote report.md, report.csv, val_loss.png" in out
    # a path without runs: one line
    empty = copy / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as exit_:
        cli([str(empty)])
    assert exit_.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        f"Error: no runs under {empty} (a run directory holds .hydra/config.yaml, written by train.py)"]


def test_outputs_dir_reports_every_group(copy, tmp_path):
    outputs = tmp_path / "outputs"
    shutil.copytree(copy, outputs / "train" / "multiruns" / "a")
    shutil.copytree(copy / "0", outputs / "train" / "runs" / "r1")  # a single run
    reps = report(outputs)
    assert [r.group for r in reps] == [outputs / "train" / "multiruns" / "a", outputs / "train" / "runs"]
    assert len(reps[0].jobs) == 2 and len(reps[1].jobs) == 1
    # a group of one job is named after its experiment
    assert reps[1].jobs[0].name == "shakespeare_char_cpu"
    assert (outputs / "train" / "runs" / "report.md").is_file()
    assert (outputs / "train" / "multiruns" / "a" / "val_loss.png").is_file()
    with pytest.raises(ConfigError, match="no such directory"):
        report(tmp_path / "missing")
    with pytest.raises(ConfigError, match="no runs under"):
        report(copy / "0" / "checkpoints")


def test_csv_logger_run(copy):
    from lightning.pytorch.loggers import CSVLogger

    job = copy / "0"
    shutil.rmtree(job / "tensorboard")
    (job / "DONE").unlink()  # the steps and value then come from the CSV
    logger = CSVLogger(save_dir=job / "csv")  # as `+logger.csv._target_=...CSVLogger` would write it
    for step, loss in ((9, 3.0), (19, 2.5), (29, 2.75)):
        logger.log_metrics({"train/loss": loss + 0.1, "train/tokens": (step + 1) * 256.0}, step=step)
        logger.log_metrics({"val/loss": loss}, step=step)
    logger.save()
    assert list((job / "csv").rglob("metrics.csv"))
    rep = build_report(copy)
    read = next(j for j in rep.jobs if j.path.name == "0")
    assert read.val_curve == [(10, 3.0), (20, 2.5), (30, 2.75)]
    assert read.best_val == 2.5 and read.final_val == 2.75 and read.steps == 30 and read.tokens == 30 * 256


def test_sweep_name_drops_the_fixed_overrides(tmp_path):
    sweep_dir = tmp_path / "grid"
    job = sweep_dir / "3"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["optim.lr=3e-3", "model.n_layer=4", "seed=1"]))
    (sweep_dir / "multirun.yaml").write_text(yaml.safe_dump(
        {"hydra": {"overrides": {"task": ["optim.lr=1e-3,3e-3", "model.n_layer=2,4", "seed=1"]}}}))
    assert sweep_name(job) == "optim.lr=3e-3,model.n_layer=4"
