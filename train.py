"""Train a language model: `python train.py [experiment=...] [group=option] [key=value ...]`.

Hydra composes conf/train.yaml; everything here is wiring. Returns the final validation loss (the
value named by `optimized_metric`) so that sweepers (basic, Optuna) can optimise it.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from gptlab import checkpoint, tracking
from gptlab.cli import (
    describe_vocab,
    distributed_job,
    install_multirun_ddp_fix,
    resolve_resume,
    user_errors,
)
from gptlab.errors import CheckpointError, ConfigError
from gptlab.training import LanguageModel


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


def train(cfg: DictConfig) -> float | None:
    ckpt_path, resume_step, resume_tokenizer = resolve_resume(cfg)  # may point paths.output_dir at that run
    L.seed_everything(cfg.seed, workers=True)

    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    tokenizer = datamodule.tokenizer
    if resume_tokenizer is not None and resume_tokenizer != tokenizer.state_dict():
        raise CheckpointError(
            f"ckpt_path={ckpt_path} was trained with a different vocabulary ({resume_tokenizer.get('kind')} "
            f"tokenizer, {describe_vocab(resume_tokenizer)}) than data gives now ({tokenizer.kind}, "
            f"{tokenizer.vocab_size} tokens); resume with the data config the run was started with"
        )
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    if model_cfg.get("vocab_size") is None:
        model_cfg["vocab_size"] = tokenizer.vocab_size
    elif model_cfg["vocab_size"] < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={model_cfg['vocab_size']} is smaller than the tokenizer's {tokenizer.vocab_size}"
        )
    module = LanguageModel(
        model=model_cfg,
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        tokenizer=tokenizer.state_dict(),
        seed=cfg.seed,
    )
    if model_cfg.get("init_from"):
        from gptlab.models.hf import load_pretrained_into

        load_pretrained_into(module.model, model_cfg["init_from"])

    # resume continues each tracker's run (TensorBoard purge_step, the W&B/MLflow run ids in the checkpoint)
    loggers = tracking.build_loggers(cfg, tracking.run_name(cfg), checkpoint.info(ckpt_path) if ckpt_path else None)
    try:
        value = fit(cfg, module, datamodule, loggers, ckpt_path, resume_step)
    except BaseException:
        tracking.finish(loggers, "failed")  # W&B exit code 1, MLflow FAILED
        raise
    tracking.finish(loggers, "success")  # the next job of a multirun starts runs of its own
    return value


def fit(cfg: DictConfig, module: LanguageModel, datamodule, loggers: list, ckpt_path: str | None,
        resume_step: int) -> float:
    callbacks = instantiate_all(cfg.get("callbacks"))
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, **step_intervals(cfg.trainer)
    )
    tracking.log_hyperparams(trainer.loggers, cfg)  # not `loggers`: fast_dev_run swaps in a no-op logger
    if trainer.is_global_zero:
        n = module.model.num_params()
        print(f"[gptlab] {cfg.model.get('arch', 'gpt')} with {n:,} parameters; run dir {cfg.paths.output_dir}")

    if cfg.get("train", True):
        started = time.perf_counter()
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        if trainer.is_global_zero:
            print(f"[gptlab] fit: {trainer.global_step - resume_step} steps in {time.perf_counter() - started:.1f}s, "
                  f"of which validation {module.validation_seconds:.1f}s")
    else:  # evaluation only: the validation split's loss and perplexity of the given weights
        trainer.validate(module, datamodule=datamodule, ckpt_path=ckpt_path)

    metric_name = cfg.get("optimized_metric") or "val/loss"
    metrics = trainer.callback_metrics
    if metric_name not in metrics:
        raise ConfigError(
            f"optimized_metric={metric_name!r} was never logged; logged metrics: {sorted(metrics)}"
        )
    value = float(metrics[metric_name])
    if trainer.is_global_zero:
        print(f"[gptlab] final {metric_name} = {value:.4f}" + ("" if math.isfinite(value) else " (not finite)"))
    return value


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    install_multirun_ddp_fix(Path(__file__).resolve())
    with user_errors(run_dir=cfg.paths.output_dir), distributed_job():
        return train(cfg)


if __name__ == "__main__":
    main()
