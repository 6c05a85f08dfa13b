"""A job's side of an Optuna trial: its validation curve reported to the trial, and a stop when the
study's pruner (`hydra.sweeper.pruner`) says the trial is hopeless.

The sweeper puts the trial's number in each job's config (`hydra.sweeper.trial`); the job finds the
trial there: in the sweeper's own process (Hydra's basic launcher) through `register`, in a job
process of its own (joblib, submitit) by opening the study's storage. A pruned job stops training at
that validation, keeps its checkpoints and gets a PRUNED marker (gptlab.run.job), which the sweeper
reads to record the trial as pruned.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import OmegaConf

from gptlab.compat import trial_of
from gptlab.errors import ConfigError

PRUNERS = {"median": "MedianPruner", "hyperband": "HyperbandPruner"}
_TRIALS: dict[int, Any] = {}  # trial number -> optuna.trial.Trial, while the sweeper in this process runs it


def register(study, trial) -> None:
    _TRIALS[trial.number] = trial


def unregister(study, trial) -> None:
    _TRIALS.pop(trial.number, None)


def make_pruner(spec: Any):
    """`hydra.sweeper.pruner`: none (null), median, hyperband (Optuna's defaults), or a node
    `{_target_: optuna.pruners.<Pruner>, ...}` with the pruner's own arguments."""
    import hydra
    import optuna
    from omegaconf import DictConfig, OmegaConf

    if isinstance(spec, DictConfig):
        spec = OmegaConf.to_container(spec, resolve=True)
    if spec is None or spec is False or (isinstance(spec, str) and spec.lower() in ("none", "null", "")):
        return optuna.pruners.NopPruner()
    if isinstance(spec, str) and spec.lower() in PRUNERS:
        return getattr(optuna.pruners, PRUNERS[spec.lower()])()
    if isinstance(spec, dict) and "_target_" in spec:
        try:
            pruner = hydra.utils.instantiate(spec)
        except Exception as e:
            cause = e.__cause__ or e
            raise ConfigError(f"hydra.sweeper.pruner: cannot make {spec['_target_']} ({str(cause).splitlines()[0]})") from None
        if isinstance(pruner, optuna.pruners.BasePruner):
            return pruner
    raise ConfigError(f"hydra.sweeper.pruner={spec}: unknown pruner; use none, median, hyperband or "
                      f"{{_target_: optuna.pruners.<Pruner>, ...}}")


def open_storage(url: Any):
    """`hydra.sweeper.storage` opened: None (in memory) or Optuna's RDB storage on an SQLAlchemy URL.
    An SQLite file's directory is made; a URL that cannot be opened is a ConfigError that leaves
    nothing behind (no directory, no database file)."""
    if url is None or str(url) == "":
        return None
    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError

    url = str(url)
    path = Path(url[len("sqlite:///"):].split("?")[0]) if url.startswith("sqlite:///") else None
    made = [p for p in [path, *path.parents] if not p.exists()] if path is not None else []
    for attempt in range(5):
        try:
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.RDBStorage(url)
        except (IntegrityError, OperationalError) as e:
            # two sweepers creating one new SQLite storage at once: the other one's lock or tables; retry
            if attempt < 4 and ("locked" in str(e) or "already exists" in str(e) or isinstance(e, IntegrityError)):
                time.sleep(0.5 * (attempt + 1))
                continue
            error = e
        except Exception as e:  # a bad URL, a missing database driver, a server that is not there, ...
            error = e
        for p in made:  # the file first, then its new directories, innermost first
            try:
                p.unlink() if p.is_file() else p.rmdir()
            except OSError:
                pass
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ConfigError(f"hydra.sweeper.storage={url}: cannot open it ({type(error).__name__}: {first})") from None


def _open_trial(sweeper: Any, number: int):
    """The job's trial: the sweeper's own object in its process, else from the study's storage."""
    import optuna

    if number in _TRIALS:
        return _TRIALS[number]
    storage = open_storage(sweeper.get("storage"))
    if storage is None:
        raise ConfigError("a job in a process of its own cannot reach an in-memory study: set hydra.sweeper.storage")
    name = sweeper.get("study_name") or optuna.get_all_study_names(storage)[0]
    study = optuna.load_study(study_name=name, storage=storage, pruner=make_pruner(sweeper.get("pruner")))
    return trial_of(study, number)


class TrialPruning(L.Callback):
    """Reports `monitor` to the job's Optuna trial at each validation (step: the optimizer step) and
    stops training when the trial should be pruned; every rank takes rank 0's decision.
    Not optuna-integration's PyTorchLightningPruningCallback: it reports by epoch, and gptlab validates
    every val_check_interval optimizer steps, several times within one epoch."""

    def __init__(self, sweeper: Any, number: int, monitor: str) -> None:
        self.sweeper, self.number, self.monitor = sweeper, number, monitor
        self.trial = None
        self.pruned_at: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        prune = False
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.is_global_zero and value is not None and math.isfinite(float(value)):
            if self.trial is None:
                self.trial = _open_trial(self.sweeper, self.number)
            self.trial.report(float(value), step=trainer.global_step)
            prune = self.trial.should_prune()
        if trainer.strategy.broadcast(prune, src=0):
            trainer.should_stop = True
            self.pruned_at = trainer.global_step


def trial_callbacks(monitor: str) -> list[TrialPruning]:
    """The pruning callback of a job that runs an Optuna trial (its config names one), else none."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    sweeper = HydraConfig.get().get("sweeper") or {}
    number = sweeper.get("trial")
    output_dir = OmegaConf.select(HydraConfig.get(), "runtime.output_dir", throw_on_missing=False)
    if number is None and int(os.environ.get("LOCAL_RANK") or 0) > 0 and output_dir:
        # DDP ranks 1..N-1 of a multirun job run on its saved config (gptlab.run.multirun_ddp): the job's
        # hydra.yaml names the trial, and those ranks need the callback to take rank 0's decision
        from gptlab.run.job import read_yaml

        saved = read_yaml(Path(output_dir) / ".hydra" / "hydra.yaml") or {}
        number = ((saved.get("hydra") or {}).get("sweeper") or {}).get("trial")
    if number is None:
        return []
    return [TrialPruning(sweeper, int(number), monitor)]


def pruned_at(trainer: L.Trainer) -> int | None:
    """The optimizer step at which the trial was pruned, or None."""
    return next((c.pruned_at for c in trainer.callbacks if isinstance(c, TrialPruning)), None)
