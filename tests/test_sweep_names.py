"""One naming rule for every tracker of a sweep (gptlab/run/naming.py): a 2x2 grid through train.py
(in-process, Hydra's basic sweeper) with TensorBoard, W&B (offline) and MLflow, each read back with its
own reader, MLflow over HTTP from `mlflow server` on the store gptlab wrote."""

from __future__ import annotations

import os
import time

import pytest

from conftest import SHAKESPEARE, TINY, mlflow_store
from inprocess import run_main
from test_optuna import free_port, get_json, start_server, stop
from test_sweeps import QUICK
from test_tracking import wandb_runs

pytestmark = pytest.mark.slow

# as Hydra writes the swept values into each job's overrides
NAMES = {f"optim.lr={lr},model.n_layer={n}" for lr in ("0.001", "0.003") for n in (1, 2)}


@pytest.fixture(scope="module")
def grid(tmp_path_factory, data_dir, mlflow_template):
    """(the log directory, the URL of `mlflow server` on its MLflow store, the server's process). The
    server starts first (it takes seconds to come up) on the store the grid's jobs then write to, which
    is made first: the server and the jobs would both create its tables."""
    root = tmp_path_factory.mktemp("names")
    uri = mlflow_store(mlflow_template, root)
    port = free_port()
    # the REST API is all the test reads: no job-execution consumers (MLflow 3 starts eight processes for them)
    server = start_server("mlflow", "server", "--backend-store-uri", uri,
                          "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                          MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    saved = dict(os.environ)
    tiny = [a for a in TINY if not a.startswith("model.n_layer=")]
    try:
        os.environ.update(WANDB_MODE="offline", WANDB_DIR=str(root), WANDB_SILENT="true")
        code = run_main(["-m", f"data.path={SHAKESPEARE}", *tiny, *QUICK, "~callbacks.text_sample", "optim.lr=1e-3,3e-3",
                         "model.n_layer=1,2", "logger=[tensorboard,wandb,mlflow]", f"paths.log_dir={root}",
                         f"hydra.sweep.dir={root / 'grid'}"])
        os.environ.clear()
        os.environ.update(saved)
        assert code == 0
        yield root, f"http://127.0.0.1:{port}", server
    finally:
        os.environ.clear()
        os.environ.update(saved)
        stop(server)


def test_tensorboard_names_each_job_by_what_varies(grid):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import plugin_data_pb2

    view = grid[0] / "grid" / "tensorboard"
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

    root, url, server = grid
    jobs = sorted(p for p in (root / "grid").iterdir() if p.name.isdigit())
    runs = [r for job in jobs for r in wandb_runs(job)]
    assert {r["name"] for r in runs} == NAMES
    assert not any("epoch" in h for r in runs for h in r["history"])

    experiment = get_json(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=gptlab",
                          time.time() + 120, server)["experiment"]
    found = MlflowClient(url).search_runs([experiment["experiment_id"]])  # the server's REST API, over HTTP
    assert {r.info.run_name for r in found} == NAMES
    assert all(r.info.status == "FINISHED" and "val/loss" in r.data.metrics and "epoch" not in r.data.metrics
               for r in found)
