"""Experiment trackers: any Lightning logger, alone or several at once, named after the run.

Each file of conf/logger/ adds one entry under `logger:` (TensorBoard, CSV, W&B, MLflow), so
`logger=[tensorboard,wandb]` composes several. This module builds them for a run:

* a readable name, `run_name(cfg)` (gptlab.run.naming's rule): in a sweep the overrides that vary
  (`optim.lr=3e-3,model.n_layer=4`), else the run's overrides or its experiment's name; W&B and MLflow
  show it as the run name, TensorBoard as the `run` column of HPARAMS (the swept keys first) and as the
  name of the run's link in a view (`<sweep dir>/tensorboard/<name>`, `<log_dir>/tensorboard/<experiment>/<date> <name>`,
  see naming.link_in_view); Lightning's `epoch` scalar is left out of every tracker;
* resume continues the same run in each tracker instead of forking one: TensorBoard drops the events a
  killed run wrote after its checkpoint (`purge_step`), CSV keeps the rows before it, and W&B and MLflow
  reopen the run whose id the checkpoint keeps in `gptlab.trackers` (see gptlab/checkpoint.py);
* `finish(loggers, status)` closes the runs at the end of each job, so the next job of a multirun
  (same process) starts a run of its own, and a failed job is marked failed.
"""

from __future__ import annotations

import csv
import importlib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig, OmegaConf

from gptlab.compat import close_wandb_run, run_started
from gptlab.errors import ConfigError
from gptlab.run import naming

if TYPE_CHECKING:
    from gptlab.checkpoint import Info

EXTRA = 'pip install "gptlab[track]"'


# -- names and hyperparameters ------------------------------------------------------------------
def _overrides(cfg: DictConfig) -> tuple[list[str], list[str], str]:
    """(this job's overrides, those its whole sweep shares (none for a single run), its experiment's name)."""
    from hydra.core.hydra_config import HydraConfig

    from gptlab.run.job import multirun

    hydra_cfg = HydraConfig.get()
    shared = naming.launch_overrides(hydra_cfg.sweep.dir) if multirun() else []
    experiment = str(hydra_cfg.runtime.choices.get("experiment") or cfg.get("task_name") or "train")
    return list(hydra_cfg.overrides.task), shared, experiment


def run_name(cfg: DictConfig) -> str:
    """What trackers call this job (gptlab.run.naming's rule): in a sweep the overrides that vary,
    else its overrides; its experiment's name when that leaves nothing."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return str(cfg.get("task_name") or "train")
    overrides, shared, experiment = _overrides(cfg)
    return naming.run_name(overrides, shared, fallback=experiment)


def varied_keys(cfg: DictConfig) -> list[str]:
    """The hyperparameters (`optim/lr`) this job's name is made of, in its overrides' order."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    overrides, shared, _ = _overrides(cfg)
    return [o.split("=", 1)[0].lstrip("~+").replace(".", "/") for o in naming.distinct(overrides, shared)]


def flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The run's config as flat scalar hyperparameters (`optim/lr`, ...) for every tracker."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if not str(k).startswith("_"):
                    walk(v, f"{prefix}{k}/" if prefix or k else "")
        elif isinstance(node, (int, float, str, bool)) or node is None:
            out[prefix.rstrip("/")] = "null" if node is None else node
        else:
            out[prefix.rstrip("/")] = str(node)

    container = OmegaConf.to_container(cfg, resolve=True)
    for group in ("model", "optim", "data", "trainer", "budget"):
        walk(container.get(group, {}), f"{group}/")
    out["seed"] = container.get("seed")
    return out


def log_hyperparams(loggers: list[Logger], cfg: DictConfig, metrics: list[str] = ()) -> None:
    """Hyperparameters reach each tracker in its own way, those that vary across a sweep first (the
    order of TensorBoard's HPARAMS columns). Pass `trainer.loggers` (fast_dev_run swaps in a no-op logger);
    `metrics`: more hp/ metrics of the HPARAMS tab, which callbacks log later."""
    params = flat_hparams(cfg)
    first = [k for k in varied_keys(cfg) if k in params]
    params = {**{k: params[k] for k in first}, **params}
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            # the HPARAMS tab lists a run only with a metric; LanguageModel logs hp/best_val_loss later
            named = {**{k: params[k] for k in first}, "run": run_name(cfg), **params}
            declared = {"hp/best_val_loss": float("nan"), **{m: float("nan") for m in metrics}}
            logger.log_hyperparams(named, declared)
        elif isinstance(logger, MLFlowLogger) and logger.run_id:  # run_id: None on ranks other than 0
            _log_mlflow_params(logger, params)
        else:  # W&B, CSV and others take no metrics here
            logger.log_hyperparams(params)


