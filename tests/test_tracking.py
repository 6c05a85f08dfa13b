"""Trackers (gptlab/run/trackers.py): CSV, W&B (offline), MLflow (SQLite store) and TensorBoard, alone and
together, read back with each tool's own reader; resume continues the same W&B and MLflow run."""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import pytest
import yaml
from conftest import SHAKESPEARE, TINY, mlflow_store, read_scalars
from hydra.core.hydra_config import HydraConfig
from inprocess import compose_config, run_train

from gptlab import checkpoint
from gptlab.run import trackers as tracking
from gptlab.errors import ConfigError

QUICK = ["trainer.max_steps=6", "trainer.val_check_interval=3", "~callbacks.text_sample", "~callbacks.throughput"]


def overrides(data_dir: Path, *extra: str) -> list[str]:
    return [f"data.path={SHAKESPEARE}", f"paths.data_dir={data_dir}", *TINY, *QUICK, *extra]


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-dir").mkdir()


def wandb_records(run_file: Path) -> list:
    """The records of a W&B transaction log (`run-<id>.wandb`), parsed with W&B's own protobuf schema.

    wandb 0.31 ships no Python reader (the old `wandb.sdk.internal.datastore` went with the Go core);
    the file is a LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then 32 KiB
    blocks of chunks, each with a 7-byte header (CRC-32C, length, type FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:7] == b":W&B" + struct.pack("<HB", 0xBEE1, 0), "not a W&B transaction log"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            records.append(pb.Record.FromString(pending))
            pending = b""
    return records


def wandb_run(run_file: Path) -> dict:
    """A W&B offline run file as {id, name, config, history: [{key: value}], exit_code}."""
    import json

    out: dict = {"history": [], "config": {}, "exit_code": None}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["id"], out["name"] = record.run.run_id, record.run.display_name
        elif kind == "config":
            for item in record.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out


def wandb_runs(run_dir: Path) -> list[dict]:
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))  # named by start time
    return [wandb_run(f) for f in files]


# -- names ---------------------------------------------------------------------------------------
def test_run_name_is_the_overrides_without_the_noise():
    def name(args: list[str]) -> str:
        cfg = compose_config(args, hydra_cfg=True)
        HydraConfig().set_config(cfg)
        return tracking.run_name(cfg)

    noise = ["hydra.run.dir=/tmp/x", "paths.log_dir=/tmp", f"data.path={SHAKESPEARE}", "resume=auto",
             "~callbacks.progress_bar", "logger=[tensorboard,csv]", "+logger.csv.flush_logs_every_n_steps=5"]
    assert name(["optim.lr=3e-3", *noise, "model.n_layer=4"]) == "optim.lr=3e-3,model.n_layer=4"
    assert name(noise) == "shakespeare_char_cpu"  # the default experiment
    assert name(["experiment=shakespeare_char", "seed=1"]) == "experiment=shakespeare_char,seed=1"


def test_the_view_of_single_runs_links_each_run_once(tmp_path):
    """naming.link_in_view outside training: a run keeps its first link, a taken place gets a count,
    event files outside the log directory (or that the view would hold) get none, and a view that cannot
    be made is a warning."""
    from gptlab.run.naming import link_in_view

    HydraConfig().set_config(compose_config([], hydra_cfg=True))  # a single run
    runs = [tmp_path / task / "runs" / "2026-12-03_10-00-00" for task in ("train", "other")]
    for run in runs:
        (run / "tensorboard").mkdir(parents=True)
        link_in_view(run / "tensorboard", "a/b", run, tmp_path, "exp")
    link_in_view(runs[0] / "tensorboard", "resumed", runs[0], tmp_path, "exp")  # a resume by another name
    view = tmp_path / "tensorboard"
    links = {str(p.relative_to(view)): p.resolve() for p in view.glob("*/*")}
    assert links == {"exp/2026-12-03_10-00-00 a_b": runs[0] / "tensorboard",
                     "exp/2026-12-03_10-00-00 a_b (2)": runs[1] / "tensorboard"}
    assert all(p.is_symlink() and not Path(os.readlink(p)).is_absolute() for p in view.glob("*/*"))  # movable

    link_in_view(runs[0] / "tensorboard", "x", runs[0], tmp_path / "elsewhere", "exp")  # not under paths.log_dir
    link_in_view(runs[0] / "tensorboard", "x", runs[0], runs[0], "exp")  # the view would be the event directory
    assert not (tmp_path / "elsewhere").exists() and not (runs[0] / "tensorboard" / "x").exists()
    blocked = tmp_path / "blocked"
    (blocked / "run" / "tensorboard").mkdir(parents=True)
    (blocked / "tensorboard").write_text("")  # a file where the view would go
    with pytest.warns(UserWarning, match="no TensorBoard view"):
        link_in_view(blocked / "run" / "tensorboard", "x", blocked / "run", blocked, "exp")


# -- CSV and TensorBoard together; TensorBoard's view of single runs -------------------------------
def tensorboard_view(log_dir: Path) -> dict[str, dict[str, list[int]]]:
    """What `tensorboard --logdir <log_dir>/tensorboard` lists, read by TensorBoard's own reader: each
    run's name and the steps of its scalars."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer(size_guidance={"scalars": 0})
    mux.AddRunsFromDirectory(str(log_dir / "tensorboard"))
    mux.Reload()
    return {run: {tag: [e.step for e in mux.Scalars(run, tag)] for tag in tags["scalars"]}
            for run, tags in mux.Runs().items()}


