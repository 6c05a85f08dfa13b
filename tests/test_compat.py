"""gptlab/compat.py against the installed libraries: each private name gptlab relies on still exists and
still does what gptlab uses it for. A failure here names the upgrade that moved it. (What each one is
for is tested through a run elsewhere: the step axis in test_resume.py, MFU with a given peak in
test_precision.py, closing W&B runs in test_tracking.py, DDP ranks of a multirun in test_ddp.py, the
report's study in test_studies.py.)"""

from __future__ import annotations

import inspect

import lightning as L
import pytest
import torch
import torch.nn as nn
from lightning.pytorch.trainer.states import RunningStage, TrainerFn

from gptlab import compat
from gptlab.training.callbacks import TokenThroughput


@pytest.fixture(scope="module")
def trainer() -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, max_steps=1)


def test_the_logging_step_is_the_epoch_loops_counter(trainer):
    compat.set_logging_step(trainer, 7)
    assert trainer.fit_loop.epoch_loop.state_dict()["state_dict"]["_batches_that_stepped"] == 7
    compat.set_logging_step(trainer, 0)


def test_a_given_peak_reaches_every_throughput_of_the_monitor(trainer):
    monitor = TokenThroughput(available_flops=123e9, window_size=2)
    trainer.state.fn, trainer.state.stage = TrainerFn.FITTING, RunningStage.TRAINING
    monitor.setup(trainer, L.LightningModule(), "fit")  # Lightning's table has no peak for a CPU
    assert monitor._throughputs and {t.available_flops for t in monitor._throughputs.values()} == {123e9}


def test_the_rank_command_is_the_one_lightnings_launcher_calls():
    from lightning.pytorch.strategies.launchers import subprocess_script

    original = compat.rank_command()
    assert list(inspect.signature(original).parameters) == ["local_rank"]
    callers = [f for c in vars(subprocess_script).values() if isinstance(c, type) for f in vars(c).values()
               if "_hydra_subprocess_cmd" in getattr(getattr(f, "__code__", None), "co_names", ())]
    assert callers, "Lightning's launcher no longer calls _hydra_subprocess_cmd (gptlab/run/multirun_ddp.py)"
    try:
        compat.set_rank_command(print)
        assert subprocess_script._hydra_subprocess_cmd is print
    finally:
        compat.set_rank_command(original)


def test_run_started_asks_without_starting_a_run(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger

    tensorboard = TensorBoardLogger(tmp_path / "tb")
    assert not compat.run_started(tensorboard) and not (tmp_path / "tb").exists()
    assert tensorboard.experiment is not None and compat.run_started(tensorboard)
    assert not compat.run_started(CSVLogger(tmp_path / "csv"))
    # (constructing an MLFlowLogger imports mlflow, seconds: its code says the same without running it)
    for code in (MLFlowLogger.__init__.__code__, inspect.unwrap(MLFlowLogger.experiment.fget).__code__):
        assert "_initialized" in code.co_names
    wandb = WandbLogger(save_dir=str(tmp_path), offline=True)
    assert not compat.run_started(wandb)
    compat.close_wandb_run(wandb, exit_code=0)  # nothing started, nothing to close
    assert not compat.run_started(wandb) and not (tmp_path / "wandb").exists()


def test_optuna_trials_by_number_and_their_system_attrs():
    import optuna

    from gptlab.run.optuna_space import search_space

    space, _ = search_space(["optim.lr=tag(log, interval(1e-4, 1e-2))", "model.n_layer=choice(2,4)"])
    assert compat.distribution_holds(space["optim.lr"], 1e-3) and not compat.distribution_holds(space["optim.lr"], 1.0)
    assert compat.distribution_holds(space["model.n_layer"], 4) and not compat.distribution_holds(space["model.n_layer"], 3)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    asked = study.ask(space)
    compat.set_trial_system_attr(study, asked, "gptlab_owner", "me")
    compat.trial_of(study, asked.number).report(2.5, step=4)
    (trial,) = study.trials
    assert trial.system_attrs["gptlab_owner"] == "me" and trial.intermediate_values == {4: 2.5}


def test_torch_wrapper_prefixes():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_WRAPPED_MODULE
    from torch.distributed.fsdp._common_utils import FSDP_WRAPPED_MODULE

    assert list(torch.compile(nn.Linear(2, 2)).state_dict()) == [f"{compat.COMPILE_PREFIX}weight",
                                                                 f"{compat.COMPILE_PREFIX}bias"]
    assert compat.FSDP_PREFIX == f"{FSDP_WRAPPED_MODULE}." and compat.CHECKPOINT_PREFIX == f"{_CHECKPOINT_WRAPPED_MODULE}."


def test_the_trainer_ranges_name_trainer_arguments():
    from gptlab.training.trainer_settings import RANGES

    assert set(RANGES) <= set(inspect.signature(L.Trainer.__init__).parameters)
