"""A training job, from its composed config to its Outcome: validate, resume or start, build the data,
model, trackers and Lightning Trainer, fit (or only validate), and say where everything is at the end.
train.py is the Hydra entry point around `fit`."""

from __future__ import annotations

import math
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf, open_dict

from gptlab.checkpoint import is_sharded
from gptlab.config import validate_train
from gptlab.errors import ConfigError
from gptlab.models import RUN_SWITCHES
from gptlab.run import naming, pruning, resume
from gptlab.run import trackers
from gptlab.run.console import job_line, summary
from gptlab.run.job import Outcome, multirun
from gptlab.training import LanguageModel
from gptlab.training import budget as compute_budget
from gptlab.training.callbacks import StepAxis
from gptlab.training.parallel import check_plan
from gptlab.training.spikes import find_guard, spikes_line

FSDP1 = "gptlab.training.strategies.fsdp"


def instantiate_all(node: DictConfig | None, **kwargs) -> list:
    """Instantiate every entry of a group like `callbacks` or `logger` that has a `_target_`."""
    if not node:
        return []
    return [hydra.utils.instantiate(v, **kwargs) for v in node.values() if v and "_target_" in v]


def step_intervals(trainer_cfg: DictConfig) -> dict:
    """`trainer.val_check_interval` counts optimizer steps; Lightning counts training batches, so with
    gradient accumulation it would validate (and checkpoint) in the middle of an accumulation."""
    accumulate = trainer_cfg.get("accumulate_grad_batches") or 1
    interval = trainer_cfg.get("val_check_interval")
    if accumulate > 1 and isinstance(interval, int) and not isinstance(interval, bool):
        return {"val_check_interval": interval * accumulate}
    return {}


def fit(cfg: DictConfig) -> Outcome:
    validate_train(cfg)
    budget = compute_budget.from_config(cfg, naming.command_line_keys())
    info, run_dir = resume.resolve(cfg.get("ckpt_path"), cfg.get("resume"), cfg.paths.output_dir)
    if run_dir != Path(cfg.paths.output_dir):  # a checkpoint's own run: its trackers and checkpoints go on there
        with open_dict(cfg):
            cfg.paths.output_dir = str(run_dir)
    # with a budget the steps are known once the model is (run_trainer)
    max_steps = None if budget else cfg.trainer.get("max_steps")
    if info is not None and resume.finished(info, max_steps, cfg.trainer.get("max_time")):
        resume.check_tokenizer(info, hydra.utils.instantiate(cfg.data).tokenizer.state_dict())
        return finished_outcome(cfg, info)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.model.get("init_from"):  # the shape is the checkpoint's (so are the data's windows, ${model.block_size})
        from hydra.core.hydra_config import HydraConfig

        from gptlab.hf import pretrained_model_cfg

        given = OmegaConf.to_container(cfg.model, resolve=True)
        switches = {k: given.pop(k, None) for k in RUN_SWITCHES}
        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
        cfg.model = {**pretrained_model_cfg(switches["init_from"], given, overrides), **switches}

    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    tokenizer = datamodule.tokenizer
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    switches = {k: model_cfg.pop(k, None) for k in RUN_SWITCHES}  # the rest is the shape checkpoints keep
    if model_cfg.get("vocab_size") is None:
        model_cfg["vocab_size"] = tokenizer.vocab_size
    elif model_cfg["vocab_size"] < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={model_cfg['vocab_size']} is smaller than the tokenizer's {tokenizer.vocab_size}"
        )
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    check_plan(trainer_cfg, model_cfg)  # before any process group starts
    strategy = cfg.trainer.get("strategy")
    if switches["activation_checkpointing"] and isinstance(strategy, DictConfig) and strategy.get("_target_") == FSDP1:
        strategy.activation_checkpointing = True  # FSDP1 wraps each Block in its own checkpoint wrapper
        switches["activation_checkpointing"] = False
    if info is not None:  # before any tracker or checkpoint of that run is touched
        resume.check_strategy(info, trainer_cfg, cfg.get("train", True))
        resume.check_compatible(info, model_cfg, tokenizer.state_dict())
    module = LanguageModel(
        model=model_cfg,
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        tokenizer=tokenizer.state_dict(),
        seed=cfg.seed,
        compile=switches["compile"] or False,
        activation_checkpointing=bool(switches["activation_checkpointing"]),
    )
    if switches["init_from"]:
        from gptlab.hf import load_pretrained_into

        load_pretrained_into(module.model, switches["init_from"])

    # resume continues each tracker's run (TensorBoard purge_step, the W&B/MLflow run ids in the checkpoint)
    loggers = trackers.build_loggers(cfg, trackers.run_name(cfg), info)
    try:
        outcome = run_trainer(cfg, module, datamodule, loggers, info, budget)
    except BaseException:
        trackers.finish(loggers, "failed")  # W&B exit code 1, MLflow FAILED
        raise
    trackers.finish(loggers, "success")  # the next job of a multirun starts runs of its own
    return outcome