def test_tensorboard_and_csv_together(tmp_path, data_dir):
    import pandas as pd
    from test_precision import hparams_plugin

    first = tmp_path / "train" / "runs" / "2026-12-03_10-00-00"
    run_train(overrides(data_dir, "logger=[tensorboard,csv]", "optim.lr=2e-3"), first, log_dir=tmp_path)
    metrics = pd.read_csv(first / "csv" / "metrics.csv")
    train = metrics.dropna(subset=["train/loss"])
    assert train["step"].tolist() == list(range(6))
    val = metrics.dropna(subset=["val/loss"])
    assert val["step"].tolist() == [2, 5]
    # both trackers got the same numbers
    scalars = read_scalars(first / "tensorboard")
    assert [v for _, v in scalars["val/loss"]] == pytest.approx(val["val/loss"].tolist())
    assert yaml.safe_load((first / "csv" / "hparams.yaml").read_text())["optim/lr"] == 2e-3
    # TensorBoard's HPARAMS tab names the run by its overrides
    run = hparams_plugin(first / "tensorboard")["hparams"]["run"]
    assert "optim.lr=2e-3" in run and "data.path" not in run

    # a second run of the same log directory; <log_dir>/tensorboard lists both by name, then date
    second = tmp_path / "train" / "runs" / "2026-12-03_10-05-00"
    run_train(overrides(data_dir), second, log_dir=tmp_path)
    shared = ",".join(o for o in TINY + QUICK if not o.startswith(("~", "callbacks")))  # the rest is noise
    view = tensorboard_view(tmp_path)
    assert set(view) == {f"train/{first.name} {shared},optim.lr=2e-3", f"train/{second.name} {shared}"}
    assert all(s["train/loss"] == list(range(6)) and s["val/loss"] == [2, 5] for s in view.values())
    assert run == f"{shared},optim.lr=2e-3"  # HPARAMS' run column: the same name


