"""Optuna studies that survive: failed trials are recorded and the study goes on, a killed sweep is
continued by re-running its command, several sweepers share one study through its storage, and a
pruner may stop a trial early from its validation curve (gptlab/run/pruning.py).

`hydra.sweeper.n_trials` is the study's total, counted in its storage (Optuna's RDB storage: SQLite
by default, any SQLAlchemy URL), so that

- re-running the command after a kill runs only the trials that are missing: trials that were
  running in a process that no longer exists are marked failed (system attr `gptlab_killed`) and
  not counted; finished ones are kept;
- several sweeper processes on one storage and study name split the budget between them (each
  recounts before asking for a trial);
- a trial whose job failed (gptlab.run.job writes FAILED and returns None) is told to Optuna as FAIL,
  one whose job was pruned (PRUNED marker) as PRUNED.

Each job directory is named by its trial number (`hydra.sweep.subdir`), and its config holds that
number (`hydra.sweeper.trial`), which is how its pruning callback finds its trial.
Hydra instantiates it through hydra_plugins/gptlab_sweeper/study_sweeper.py (Hydra's plugin namespace).
"""

from __future__ import annotations

import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from omegaconf import DictConfig, ListConfig, OmegaConf
from optuna.trial import TrialState

from gptlab.compat import set_trial_system_attr
from gptlab.errors import ConfigError, GptlabError
from gptlab.files import owner_gone, owner_tag
from gptlab.run import optuna_space, pruning
from gptlab.run.job import read_marker
from gptlab.run.naming import direction

log = logging.getLogger(__name__)
OWNER = "gptlab_owner"
KILLED = "gptlab_killed"
SURPLUS = "gptlab_surplus"


