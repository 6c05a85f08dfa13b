"""Hydra finds sweepers only under the `hydra_plugins` namespace: this registers gptlab's Optuna sweeper
(gptlab/run/optuna_sweeper.py) as `hydra/sweeper=optuna`. Hydra imports every plugin module at start,
so nothing heavy is imported here."""

# (no `from __future__ import annotations`: Hydra loads this module outside sys.modules, where
# dataclasses cannot resolve string annotations)
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper


@dataclass
class StudySweeperConf:
    """`hydra.sweeper` (conf/hparams_search/optuna.yaml sets gptlab's values; docs/sweeps.md)."""

    _target_: str = "hydra_plugins.gptlab_sweeper.study_sweeper.StudySweeper"
    _recursive_: bool = False  # the sweeper makes the sampler (a grid sampler needs the grid) and pruner
    # any Optuna sampler, instantiated by Hydra (`_target_: optuna.samplers.GridSampler` gets the grid)
    sampler: Any = field(default_factory=lambda: {"_target_": "optuna.samplers.TPESampler"})
    direction: Any = "minimize"  # or maximize, or a list of them (one per returned value)
    storage: Any = None  # an SQLAlchemy URL (sqlite:///..., postgresql://...); null: in memory
    study_name: Any = None
    n_trials: int = 20  # the study's total, counted in its storage
    n_jobs: int = 1  # trials launched at once (run in parallel by hydra/launcher=joblib or submitit)
    # none | median | hyperband, or a node {_target_: optuna.pruners.<Pruner>, ...}
    pruner: Any = None
    params: Any = None  # key: Hydra sweep syntax (choice, range, interval, tag(log, ...))
    # a function (config, optuna.trial.Trial) -> None that suggests further parameters (conditional spaces)
    custom_search_space: Any = None
    trial: Any = None  # set by the sweeper in each job's config: the Optuna trial number it runs


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=StudySweeperConf, provider="gptlab")


class StudySweeper(Sweeper):
    """`hydra.sweeper._target_`: Optuna studies with gptlab's rules (gptlab/run/optuna_sweeper.py)."""

    def __init__(self, **config: Any) -> None:
        from gptlab.run.optuna_sweeper import StudySweeperImpl

        self.sweeper = StudySweeperImpl(**config)

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        return self.sweeper.sweep(arguments)
