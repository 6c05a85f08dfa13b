"""One naming rule for every tracker of a sweep (gptlab/run/naming.py): a 2x2 grid through train.py
(in-process, Hydra's basic sweeper) with TensorBoard, W&B (offline) and MLflow, each read back with its
own reader, MLflow over HTTP from `mlflow server` on the store gptlab wrote."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SHAKESPEARE, TINY
from inprocess import run_main
from test_optuna import free_port, get_json
from test_sweeps import QUICK
from test_tracking import wandb_runs

pytestmark = pytest.mark.slow

# as Hydra writes the swept values into each job's overrides
NAMES = {f"optim.lr={lr},model.n_layer={n}" for lr in ("0.001", "0.003") for n in (1, 2)}


@pytest.fixture(scope="module")
def grid(tmp_path_factory, data_dir) -> Path:
    root = tmp_path_factory.mktemp("names")
    saved = dict(os.environ)
    os.environ.update(WANDB_MODE="offline", WANDB_DIR=str(root), WANDB_SILENT="true")
    tiny = [a for a in TINY if not a.startswith("model.n_layer=")]
    try:
        code = run_main(["-m", f"data.path={SHAKESPEARE}", *tiny, *QUICK, "~callbacks.text_sample", "optim.lr=1e-3,3e-3",
                         "model.n_layer=1,2", "logger=[tensorboard,wandb,mlflow]", f"paths.log_dir={root}",
                         f"hydra.sweep.dir={root / 'grid'}"])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert code == 0
    return root


def test_tensorboard_names_each_job_by_what_varies(grid):
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import plugin_data_pb2

    view = grid / "grid" / "tensorboard"
    mux = EventMultiplexer(size_guidance={"scalars": 0, "tensors": 0})
    mux.AddRunsFromDirectory(str(view))  # what `tensorboard --logdir <sweep dir>/tensorboard` lists
    mux.Reload()
    assert set(mux.Runs()) == NAMES
    for run in NAMES:
        tags = mux.GetAccumulator(run).Tags()["scalars"]
        assert "val/loss" in tags and "epoch" not in tags, tags
        content = mux.PluginRunToTagToContent("hparams")[run]
        infos = [plugin_data_pb2.HParamsPluginData.FromString(c) for c in content.values()]
        experiment = next(i.experiment for i in infos if i.HasField("experiment"))
        # the HPARAMS columns: the swept keys first, then the run's name, then the rest of the config
        order = [h.name for h in experiment.hparam_infos]
        assert order[:3] == ["optim/lr", "model/n_layer", "run"] and "data/batch_size" in order[3:], order[:5]
        start = next(i.session_start_info for i in infos if i.HasField("session_start_info"))
        assert start.hparams["run"].string_value == run


def test_wandb_and_mlflow_use_the_same_names(grid):
    from mlflow.tracking import MlflowClient

    jobs = sorted(p for p in (grid / "grid").iterdir() if p.name.isdigit())
    runs = [r for job in jobs for r in wandb_runs(job)]
    assert {r["name"] for r in runs} == NAMES
    assert not any("epoch" in h for r in runs for h in r["history"])

    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                             f"sqlite:///{grid}/mlflow.db", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        experiment = get_json(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=gptlab",
                              time.time() + 120, proc)["experiment"]
        client = MlflowClient(url)  # the REST API of the server, over HTTP
        found = client.search_runs([experiment["experiment_id"]])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert {r.info.run_name for r in found} == NAMES
    assert all(r.info.status == "FINISHED" and "val/loss" in r.data.metrics and "epoch" not in r.data.metrics
               for r in found)