def _counts(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether `trial` uses up part of the study's n_trials."""
    if trial.system_attrs.get(KILLED) or trial.system_attrs.get(SURPLUS):
        return False
    if trial.state == TrialState.RUNNING:
        return not owner_gone(str(trial.system_attrs.get(OWNER, "")))
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def _tell(study: optuna.Study, trial: optuna.trial.Trial | int, **kwargs: Any) -> None:
    try:
        study.tell(trial, **kwargs)
    except RuntimeError as e:  # the grid sampler stops the study after its last point, outside optimize()
        if "Study.stop" not in str(e):
            raise


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


class StudySweeperImpl:
    def __init__(self, sampler: Any = None, direction: Any = "minimize", storage: Any = None, study_name: Any = None,
                 n_trials: int = 20, n_jobs: int = 1, pruner: Any = None, params: Any = None,
                 custom_search_space: Any = None, trial: Any = None) -> None:
        self.sampler_cfg = _plain(sampler)
        directions = _plain(direction)
        # None (direction: null): the optimized metric's own, known at setup
        self.directions = None if directions is None else [
            str(d) for d in (directions if isinstance(directions, list) else [directions])]
        self.storage = storage
        self.study_name = study_name
        self.n_trials = n_trials
        self.n_jobs = max(1, n_jobs)
        self.pruner_cfg = _plain(pruner)
        self.params = _plain(params) or {}
        self.custom_search_space = custom_search_space

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config = config
        if self.directions is None:  # accuracies up, losses down
            self.directions = [direction(OmegaConf.select(config, "optimized_metric"))]
        self.sweep_dir = Path(config.hydra.sweep.dir)
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function)

    # -- what is searched, and with what -------------------------------------------------------------
    def _space(self, arguments: list[str]) -> tuple[dict, list[str]]:
        """(searched key -> distribution, the fixed overrides every job gets); the command line's
        replace the config's `params`."""
        space, fixed = optuna_space.search_space([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        return space, list(fixed.values())

    def _sampler(self, space: dict) -> optuna.samplers.BaseSampler:
        import hydra

        cfg = dict(self.sampler_cfg or {"_target_": "optuna.samplers.TPESampler"})
        kwargs = {}
        if str(cfg.get("_target_", "")).rsplit(".", 1)[-1] == "GridSampler":
            kwargs["search_space"] = optuna_space.grid(space)
            size = 1
            for values in kwargs["search_space"].values():
                size *= len(values)
            self.n_trials = min(self.n_trials, size)
        try:
            return hydra.utils.instantiate(cfg, **kwargs)
        except Exception as e:
            cause = e.__cause__ or e
            raise ConfigError(f"hydra.sweeper.sampler: cannot make {cfg.get('_target_')} ({str(cause).splitlines()[0]})") from None

    def _study(self, sampler, pruner) -> optuna.Study:
        from sqlalchemy.exc import SQLAlchemyError

        storage = pruning.open_storage(self.storage)
        for attempt in range(5):
            try:
                study = optuna.create_study(study_name=self.study_name, storage=storage, sampler=sampler,
                                            pruner=pruner, directions=self.directions, load_if_exists=True)
                break
            except (SQLAlchemyError, optuna.exceptions.DuplicatedStudyError):
                # two sweepers creating the same new study at once: one wins, the other loads it
                if attempt == 4:
                    raise
                time.sleep(0.5 + random.random())
            except ValueError as e:  # e.g. an existing study optimised in the other direction
                raise ConfigError(f"hydra.sweeper.study_name={self.study_name}: {e}") from None
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if owner_gone(str(trial.system_attrs.get(OWNER, ""))):
                set_trial_system_attr(study, trial, KILLED, True)
                _tell(study, trial.number, state=TrialState.FAIL)
                log.info(f"trial {trial.number} was running in a process that has exited: marked failed, not counted")
        return study

    def _used(self, study: optuna.Study) -> int:
        return sum(_counts(t) for t in study.get_trials(deepcopy=False))

    # -- the sweep -----------------------------------------------------------------------------------
    def sweep(self, arguments: list[str]) -> None:
        try:
            space, fixed = self._space(arguments)
            pruner = pruning.make_pruner(self.pruner_cfg)
            sampler = self._sampler(space)
            study = self._study(sampler, pruner)
        except GptlabError as e:  # bad input: one line, and no sweep directory left behind
            if self.sweep_dir.is_dir() and not any(self.sweep_dir.iterdir()):
                self.sweep_dir.rmdir()
            print(f"Error: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, self.sweep_dir / "multirun.yaml")  # as Hydra's basic sweeper: what every job shares
        log.info(f"Study {study.study_name} in {self.storage}: {self._used(study)} of {self.n_trials} trials done or running")
        me = owner_tag()
        while (remaining := self.n_trials - self._used(study)) > 0:
            trials = []
            for _ in range(min(self.n_jobs, remaining)):
                trial = study.ask(fixed_distributions=space)
                set_trial_system_attr(study, trial, OWNER, me)
                if self._used(study) > self.n_trials:  # another sweeper took the last slot meanwhile
                    set_trial_system_attr(study, trial, SURPLUS, True)
                    study.tell(trial, state=TrialState.FAIL)
                    break
                trials.append(trial)
            if trials:
                self._run(study, trials, fixed)
        self._write_results(study)

    def _run(self, study: optuna.Study, trials: list, fixed: list[str]) -> None:
        overrides = []
        for trial in trials:
            if self.custom_search_space:
                import hydra

                hydra.utils.get_method(self.custom_search_space)(self.config, trial)
            overrides.append([*(optuna_space.override(k, v) for k, v in trial.params.items()), *fixed,
                              f"hydra.sweeper.trial={trial.number}", f"hydra.sweep.subdir={trial.number}"])
            pruning.register(study, trial)
        try:
            returns = self.launcher.launch(overrides, initial_job_idx=trials[0].number)
        finally:
            for trial in trials:
                pruning.unregister(study, trial)
        for trial, ret in zip(trials, returns):
            status, _ = read_marker(self.sweep_dir / str(trial.number))
            value = ret.return_value if ret.status == JobStatus.COMPLETED else None
            if status == "pruned":
                _tell(study, trial, state=TrialState.PRUNED)
                log.info(f"trial {trial.number} was pruned")
                continue
            try:
                values = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
            except (TypeError, ValueError):
                _tell(study, trial, state=TrialState.FAIL)
                log.warning(f"trial {trial.number} failed (job {trial.number}); the study goes on")
                continue
            _tell(study, trial, values=values)

    def _write_results(self, study: optuna.Study) -> None:
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            log.warning(f"no trial of study {study.study_name} has finished; nothing to report")
            return
        if len(self.directions) == 1:
            best = study.best_trial
            results = {"name": "optuna", "best_params": best.params, "best_value": best.value}
            log.info(f"Best parameters: {best.params}; best value: {best.value}")
        else:
            results = {"name": "optuna", "solutions": [{"params": t.params, "values": t.values}
                                                       for t in study.best_trials]}
        OmegaConf.save(OmegaConf.create(results), self.sweep_dir / "optimization_results.yaml")
