"""Hydra finds sweepers only under the `hydra_plugins` namespace: this is where gptlab's Optuna sweeper
(gptlab/run/optuna_sweeper.py) is registered. Hydra imports every plugin module at start, so nothing heavy here."""

try:
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
except ImportError:  # the `sweep` extra is not installed: no Optuna sweeper to extend
    OptunaSweeper = None

if OptunaSweeper is not None:

    class StudySweeper(OptunaSweeper):
        """`hydra.sweeper._target_` of conf/hparams_search/optuna.yaml: Hydra's Optuna sweeper with gptlab's
        study rules (n_trials is the study's total, killed trials are not counted, failed trials are
        recorded and the study goes on)."""

        def __init__(self, **kwargs) -> None:
            from gptlab.run.optuna_sweeper import StudySweeperImpl

            self.sweeper = StudySweeperImpl(**kwargs)
