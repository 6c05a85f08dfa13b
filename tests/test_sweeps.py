"""Hydra sweeps through train.py: a failing job is recorded and the sweep goes on (basic, joblib and submitit
launchers), Optuna studies persist in SQLite, continue after a kill and are shared by concurrent sweepers."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from conftest import ROOT, SHAKESPEARE, TINY, env_for, run_script

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


def test_a_diverging_job_is_recorded_and_the_grid_goes_on(tmp_path, data_dir):
    sweep_dir = tmp_path / "grid"
    proc = run_script("train.py", sweep_args(sweep_dir, f"optim.lr={DIVERGE},{FINE}"), data_dir, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "[gptlab] 2 jobs: 1 finished, 1 failed (#0 non-finite training loss" in proc.stderr
    job_dirs = jobs(sweep_dir)
    assert list(job_dirs) == ["0", "1"]
    assert_failed_and_finished(job_dirs)


def test_joblib_jobs_run_in_their_own_processes_and_fail_alone(tmp_path, data_dir):
    sweep_dir = tmp_path / "joblib"
    proc = run_script("train.py", sweep_args(sweep_dir, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                                             f"optim.lr={DIVERGE},{FINE}"), data_dir, check=False)
    assert proc.returncode == 1 and "2 jobs: 1 finished, 1 failed" in proc.stderr, proc.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    job_dirs = jobs(sweep_dir)
    assert_failed_and_finished(job_dirs)
    # TensorBoard names its event files events.out.tfevents.<time>.<host>.<pid>.<n>
    pids = {next((j / "tensorboard").glob("events.out.tfevents.*")).name.split(".")[-2] for j in job_dirs.values()}
    assert len(pids) == 2, "both jobs ran in the same process"


def test_submitit_local_launcher_runs_a_sweep(tmp_path, data_dir):
    """The SLURM path (hydra/launcher=slurm is submitit_slurm) with submitit's local executor: only the
    scheduler itself is left untested."""
    sweep_dir = tmp_path / "submitit"
    run_script("train.py", sweep_args(sweep_dir, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                                      f"optim.lr={FINE},2e-3"), data_dir)
    job_dirs = jobs(sweep_dir)
    assert list(job_dirs) == ["0", "1"]
    assert all((j / "DONE").is_file() and (j / "checkpoints" / "last.ckpt").is_file() for j in job_dirs.values())
    assert list((sweep_dir / ".submitit").glob("*/*_result.pkl"))


def optuna_args(sweep_dir: Path, n_trials: int, *extra: str) -> list[str]:
    return ["hparams_search=optuna", f"hydra.sweeper.n_trials={n_trials}", "hydra.sweeper.params=null",
            *sweep_args(sweep_dir, *extra)[1:]]


def study(sweep_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name="gptlab", storage=f"sqlite:///{sweep_dir}/optuna.db")


def counted(trials) -> list:
    return [t for t in trials if not t.system_attrs.get("gptlab_killed") and not t.system_attrs.get("gptlab_surplus")]


def test_optuna_study_survives_a_diverging_trial(tmp_path, data_dir):
    sweep_dir = tmp_path / "optuna"
    proc = run_script("train.py", optuna_args(sweep_dir, 4, f"optim.lr=choice({DIVERGE},{FINE})", "seed=7"),
                      data_dir, check=False)
    trials = study(sweep_dir).trials
    states = sorted(t.state.name for t in trials)
    assert states == ["COMPLETE", "COMPLETE", "FAIL", "FAIL"], states  # seed 7 draws each value twice
    assert proc.returncode == 1 and "4 jobs: 2 finished, 2 failed" in proc.stderr, proc.stderr[-3000:]
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_params"] == {"optim.lr": float(FINE)} and math.isfinite(results["best_value"])
    job_dirs = jobs(sweep_dir)
    assert sorted(job_dirs) == [str(t.number) for t in trials]  # job directories are named by trial
    assert_failed_and_finished(job_dirs)


def test_killed_optuna_sweep_continues_to_exactly_n_trials(tmp_path, data_dir):
    sweep_dir = tmp_path / "resumed"
    args = [str(ROOT / "train.py"), *optuna_args(sweep_dir, 3, "optim.lr=tag(log,interval(1e-4,3e-3))",
                                                 "trainer.max_steps=6", "trainer.val_check_interval=3")]
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env_for(data_dir),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (sweep_dir / "1" / ".hydra").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the sweep ended before it could be killed"
    before = {t.number: t.state.name for t in study(sweep_dir).trials}
    assert before[0] == "COMPLETE" and before[1] == "RUNNING"

    rerun = subprocess.run([sys.executable, *args], cwd=ROOT, env=env_for(data_dir), capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    trials = study(sweep_dir).trials
    assert trials[0].state.name == "COMPLETE" and trials[0].params == study(sweep_dir).trials[0].params
    assert trials[1].state.name == "FAIL" and trials[1].system_attrs["gptlab_killed"]  # not counted
    done = counted(trials)
    assert [t.state.name for t in done] == ["COMPLETE"] * 3  # n_trials is the study's total
    assert len({t.number for t in done}) == 3 and all((sweep_dir / str(t.number) / "DONE").is_file() for t in done)


def test_two_sweepers_share_one_study(tmp_path, data_dir):
    sweep_dir = tmp_path / "shared"
    args = [sys.executable, str(ROOT / "train.py"), *optuna_args(sweep_dir, 4, "optim.lr=tag(log,interval(1e-4,3e-3))")]
    procs = [subprocess.Popen(args + [f"hydra.job.name=sweeper{i}"], cwd=ROOT, env=env_for(data_dir),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outputs]
    done = counted(study(sweep_dir).trials)
    assert [t.state.name for t in done] == ["COMPLETE"] * 4  # the budget was split, not doubled
    owners = {t.system_attrs["gptlab_owner"].rsplit("-", 1)[0] for t in done}
    assert len(owners) == 2, "one sweeper ran every trial"
    assert all((sweep_dir / str(t.number) / "DONE").is_file() for t in done)
