"""Optuna studies through train.py: persisted in SQLite, surviving diverging trials, continued after a kill
to exactly n_trials, and shared by concurrent sweepers (gptlab/run/optuna_sweeper.py)."""

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

from conftest import ROOT, env_for
from inprocess import run_main
from test_sweeps import DIVERGE, FINE, assert_failed_and_finished, jobs, sweep_args

pytestmark = pytest.mark.slow


def optuna_args(sweep_dir: Path, n_trials: int, *extra: str) -> list[str]:
    return ["hparams_search=optuna", f"hydra.sweeper.n_trials={n_trials}", "hydra.sweeper.params=null",
            *sweep_args(sweep_dir, *extra)[1:]]


def study(sweep_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name="gptlab", storage=f"sqlite:///{sweep_dir}/optuna.db")


def counted(trials) -> list:
    return [t for t in trials if not t.system_attrs.get("gptlab_killed") and not t.system_attrs.get("gptlab_surplus")]


def wait_for_trial(sweep_dir: Path, number: int, proc: subprocess.Popen) -> None:
    """Until the sweep in `proc` has started trial `number` (its job directory has its config), or ended."""
    deadline = time.time() + 240
    while not (sweep_dir / str(number) / ".hydra").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)


def test_optuna_study_survives_a_diverging_trial(tmp_path, data_dir, capfd):
    sweep_dir = tmp_path / "optuna"
    code = run_main(optuna_args(sweep_dir, 4, f"optim.lr=choice({DIVERGE},{FINE})", "seed=7"))
    err = capfd.readouterr().err
    trials = study(sweep_dir).trials
    states = sorted(t.state.name for t in trials)
    assert states == ["COMPLETE", "COMPLETE", "FAIL", "FAIL"], states  # seed 7 draws each value twice
    assert code == 1 and "4 jobs: 2 finished, 2 failed" in err, err[-3000:]
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_params"] == {"optim.lr": float(FINE)} and math.isfinite(results["best_value"])
    job_dirs = jobs(sweep_dir)
    assert sorted(job_dirs) == [str(t.number) for t in trials]  # job directories are named by trial
    assert_failed_and_finished(job_dirs)


def test_killed_optuna_sweep_continues_to_exactly_n_trials(tmp_path, data_dir, capfd):
    """A sweep SIGKILLed during its second trial, then the same command again (in this process)."""
    sweep_dir = tmp_path / "resumed"
    args = optuna_args(sweep_dir, 3, "optim.lr=tag(log,interval(1e-4,3e-3))", "trainer.max_steps=6",
                       "trainer.val_check_interval=3")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env_for(data_dir),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_trial(sweep_dir, 1, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the sweep ended before it could be killed"
    before = {t.number: t.state.name for t in study(sweep_dir).trials}
    assert before[0] == "COMPLETE" and before[1] == "RUNNING"

    assert run_main(args) == 0, capfd.readouterr().err[-3000:]
    trials = study(sweep_dir).trials
    assert trials[0].state.name == "COMPLETE" and trials[0].params == study(sweep_dir).trials[0].params
    assert trials[1].state.name == "FAIL" and trials[1].system_attrs["gptlab_killed"]  # not counted
    done = counted(trials)
    assert [t.state.name for t in done] == ["COMPLETE"] * 3  # n_trials is the study's total
    assert len({t.number for t in done}) == 3 and all((sweep_dir / str(t.number) / "DONE").is_file() for t in done)


def test_two_sweepers_share_one_study(tmp_path, data_dir, capfd):
    """One sweeper in a process of its own, the other in this process, started once the first one runs a
    trial (a Python start takes seconds, in which this one could take the whole budget)."""
    sweep_dir = tmp_path / "shared"
    args = optuna_args(sweep_dir, 4, "optim.lr=tag(log,interval(1e-4,3e-3))")
    other = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, "hydra.job.name=sweeper0"], cwd=ROOT,
                             env=env_for(data_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_trial(sweep_dir, 0, other)
        code = run_main([*args, "hydra.job.name=sweeper1"])
    finally:
        _, err = other.communicate(timeout=300)
    assert other.returncode == 0, err[-2000:]
    assert code == 0, capfd.readouterr().err[-2000:]
    done = counted(study(sweep_dir).trials)
    assert [t.state.name for t in done] == ["COMPLETE"] * 4  # the budget was split, not doubled
    owners = {t.system_attrs["gptlab_owner"].rsplit("-", 1)[0] for t in done}
    assert len(owners) == 2, "one sweeper ran every trial"
    assert all((sweep_dir / str(t.number) / "DONE").is_file() for t in done)


def test_a_study_given_a_run_directory_says_to_give_a_sweep_directory(tmp_path, data_dir, capfd):
    """hparams_search=optuna is a multirun by itself: hydra.run.dir would be ignored, so it is refused."""
    run_dir = tmp_path / "run"
    code = run_main(["hparams_search=optuna", f"hydra.run.dir={run_dir}"])
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert code == 1 and err == [f"Error: this is a sweep (multirun): hydra.run.dir={run_dir} is not used; "
                                 "give hydra.sweep.dir=<dir> instead"], err
    assert not run_dir.exists()
