"""gptlab's Optuna sweeper beyond the study rules of tests/test_studies.py: Hydra's sweep syntax as Optuna
distributions, a trial worse than the median pruned (its state, marker, tally and report),
optuna-dashboard on a study gptlab wrote, and bad input as one line, with nothing left behind."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from conftest import SHAKESPEARE, TINY
from gptlab.errors import ConfigError
from gptlab.report import build_report
from gptlab.run.optuna_space import grid, search_space
from gptlab.run.pruning import make_pruner
from inprocess import run_main
from test_sweeps import QUICK

pytestmark = pytest.mark.slow


def sweep(sweep_dir: Path, *extra: str) -> list[str]:
    return ["hparams_search=optuna", "hydra.sweeper.params=null", f"data.path={SHAKESPEARE}", *TINY, *QUICK,
            f"hydra.sweep.dir={sweep_dir}", *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*command: str, **env: str) -> subprocess.Popen:
    """A server in a process group of its own (mlflow server starts workers), stopped by `stop`; `env`
    is added to the test's environment."""
    return subprocess.Popen([str(Path(sys.executable).parent / command[0]), *command[1:]], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **env})


def stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 20)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def get_json(url: str, deadline: float, proc: subprocess.Popen) -> object:
    """GET `url` once the server answers (it is still starting), before `deadline`."""
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return json.loads(r.read())
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"no answer from {url} (server exit status {proc.poll()})") from None
            time.sleep(0.5)