def finished_outcome(cfg: DictConfig, info) -> Outcome:
    """A resumed run that had reached its last step or second: nothing to do, its last values."""
    metric_name = cfg.get("optimized_metric") or "val/loss"
    if metric_name not in info.metrics:
        raise ConfigError(f"optimized_metric={metric_name!r} is not in {info.path}; it holds {sorted(info.metrics)}")
    value = info.metrics[metric_name]
    budget = f", trainer.max_time={cfg.trainer.max_time}" if cfg.trainer.get("max_time") else ""
    print(f"[gptlab] {info.path} finished at step {info.step} (trainer.max_steps={cfg.trainer.max_steps}{budget}); "
          f"nothing to do. final {metric_name} = {value:.4f}")
    return Outcome(metric_name, value, info.step, Path(cfg.paths.output_dir), last_ckpt=str(info.path), trained=False)


def run_trainer(cfg: DictConfig, module: LanguageModel, datamodule, loggers: list, info,
                budget: compute_budget.Budget | None = None) -> Outcome:
    metric_name = cfg.get("optimized_metric") or "val/loss"
    run_dir = Path(cfg.paths.output_dir)
    callbacks = [StepAxis(), trackers.TrackerRunIds(), *instantiate_all(cfg.get("callbacks")),
                 *pruning.trial_callbacks(metric_name)]
    if not loggers:  # logger=none: nothing to report learning rates to (Lightning would refuse the monitor)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, **step_intervals(cfg.trainer),
        _convert_="partial",  # plain dicts: Lightning takes a DictConfig max_time ({minutes: 10}) for a timedelta
    )
    if trainer.strategy.root_device.type == "cuda":
        # TF32 tensor cores for float32 matmuls (what mixed precision leaves in float32); CPU runs are untouched
        torch.set_float32_matmul_precision("high")
    spend = compute_budget.apply(budget, cfg, trainer, module.model) if budget else None
    if spend and info is not None and info.step >= spend.steps:
        return finished_outcome(cfg, info)
    # not `loggers`: fast_dev_run swaps in a no-op logger; callbacks may declare hp/ metrics (callbacks=eval)
    hp = [m for c in trainer.callbacks for m in (c.hparam_metrics() if hasattr(c, "hparam_metrics") else [])]
    trackers.log_hyperparams(trainer.loggers, cfg, hp)
    if trainer.is_global_zero:
        n = module.model.num_params()
        print(f"[gptlab] {cfg.model.get('arch', 'gpt')} with {n:,} parameters; run dir {run_dir}")

    resume_step = info.step if info else 0
    ckpt_path = str(info.path) if info else None
    started = time.perf_counter()
    if cfg.get("train", True):
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        if trainer.is_global_zero:
            print(f"[gptlab] fit: {trainer.global_step - resume_step} steps in {time.perf_counter() - started:.1f}s, "
                  f"of which validation {module.validation_seconds:.1f}s")
    else:  # evaluation only: the validation split's loss and perplexity of the given weights
        trainer.validate(module, datamodule=datamodule, ckpt_path=ckpt_path)

    metrics = trainer.callback_metrics
    if metric_name not in metrics:
        raise ConfigError(
            f"optimized_metric={metric_name!r} was never logged; logged metrics: {sorted(metrics)}"
        )
    value = float(metrics[metric_name])
    if trainer.is_global_zero:
        print(f"[gptlab] final {metric_name} = {value:.4f}" + ("" if math.isfinite(value) else " (not finite)"))
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else None
    last = run_dir / "checkpoints" / "last.ckpt"
    guard = find_guard(trainer)
    spent = spend.record(trainer.global_step) if spend else None
    if spent:
        compute_budget.log_spent(trainer, spent)
    return Outcome(metric_name, value, trainer.global_step, run_dir, best_ckpt=best or None,
                   last_ckpt=str(last) if last.is_file() or is_sharded(last) else None, seconds=time.perf_counter() - started,
                   tokens=module.tokens_seen, rank_zero=trainer.is_global_zero,
                   pruned=pruning.pruned_at(trainer) is not None,
                   spikes=guard.events if guard is not None else None, budget=spent)


def train(cfg: DictConfig) -> float:
    """The final value of `optimized_metric` (what a sweeper optimises)."""
    return fit(cfg).value


def report(outcome: Outcome) -> Outcome:
    """The end of a run on the console: one block (where everything is, what to run next), or one line
    per job in a multirun."""
    if outcome.rank_zero:
        o = outcome
        if multirun():
            print(job_line(o.run_dir, o.metric, o.value, steps=o.steps, seconds=o.seconds), flush=True)
        else:
            print(summary(o.run_dir, o.best_ckpt, o.last_ckpt, o.metric, o.value, steps=o.steps, seconds=o.seconds,
                          tokens=o.tokens, spikes=None if o.spikes is None else spikes_line(o.spikes)), flush=True)
    return outcome