def _log_mlflow_params(logger: MLFlowLogger, params: dict[str, Any]) -> None:
    """MLflow params cannot change once logged, and a resume may change some (e.g. trainer.max_steps):
    log the new ones as params and the changed ones as tags `resumed/<key>` (tags can change)."""
    logged = logger.experiment.get_run(logger.run_id).data.params
    logger.log_hyperparams({k: v for k, v in params.items() if k not in logged})
    for k, v in params.items():
        if k in logged and logged[k] != str(v):
            logger.experiment.set_tag(logger.run_id, f"resumed/{k}", str(v))


# -- building and closing ------------------------------------------------------------------------
def build_loggers(cfg: DictConfig, name: str, resume: Info | None = None) -> list[Logger]:
    """Instantiate every `logger.<key>` with a `_target_`, named `name`; `resume` (a
    gptlab.checkpoint.Info, or None for a fresh run) makes each continue the run it belongs to."""
    loggers = []
    for key, node in (cfg.get("logger") or {}).items():
        if not node or "_target_" not in node:
            continue
        try:
            cls = _target_class(f"logger.{key}", node._target_)
            kwargs = _run_kwargs(cls, node, name, resume)
            logger = hydra.utils.instantiate(node, **kwargs)
        except Exception as e:
            error = missing_tracker(f"logger.{key}", e) or _unusable(f"logger.{key}", e)
            if error is None:
                raise
            raise error from None
        if resume is not None and isinstance(logger, CSVLogger):
            _keep_csv_rows(logger, resume.step)
        continued = kwargs.get("run_id") or node.get("run_id")  # an MLflow run to continue
        if isinstance(logger, MLFlowLogger) and continued:
            _check_mlflow_run(f"logger.{key}", logger, continued, node.get("tracking_uri"))
        if isinstance(logger, TensorBoardLogger):
            naming.link_in_view(Path(logger.log_dir), name, Path(cfg.paths.output_dir), cfg.paths.log_dir,
                                cfg.task_name)
        _drop_epoch(logger)
        loggers.append(logger)
    return loggers


def _drop_epoch(logger: Logger) -> None:
    """Lightning adds the epoch to every step's metrics; gptlab's runs count optimizer steps and its
    epochs are not a unit anyone tunes, so no tracker gets the `epoch` scalar."""
    log_metrics = logger.log_metrics

    def without_epoch(metrics: dict[str, float], step: int | None = None) -> None:
        log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)

    logger.log_metrics = without_epoch


def _target_class(where: str, target: str) -> type:
    """The class a `_target_` names (hydra.utils.get_class would also log the failure, in three lines)."""
    module, _, name = target.rpartition(".")
    cls = getattr(importlib.import_module(module), name, None) if module else None
    if not isinstance(cls, type):
        raise ConfigError(f"{where}._target_={target}: no such class")
    return cls


def _run_kwargs(cls: type, node: DictConfig, name: str, resume: Info | None) -> dict[str, Any]:
    """What each tracker needs to name the run and, on resume, to continue it; values the user set win."""
    trackers = resume.trackers if resume is not None else {}
    kwargs: dict[str, Any] = {}
    if issubclass(cls, TensorBoardLogger) and resume is not None:
        kwargs["purge_step"] = resume.step  # drop what a killed run logged after its checkpoint
    elif issubclass(cls, WandbLogger):
        kwargs["name"] = node.get("name") or name
        if not node.get("id") and not node.get("version") and trackers.get("wandb"):
            kwargs.update(id=trackers["wandb"], resume="allow")
    elif issubclass(cls, MLFlowLogger):
        kwargs["run_name"] = node.get("run_name") or name
        if not node.get("run_id") and trackers.get("mlflow"):
            kwargs["run_id"] = trackers["mlflow"]
    return kwargs


