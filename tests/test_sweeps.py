"""Hydra sweeps through train.py: a failing job is recorded and the sweep goes on (basic, joblib and submitit
launchers). Optuna studies: tests/test_studies.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from conftest import SHAKESPEARE, TINY, mlflow_store
from inprocess import run_main

pytestmark = pytest.mark.slow

QUICK = ["trainer.max_steps=2", "trainer.val_check_interval=2", "callbacks.text_sample.max_new_tokens=4",
         "~callbacks.attention_maps", "optim=adamw", "optim.warmup_steps=0", "optim.min_lr=0"]
DIVERGE, FINE = "1e30", "1e-3"  # an lr of 1e30 gives a NaN loss at the first step after the first update


def sweep_args(sweep_dir: Path, *extra: str) -> list[str]:
    return ["-m", f"data.path={SHAKESPEARE}", *TINY, *QUICK, f"hydra.sweep.dir={sweep_dir}", *extra]


def jobs(sweep_dir: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(sweep_dir.iterdir(), key=lambda p: p.name) if p.is_dir() and p.name.isdigit()}


def lr_of(job: Path) -> str:
    overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
    return next(o.split("=", 1)[1] for o in overrides if o.startswith("optim.lr="))


def assert_failed_and_finished(job_dirs: dict[str, Path]) -> None:
    for job in job_dirs.values():
        if float(lr_of(job)) == float(DIVERGE):
            assert (job / "FAILED").read_text().startswith("non-finite training loss"), job
            assert not (job / "DONE").exists()
        else:
            assert (job / "checkpoints" / "last.ckpt").is_file() and (job / "DONE").is_file(), job
            assert math.isfinite(yaml.safe_load((job / "DONE").read_text())["value"])


def test_a_diverging_job_is_recorded_and_the_grid_goes_on(tmp_path, data_dir, monkeypatch, capfd, mlflow_template):
    """Jobs of the basic launcher run one after another in one process (here the test's): a failure must
    not end the sweep,
    and each job's W&B and MLflow runs are its own (finished between jobs), named by its overrides and
    marked failed or finished."""
    from mlflow.tracking import MlflowClient
    from test_tracking import wandb_runs

    sweep_dir = tmp_path / "grid"
    uri = mlflow_store(mlflow_template, tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    code = run_main(sweep_args(sweep_dir, f"optim.lr={DIVERGE},{FINE}", "logger=[tensorboard,wandb,mlflow]",
                               f"paths.log_dir={tmp_path}"))
    err = capfd.readouterr().err
    assert code == 1 and "Traceback" not in err, err[-3000:]
    assert "[gptlab] 2 jobs: 1 finished, 1 failed (#0 non-finite training loss" in err
    job_dirs = jobs(sweep_dir)
    assert list(job_dirs) == ["0", "1"]
    assert_failed_and_finished(job_dirs)
    runs = [wandb_runs(job_dirs[n]) for n in ("0", "1")]
    assert [len(r) for r in runs] == [1, 1] and runs[0][0]["id"] != runs[1][0]["id"]
    names = [f"optim.lr={float(DIVERGE):g}", f"optim.lr={float(FINE):g}"]  # as Hydra writes the swept floats
    assert [r[0]["name"].split(",")[-1] for r in runs] == names
    assert [r[0]["exit_code"] for r in runs] == [1, 0]
    client = MlflowClient(uri)
    found = client.search_runs([client.get_experiment_by_name("gptlab").experiment_id])
    assert {r.info.run_name.split(",")[-1]: r.info.status for r in found} == {names[0]: "FAILED", names[1]: "FINISHED"}


def test_submitit_local_launcher_runs_jobs_in_their_own_processes_and_fails_alone(tmp_path, data_dir, capfd):
    """The SLURM path (hydra/launcher=slurm is submitit_slurm) with submitit's local executor: only the
    scheduler itself is left untested. The sweep runs in this process (train.py's main); each job is a
    process of its own (as with hydra/launcher=joblib): its FAILED / DONE marker is what the sweep's
    tally reads."""
    sweep_dir = tmp_path / "submitit"
    code = run_main(sweep_args(sweep_dir, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                               f"optim.lr={DIVERGE},{FINE}"))
    err = capfd.readouterr().err
    assert code == 1 and "2 jobs: 1 finished, 1 failed" in err, err[-3000:]
    job_dirs = jobs(sweep_dir)
    assert list(job_dirs) == ["0", "1"]
    assert_failed_and_finished(job_dirs)
    assert len(list((sweep_dir / ".submitit").glob("*/*_result.pkl"))) == 2
