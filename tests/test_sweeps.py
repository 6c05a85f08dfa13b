"""Hydra sweeps through train.py: the basic grid sweeper, Optuna (conf/hparams_search/optuna.yaml) and
the joblib launcher (jobs in parallel processes)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml

from conftest import SHAKESPEARE, TINY, read_scalars, run_script

pytestmark = pytest.mark.slow

QUICK = ["trainer.max_steps=2", "trainer.val_check_interval=2", "callbacks.text_sample.max_new_tokens=4"]


def sweep_args(sweep_dir: Path, *extra: str, drop: tuple[str, ...] = ()) -> list[str]:
    """-m with the tiny model; `drop` leaves out TINY's fixed values for keys the sweep varies."""
    tiny = [a for a in TINY if a.split("=")[0] not in drop]
    return ["-m", f"data.path={SHAKESPEARE}", *tiny, *QUICK, f"hydra.sweep.dir={sweep_dir}", *extra]


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted((p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def event_files(job_dir: Path) -> list[Path]:
    return sorted((job_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_basic_sweep_grid(tmp_path, data_dir):
    sweep_dir = tmp_path / "grid"
    proc = run_script("train.py", sweep_args(sweep_dir, "model.n_layer=1,2", "optim.lr=1e-3,3e-3",
                                             drop=("model.n_layer",)), data_dir)
    assert "Launching 4 jobs locally" in proc.stdout + proc.stderr
    jobs = job_dirs(sweep_dir)
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    assert (sweep_dir / "multirun.yaml").is_file()
    seen = set()
    for job in jobs:
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        point = tuple(o for o in overrides if o.startswith(("model.n_layer=", "optim.lr=")))
        seen.add(point)
        # its own TensorBoard run and checkpoint, with the job's hyperparameters
        assert len(event_files(job)) == 1
        assert (job / "checkpoints" / "last.ckpt").is_file()
        hparams = yaml.safe_load((job / "tensorboard" / "hparams.yaml").read_text())
        assert f"model.n_layer={hparams['model/n_layer']}" in point
        assert math.isfinite(read_scalars(job / "tensorboard")["val/loss"][-1][1])
    assert len(seen) == 4


def test_optuna_sweep_writes_best_value(tmp_path, data_dir):
    sweep_dir = tmp_path / "optuna"
    proc = run_script(
        "train.py",
        sweep_args(sweep_dir, "hparams_search=optuna", "hydra.sweeper.n_trials=3",
                   # a smaller search space than the config's (a dimension given here replaces it)
                   "model.n_layer=choice(1,2)", "model.dropout=choice(0.0,0.1)",
                   drop=("model.n_layer",)),
        data_dir,
    )
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["name"] == "optuna"
    assert math.isfinite(results["best_value"])
    assert set(results["best_params"]) == {"optim.lr", "model.n_layer", "model.dropout"}
    assert 1e-4 <= results["best_params"]["optim.lr"] <= 3e-3
    jobs = job_dirs(sweep_dir)
    assert [p.name for p in jobs] == ["0", "1", "2"]
    finals = [float(v) for v in re.findall(r"final val/loss = ([0-9.]+)", proc.stdout)]
    assert len(finals) == 3 and results["best_value"] == pytest.approx(min(finals), abs=1e-4)
    for job in jobs:
        assert len(event_files(job)) == 1


def test_wrong_optimized_metric_fails_the_sweep(tmp_path, data_dir):
    sweep_dir = tmp_path / "nope"
    proc = run_script(
        "train.py",
        sweep_args(sweep_dir, "hparams_search=optuna", "hydra.sweeper.n_trials=1", "optimized_metric=val/nope"),
        data_dir,
        check=False,
    )
    assert proc.returncode != 0
    assert "optimized_metric='val/nope' was never logged" in proc.stderr
    assert "val/loss" in proc.stderr  # the message lists what was logged
    assert not (sweep_dir / "optimization_results.yaml").exists()


def test_joblib_launcher_runs_jobs_in_parallel_processes(tmp_path, data_dir):
    sweep_dir = tmp_path / "joblib"
    proc = run_script("train.py", sweep_args(sweep_dir, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                                             "optim.lr=1e-3,2e-3"), data_dir)
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    jobs = job_dirs(sweep_dir)
    assert [p.name for p in jobs] == ["0", "1"]
    # TensorBoard names its event files events.out.tfevents.<time>.<host>.<pid>.<n>
    files = [event_files(job) for job in jobs]
    assert [len(f) for f in files] == [1, 1]
    pids = {f[0].name.split(".")[-2] for f in files}
    assert len(pids) == 2, "both jobs ran in the same process"
    # (whether the two short jobs overlap in time depends on how fast loky starts its second worker
    # on a loaded machine, so it is not asserted; two worker processes under n_jobs=2 are)
    for job in jobs:
        assert (job / "checkpoints" / "last.ckpt").is_file()