def _keep_csv_rows(logger: CSVLogger, step: int) -> None:
    """CSVLogger starts metrics.csv afresh; a resumed run keeps the rows logged before its checkpoint."""
    path = Path(logger.log_dir) / "metrics.csv"
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) < step]
    writer = logger.experiment  # deletes the old file; the kept rows are written back with the new ones
    if not isinstance(getattr(writer, "metrics", None), list):  # a rank other than 0 writes nothing
        return
    writer.metrics = [{k: v for k, v in r.items() if v != ""} for r in rows] + writer.metrics


def _check_mlflow_run(where: str, logger: MLFlowLogger, run_id: str, tracking_uri: str | None) -> None:
    """The MLflow run a resume continues must be in this store (e.g. not a different log_dir)."""
    from mlflow.exceptions import MlflowException

    try:
        _ = logger.experiment  # looks the run up (on rank 0)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise ConfigError(
            f"{where}: the run {run_id} this checkpoint continues is not in {tracking_uri or 'the MLflow store'}; "
            f"resume with the tracking_uri (and paths.log_dir) it was started with"
        ) from None


def run_ids(loggers: list[Logger]) -> dict[str, str]:
    """The W&B and MLflow run ids of this run, for the checkpoint (`gptlab.trackers`)."""
    ids = {}
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger.version:
            ids["wandb"] = str(logger.version)
        elif isinstance(logger, MLFlowLogger) and logger.run_id:
            ids["mlflow"] = str(logger.run_id)
    return ids


class TrackerRunIds(Callback):
    """Keeps the W&B and MLflow run ids in the checkpoint (`gptlab.trackers`), so that a resume continues
    those runs; the ids of trackers this session does not use are kept for a later one that does."""

    def __init__(self) -> None:
        self.ids: dict[str, str] = {}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self.ids = dict((checkpoint.get("gptlab") or {}).get("trackers") or {})

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint.setdefault("gptlab", {})["trackers"] = {**self.ids, **run_ids(trainer.loggers)}


def finish(loggers: list[Logger], status: str) -> None:
    """Close each tracker's run at the end of a job: `status` is "success" or "failed" (W&B's exit
    code, MLflow's FINISHED/FAILED). A W&B run left open would swallow the next job of a multirun."""
    for logger in loggers:
        if not run_started(logger):
            continue  # finalize would start it (TensorBoard makes its directory) just to close it
        try:
            logger.finalize(status)
            if isinstance(logger, WandbLogger):
                close_wandb_run(logger, exit_code=0 if status == "success" else 1)
        except Exception as e:
            if status == "success":
                raise
            # the job's own error is the one to report
            rank_zero_warn(f"{type(logger).__name__} could not be closed: {e}")


# -- errors --------------------------------------------------------------------------------------
def missing_tracker(where: str, error: BaseException) -> ConfigError | None:
    """The one line for a tracker whose package is not installed, from the ImportError (or Lightning's
    ModuleNotFoundError) somewhere in `error`'s chain (Hydra wraps it); None for any other error."""
    seen = error
    while seen is not None and not isinstance(seen, ImportError):
        seen = seen.__cause__  # Hydra raises InstantiationException from the import error
    if seen is None:
        return None
    while isinstance(seen.__cause__, ImportError):  # Hydra's "Error loading ..." wraps the real one
        seen = seen.__cause__
    text = str(seen).strip().splitlines()[0] if str(seen).strip() else type(seen).__name__
    text = re.split(r"\s*HINT:", text)[0].rstrip(". ")  # Lightning's hint names another pip command
    return ConfigError(f"{where} cannot start: {text}; W&B and MLflow come with {EXTRA}")


def _unusable(where: str, error: BaseException) -> ConfigError | None:
    """A logger config that Hydra could not instantiate (an unknown argument, a bad value): the
    underlying error's first line."""
    from hydra.errors import InstantiationException

    if not isinstance(error, InstantiationException):
        return None
    cause = error.__cause__ or error
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return ConfigError(f"{where} cannot start: {text}")