# -- W&B and MLflow: one run, failed, then resumed ------------------------------------------------
def test_wandb_and_mlflow_runs_continue_on_resume(tmp_path, data_dir, wandb_offline, mlflow_template):
    import wandb
    from mlflow.tracking import MlflowClient

    uri = mlflow_store(mlflow_template, tmp_path)  # the log directory's store
    common = ["logger=[csv,wandb,mlflow,tensorboard]", "optim.lr=2e-3"]
    run_dir = tmp_path / "run"  # in the log directory tmp_path
    # the first half trains 6 steps, checkpoints, then fails (an unknown optimized_metric)
    with pytest.raises(ConfigError, match="never logged"):
        run_train(overrides(data_dir, *common, "optimized_metric=val/nope"), run_dir, log_dir=tmp_path)
    assert wandb.run is None  # finish() closed it: the next job of a multirun gets a run of its own
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    ids = checkpoint.info(ckpt).trackers
    assert set(ids) == {"wandb", "mlflow"}

    client = MlflowClient(uri)
    assert client.get_run(ids["mlflow"]).info.status == "FAILED"
    (first,) = wandb_runs(run_dir)
    assert first["id"] == ids["wandb"] and first["exit_code"] == 1
    assert "optim.lr=2e-3,optimized_metric=val/nope" in first["name"] and first["config"]["optim/lr"] == 2e-3

    # the second half resumes it to 10 steps
    run_train(overrides(data_dir, *common, f"ckpt_path={ckpt}", "trainer.max_steps=10"), run_dir, log_dir=tmp_path)
    assert wandb.run is None
    assert checkpoint.info(ckpt).trackers == ids

    run = client.get_run(ids["mlflow"])
    assert run.info.status == "FINISHED" and "optim.lr=2e-3" in run.info.run_name
    assert run.data.params["optim/lr"] == "0.002" and run.data.params["trainer/max_steps"] == "6"
    assert run.data.tags["resumed/trainer/max_steps"] == "10"
    assert [m.step for m in client.get_metric_history(ids["mlflow"], "train/loss")] == list(range(10))
    assert [m.step for m in client.get_metric_history(ids["mlflow"], "val/loss")] == [2, 5, 8, 9]
    assert len(client.search_runs([run.info.experiment_id])) == 1  # appended, not forked

    # W&B offline: one file per session, both of the same run id, together steps 0..9
    halves = wandb_runs(run_dir)
    assert [h["id"] for h in halves] == [ids["wandb"]] * 2 and halves[1]["exit_code"] == 0
    steps = [r["trainer/global_step"] for h in halves for r in h["history"] if "train/loss" in r]
    assert steps == list(range(10))
    val = [r["val/loss"] for h in halves for r in h["history"] if "val/loss" in r]
    assert len(val) == 4 and all(math.isfinite(v) for v in val)

    # CSV keeps the first half's rows and appends the second's, each step once
    import pandas as pd

    metrics = pd.read_csv(run_dir / "csv" / "metrics.csv")
    assert metrics.dropna(subset=["train/loss"])["step"].tolist() == list(range(10))

    # TensorBoard's view keeps the run once, under the name it started with (the resume's differs; "/" is "_")
    ((name, scalars),) = tensorboard_view(tmp_path).items()
    assert name.startswith("train/run ") and name.endswith(",optim.lr=2e-3,optimized_metric=val_nope")
    assert scalars["train/loss"] == list(range(10))


# -- a tracker that is not installed -------------------------------------------------------------
def test_missing_tracker_is_one_line_naming_the_extra(tmp_path):
    """Real import failures, no shadowed modules: Lightning's CometLogger without comet_ml (not a gptlab
    dependency, so absent here), and a `_target_` in a module that does not exist."""
    pytest.importorskip("lightning")
    import importlib.util

    assert importlib.util.find_spec("comet_ml") is None, "this test needs comet_ml to be absent"
    for target in ("lightning.pytorch.loggers.CometLogger", "gptlab_no_such_tracker.Logger"):
        cfg = compose_config(["logger=none", f"+logger.extra._target_={target}", f"paths.output_dir={tmp_path}"])
        with pytest.raises(ConfigError) as e:
            tracking.build_loggers(cfg, "run")
        message = str(e.value)
        assert message.startswith("logger.extra cannot start: ") and "\n" not in message
        assert 'pip install "gptlab[track]"' in message and "HINT" not in message
    assert tracking.missing_tracker("logger.x", ValueError("bad value")) is None  # other errors pass through


def test_logger_config_that_does_not_instantiate_is_one_line(tmp_path):
    cfg = compose_config(["logger=csv", "+logger.csv.no_such_argument=1", f"paths.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"^logger.csv cannot start: .*no_such_argument[^\n]*$"):
        tracking.build_loggers(cfg, "run")


def test_resume_into_another_mlflow_store_is_one_line(tmp_path, mlflow_template):
    """A checkpoint's MLflow run that is not in this store (another log_dir): an error, not a forked run."""
    mlflow_store(mlflow_template, tmp_path)
    cfg = compose_config(["logger=mlflow", f"paths.output_dir={tmp_path}", f"paths.log_dir={tmp_path}"])
    elsewhere = checkpoint.Info(path=tmp_path / "last.ckpt", step=6, model={}, tokenizer=None,
                                trackers={"mlflow": "0" * 32})
    with pytest.raises(ConfigError, match=r"^logger.mlflow: the run 0{32} this checkpoint continues is not in sqlite:"):
        tracking.build_loggers(cfg, "run", elsewhere)
