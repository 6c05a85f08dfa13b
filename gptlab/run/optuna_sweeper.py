"""Optuna studies that survive: failed trials are recorded and the study goes on, a killed sweep is
continued by re-running its command, and several sweepers share one study through its storage.

Hydra's Optuna sweeper (hydra-optuna-sweeper) runs `n_trials` *more* trials on every start and ends
the study when a trial raises. This one treats `hydra.sweeper.n_trials` as the study's total, counted
in its storage (Optuna's RDB storage: SQLite by default, any SQLAlchemy URL), so that

- re-running the command after a kill runs only the trials that are missing: trials that were
  running in a process that no longer exists are marked failed (system attr `gptlab_killed`) and
  not counted; finished ones are kept;
- several sweeper processes on one storage and study name split the budget between them (each
  recounts before asking for a trial);
- a trial whose job failed (gptlab.run.job writes FAILED and returns None) is told to Optuna as FAIL.

Job directories are named by trial number, so they stay distinct across restarts and sweepers.
Hydra instantiates it through hydra_plugins/gptlab_sweeper/study_sweeper.py (Hydra's plugin namespace).
"""

from __future__ import annotations

import functools
import logging
import random
import time
from pathlib import Path
from typing import Any

import optuna
from hydra.core.utils import JobStatus
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from omegaconf import OmegaConf
from optuna.trial import TrialState
from sqlalchemy.exc import SQLAlchemyError

from gptlab.files import owner_gone, owner_tag

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


class StudySweeperImpl(OptunaSweeperImpl):
    def _space(self, arguments: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
        self._process_searchspace_config()
        params = self._parse_sweeper_params_config() + list(arguments)
        overrides, fixed = create_params_from_overrides(params)
        space = dict(self.search_space_distributions or {})
        space.update(overrides)
        for name in fixed:
            space.pop(name, None)
        if isinstance(self.sampler, functools.partial) and self.sampler.func == optuna.samplers.GridSampler:
            grid = {name: self._to_grid_sampler_choices(d) for name, d in space.items()}
            self.sampler = self.sampler(grid)
            size = 1
            for choices in grid.values():
                size *= len(choices)
            self.n_trials = min(self.n_trials, size)
        return space, fixed

    def _study(self) -> optuna.Study:
        if isinstance(self.storage, str) and self.storage.startswith("sqlite:///"):
            Path(self.storage[len("sqlite:///"):].split("?")[0]).parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(5):
            try:
                study = optuna.create_study(study_name=self.study_name, storage=self.storage, sampler=self.sampler,
                                            directions=self._get_directions(), load_if_exists=True)
                break
            except (SQLAlchemyError, optuna.exceptions.DuplicatedStudyError):
                # two sweepers creating the same new storage or study at once: one wins, the other loads it
                if attempt == 4:
                    raise
                time.sleep(0.5 + random.random())
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if owner_gone(str(trial.system_attrs.get(OWNER, ""))):
                study._storage.set_trial_system_attr(trial._trial_id, KILLED, True)
                study._storage.set_trial_state(trial._trial_id, TrialState.FAIL)
                log.info(f"trial {trial.number} was running in a process that has exited: marked failed, not counted")
        return study

    def _used(self, study: optuna.Study) -> int:
        return sum(_counts(t) for t in study.get_trials(deepcopy=False))

    def sweep(self, arguments: list[str]) -> None:
        space, fixed = self._space(arguments)
        study = self._study()
        log.info(f"Study {study.study_name} in {self.storage}: {self._used(study)} of {self.n_trials} trials done or running")
        me = owner_tag()
        while (remaining := self.n_trials - self._used(study)) > 0:
            trials = []
            for _ in range(min(self.n_jobs, remaining)):
                trial = study.ask()
                study._storage.set_trial_system_attr(trial._trial_id, OWNER, me)
                if self._used(study) > self.n_trials:  # another sweeper took the last slot meanwhile
                    study._storage.set_trial_system_attr(trial._trial_id, SURPLUS, True)
                    study.tell(trial, state=TrialState.FAIL)
                    break
                trials.append(trial)
            if not trials:
                continue
            overrides = self._configure_trials(trials, space, fixed)
            returns = self.launcher.launch(overrides, initial_job_idx=trials[0].number)
            for trial, ret in zip(trials, returns):
                value = ret._return_value if ret.status == JobStatus.COMPLETED else None
                try:
                    values = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
                    study.tell(trial, values=values)
                except (TypeError, ValueError):
                    study.tell(trial, state=TrialState.FAIL)
                    log.warning(f"trial {trial.number} failed (job {trial.number}); the study goes on")
        self._write_results(study)

    def _write_results(self, study: optuna.Study) -> None:
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            log.warning(f"no trial of study {study.study_name} has finished; nothing to report")
            return
        if len(self._get_directions()) == 1:
            best = study.best_trial
            results = {"name": "optuna", "best_params": best.params, "best_value": best.value}
            log.info(f"Best parameters: {best.params}; best value: {best.value}")
        else:
            results = {"name": "optuna", "solutions": [{"params": t.params, "values": t.values}
                                                       for t in study.best_trials]}
        OmegaConf.save(OmegaConf.create(results), Path(self.config.hydra.sweep.dir) / "optimization_results.yaml")