def test_hydra_sweep_syntax_as_optuna_distributions():
    space, fixed = search_space(["optim.lr=tag(log, interval(1e-4, 3e-3))", "model.n_layer=choice(2, 4)",
                                 "a=range(1, 9, 2)", "b=range(0, 1, 0.25)", "c=interval(1, 10)", "d=x,y",
                                 "e=shuffle(range(1, 4))", "model.n_layer=4", "~callbacks.progress_bar"])
    assert space == {"optim.lr": FloatDistribution(1e-4, 3e-3, log=True), "a": IntDistribution(1, 7, step=2),
                     "b": FloatDistribution(0.0, 0.75, step=0.25), "c": FloatDistribution(1.0, 10.0),
                     "d": CategoricalDistribution(["x", "y"]), "e": space["e"]}
    assert sorted(space["e"].choices) == [1, 2, 3]
    # a later plain value fixes a key searched before (the command line over the config's params)
    assert fixed == {"model.n_layer": "model.n_layer=4", "~callbacks.progress_bar": "~callbacks.progress_bar"}
    assert grid({"a": space["a"], "b": space["b"]}) == {"a": [1, 3, 5, 7], "b": [0.0, 0.25, 0.5, 0.75]}
    for bad in ("x=tag(log, interval(0, 1))", "x=interval(3, 1)", "x=glob(*)"):
        with pytest.raises(ConfigError, match=rf"^hydra.sweeper.params: {bad.replace('(', '.').replace(')', '.')}: "
                                              r"a search space Optuna cannot express \(.+\)$"):
            search_space([bad])
    with pytest.raises(ConfigError, match="c is a continuous interval; the grid sampler needs"):
        grid({"c": FloatDistribution(0, 1)})
    assert [type(make_pruner(p)).__name__ for p in (None, "none", "median", "hyperband")] == [
        "NopPruner", "NopPruner", "MedianPruner", "HyperbandPruner"]
    pruner = make_pruner({"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 2})
    assert pruner._n_startup_trials == 2


@pytest.mark.parametrize("arg, line", [
    ("hydra.sweeper.pruner=sometimes", "Error: hydra.sweeper.pruner=sometimes: unknown pruner; use none, median, "
                                       "hyperband or {_target_: optuna.pruners.<Pruner>, ...}"),
    ("optim.lr=tag(log,interval(0,1e-3))", "Error: hydra.sweeper.params: optim.lr=tag(log,interval(0,1e-3)): "
                                           "a search space Optuna cannot express ("),
    ("hydra.sweeper.storage=nosuchdb://host/db", "Error: hydra.sweeper.storage=nosuchdb://host/db: cannot open it ("),
    ("hydra.sweeper.storage=sqlite:///{tmp}/file/db/optuna.db", "Error: hydra.sweeper.storage=sqlite:///{tmp}/file/db/optuna.db: cannot open it ("),
])
def test_bad_input_is_one_line_and_leaves_nothing(arg, line, tmp_path, data_dir, capfd):
    (tmp_path / "file").write_text("a file where the storage wants a directory")
    sweep_dir = tmp_path / "sweep"
    code = run_main(sweep(sweep_dir, arg.replace("{tmp}", str(tmp_path))))
    err = [l for l in capfd.readouterr().err.splitlines() if l.strip()]
    assert code == 1 and len(err) == 1 and err[0].startswith(line.replace("{tmp}", str(tmp_path))), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no sweep directory, no study


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, data_dir) -> tuple[Path, int, str]:  # (sweep dir, exit status, stdout)
    """A persistent study of five trials that reached val/loss ~3 by step 2, continued by one trial
    whose learning rate leaves it at the untrained loss (ln 65 = 4.17): the median pruner stops it there."""
    sweep_dir = tmp_path_factory.mktemp("pruning") / "study"
    sweep_dir.mkdir()
    study = optuna.create_study(study_name="gptlab", storage=f"sqlite:///{sweep_dir}/optuna.db")
    for value in (2.9, 3.0, 3.1, 3.2, 3.3):  # MedianPruner starts pruning after 5 finished trials
        study.add_trial(optuna.trial.create_trial(value=value - 0.2, intermediate_values={2: value, 6: value - 0.2}))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = run_main(sweep(sweep_dir, "hydra.sweeper.n_trials=6", "hydra.sweeper.pruner=median", "optim.lr=1e-7",
                              "trainer.max_steps=6", "trainer.val_check_interval=2"))
    return sweep_dir, code, out.getvalue()


def test_a_trial_worse_than_the_median_is_pruned(pruned):
    sweep_dir, code, out = pruned
    assert code == 0, out[-3000:]  # a pruned trial is not a failure
    assert "[gptlab] 1 jobs: 0 finished, 0 failed, 1 pruned (#5 at step 2)" in out
    trial = optuna.load_study(study_name="gptlab", storage=f"sqlite:///{sweep_dir}/optuna.db").trials[5]
    assert trial.state.name == "PRUNED" and list(trial.intermediate_values) == [2], trial
    assert trial.intermediate_values[2] > 4.0
    job = sweep_dir / "5"
    marker = json.loads((job / "PRUNED").read_text())
    assert marker["steps"] == 2 and marker["metric"] == "val/loss" and not (job / "DONE").exists()
    assert (job / "checkpoints" / "last.ckpt").is_file()  # stopped there, not after 6 steps
    rep = build_report(sweep_dir)
    (row,) = [j for j in rep.jobs if j.path == job]
    assert row.status == "pruned" and row.steps == 2 and "pruned at step 2" in rep.table
    assert "1 jobs: 0 finished, 0 failed, 0 running, 1 pruned" in (sweep_dir / "report.md").read_text()


def test_optuna_dashboard_serves_the_study(pruned):
    sweep_dir, _, _ = pruned
    port = free_port()
    proc = start_server("optuna-dashboard", f"sqlite:///{sweep_dir}/optuna.db", "--host", "127.0.0.1", "--port", str(port))
    url = f"http://127.0.0.1:{port}/api/studies"
    try:
        (study,) = get_json(url, time.time() + 60, proc)["study_summaries"]
        trials = get_json(f"{url}/{study['study_id']}", time.time() + 30, proc)["trials"]
    finally:
        stop(proc)
    assert study["study_name"] == "gptlab"
    assert [t["state"] for t in trials] == ["Complete"] * 5 + ["Pruned"]


def test_current_optuna_and_sqlalchemy_without_hydras_former_sweeper():
    from importlib.metadata import PackageNotFoundError, version

    import sqlalchemy

    assert optuna.__version__.split(".")[0] == "5" and sqlalchemy.__version__.split(".")[0] == "2"
    with pytest.raises(PackageNotFoundError):
        version("hydra-optuna-sweeper")
