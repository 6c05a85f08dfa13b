"""Every place gptlab reaches into another library's private names, one small function each, with the
reason (and the upstream issue where there is one). tests/test_compat.py exercises each against the
installed versions, so an upgrade that moves one fails there, by name, rather than deep inside a run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Prefixes torch's wrappers put in parameter names: torch.compile's OptimizedModule (`_orig_mod.`,
# in state_dicts of other tools that saved a compiled module), FSDP's and activation checkpointing's
# wrappers (in named_parameters() of a wrapped model). torch exports none of them publicly.
COMPILE_PREFIX = "_orig_mod."
FSDP_PREFIX = "_fsdp_wrapped_module."
CHECKPOINT_PREFIX = "_checkpoint_wrapped_module."


# -- Lightning ----------------------------------------------------------------------------------------
def set_logging_step(trainer: Any, step: int) -> None:
    """Put the loggers' step counter (the optimizer steps Lightning has logged for) at `step`. A
    checkpoint written between validations (max_steps, max_time) restores it one short
    (https://github.com/Lightning-AI/pytorch-lightning/issues/18060, /issues/19815); no public setter."""
    trainer.fit_loop.epoch_loop._batches_that_stepped = step


def set_peak_flops(monitor: Any, flops: float) -> None:
    """A ThroughputMonitor's peak FLOP/s, for MFU on devices Lightning's table does not list (CPUs).
    The monitor takes no peak: it builds its Throughput objects in setup() from that table."""
    monitor.available_flops = flops
    for throughput in monitor._throughputs.values():
        throughput.available_flops = flops


def rank_command() -> Callable:
    """Lightning's function that builds the command line of DDP ranks 1..N-1 under Hydra (see
    gptlab/run/multirun_ddp.py for the issues); it is private and has no hook to replace it."""
    from lightning.pytorch.strategies.launchers import subprocess_script

    return subprocess_script._hydra_subprocess_cmd


def set_rank_command(command: Callable) -> None:
    from lightning.pytorch.strategies.launchers import subprocess_script

    subprocess_script._hydra_subprocess_cmd = command


def run_started(logger: Any) -> bool:
    """Whether a Lightning logger has created its run yet. Its `experiment` property would create the
    run to answer (TensorBoard makes its directory, W&B and MLflow open a run), and there is no public
    flag: the loggers keep `_experiment` (MLflow `_initialized`)."""
    from lightning.pytorch.loggers import MLFlowLogger

    if isinstance(logger, MLFlowLogger):
        return bool(logger._initialized)
    return getattr(logger, "_experiment", True) is not None


def close_wandb_run(logger: Any, exit_code: int) -> None:
    """Finish a WandbLogger's run and let go of it: WandbLogger.finalize only uploads checkpoints, and
    a finished run left in the logger would be handed out again by `experiment`."""
    if run_started(logger):
        logger.experiment.finish(exit_code=exit_code)
        logger._experiment = None


# -- Optuna ---------------------------------------------------------------------------------------------
def set_trial_system_attr(study: Any, trial: Any, key: str, value: Any) -> None:
    """Mark a trial in its study's storage (the sweeper's owner, killed and surplus marks). Optuna's
    public setter (`Trial.set_system_attr`) was removed after its 3.1 deprecation; the storage's own
    takes the private trial id."""
    study._storage.set_trial_system_attr(trial._trial_id, key, value)


def trial_of(study: Any, number: int) -> Any:
    """The live `optuna.trial.Trial` of a study's trial number, for a job in another process to report
    to: Optuna gives trials out only from `study.ask`, and the storage looks them up by private ids."""
    import optuna

    return optuna.trial.Trial(study, study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number))


def distribution_holds(dist: Any, value: Any) -> bool:
    """Whether an Optuna distribution can produce `value`. Optuna's membership test is private
    (`BaseDistribution._contains`, https://github.com/optuna/optuna/issues/1893)."""
    try:
        return bool(dist._contains(dist.to_internal_repr(value)))
    except (ValueError, TypeError):  # a categorical without that choice
        return False
