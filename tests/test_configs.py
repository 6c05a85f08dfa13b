"""Every config option composes (and instantiates where that needs no GPU); every experiment preset
and debug config trains a couple of steps in-process with a tiny model."""

from __future__ import annotations

import math

import hydra
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from omegaconf import DictConfig, OmegaConf

from gptlab.data import TokenDataModule
from gptlab.models import model_config
from gptlab.models.gpt import Block

from conftest import SHAKESPEARE
from inprocess import CONF, compose_config, run_train


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_train(overrides: list[str], hydra_cfg: bool = False) -> DictConfig:
    return compose_config(overrides, hydra_cfg=hydra_cfg)


# -- composition -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", options("model"))
def test_model_options_compose(name):
    cfg = compose_train([f"model={name}"])
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model_config({**model, "vocab_size": model.get("vocab_size") or 65})  # validates every key


@pytest.mark.parametrize("name", options("data"))
def test_data_options_compose_and_instantiate(name, data_dir):
    cfg = compose_train([f"data={name}", f"data.path={SHAKESPEARE}", f"paths.data_dir={data_dir}"])
    dm = hydra.utils.instantiate(cfg.data)
    assert isinstance(dm, TokenDataModule) and dm.block_size == cfg.model.block_size


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_options_compose(name, tmp_path):
    cfg = compose_train([f"trainer={name}", f"paths.output_dir={tmp_path}"])
    if cfg.trainer.accelerator == "cpu" or name == "default":
        trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
        assert trainer.num_devices == cfg.trainer.devices
        if name == "ddp_cpu":
            assert isinstance(trainer.strategy, DDPStrategy)
            assert trainer.strategy._process_group_backend == "gloo"
    elif "strategy" in cfg.trainer:  # GPU strategies: build the strategy object alone
        strategy = hydra.utils.instantiate(cfg.trainer.strategy)
        assert isinstance(strategy, (DDPStrategy, FSDPStrategy))
    assert cfg.trainer.num_nodes >= 1


def test_fsdp_wraps_transformer_blocks():
    from gptlab.training.strategies import fsdp

    cfg = compose_train(["trainer=fsdp", "trainer.strategy.activation_checkpointing=true", "trainer.num_nodes=2"])
    assert cfg.trainer.num_nodes == 2 and cfg.trainer.accelerator == "gpu"
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.sharding_strategy.name == "FULL_SHARD"
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block}
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {Block}
    plain = fsdp(sharding_strategy="SHARD_GRAD_OP")
    assert plain.sharding_strategy.name == "SHARD_GRAD_OP" and not plain._activation_checkpointing_kwargs


def test_weight_decay_groups_survive_flattened_parameters():
    """FSDP (use_orig_params) shows each parameter as a flat 1-D shard when the optimizer is built."""
    from gptlab.training import LanguageModel

    module = LanguageModel(
        model={"arch": "gpt", "vocab_size": 65, "block_size": 8, "n_layer": 1, "n_head": 2, "n_embd": 8},
        optim={"decay_steps": 10},
    )
    matrices = {id(p) for p in module.model.parameters() if p.dim() >= 2}
    assert matrices
    for p in module.model.parameters():
        p.data = p.data.reshape(-1)
    decay, no_decay = module.configure_optimizers()["optimizer"].param_groups
    assert {id(p) for p in decay["params"]} == matrices
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(module.model.parameters()))


def test_hydra_launcher_and_sweeper_options_compose():
    slurm = compose_train(["hydra/launcher=slurm"], hydra_cfg=True).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and slurm.tasks_per_node == slurm.gpus_per_node
    joblib = compose_train(["hydra/launcher=joblib"], hydra_cfg=True).hydra.launcher
    assert joblib._target_.endswith("JoblibLauncher")
    cfg = compose_train(["hparams_search=optuna"], hydra_cfg=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.direction == "minimize" and sweeper.n_trials == 20
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed == cfg.seed
    assert set(sweeper.params) == {"optim.lr", "model.n_layer", "model.n_embd", "model.dropout"}
    assert cfg.optimized_metric == "val/loss"


def test_experiment_presets_compose():
    cfg = compose_train(["experiment=shakespeare_char"])
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size) == (6, 6, 384, 256)
    assert cfg.model.dropout == 0.2 and cfg.data.batch_size == 64 and cfg.data.tokenizer == "char"
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps) == (1e-3, 1e-4, 100)
    assert list(cfg.optim.betas) == [0.9, 0.99]
    assert cfg.trainer.max_steps == 5000 and cfg.trainer.val_check_interval == 250

    cfg = compose_train(["experiment=shakespeare_char_cpu"])
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size) == (4, 4, 128, 64)
    assert cfg.trainer.accelerator == "auto" and cfg.data.batch_size == 24 and cfg.trainer.max_steps == 600
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.muon_lr, cfg.optim.min_lr) == ("muon", 4e-3, 1e-2, 4e-5)
    assert compose_train(["optim=adamw"]).optim.name == "adamw"  # the command line picks the optimizer
    # `python train.py` with no arguments is this recipe
    assert compose_train([]) == cfg

    cfg = compose_train(["experiment=shakespeare_char_cpu_long"])
    assert cfg.model.n_layer == 4 and cfg.task_name == "shakespeare_char_cpu_long"
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.muon_lr, cfg.data.batch_size) == ("muon", 4e-3, 1e-2, 48)
    assert list(cfg.optim.betas) == [0.9, 0.95] and cfg.trainer.max_steps == 1000

    cfg = compose_train(["experiment=shakespeare_bpe"])
    assert cfg.data.tokenizer == "bpe" and cfg.model.n_layer <= 6

    cfg = compose_train(["experiment=gpt2_124m"])
    assert cfg.data.path is None and cfg.data.url is None  # the corpus must be given
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size) == (12, 12, 768, 1024)
    t = cfg.trainer
    assert t.strategy._target_.endswith("DDPStrategy") and t.precision == "bf16-mixed" and cfg.model.compile
    tokens_per_step = cfg.data.batch_size * cfg.model.block_size * t.accumulate_grad_batches * t.devices
    assert tokens_per_step == 491_520  # ~0.5M, nanoGPT's GPT-2 124M
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps, t.max_steps) == (6e-4, 6e-5, 2000, 600_000)
    assert list(cfg.optim.betas) == [0.9, 0.95] and cfg.optim.weight_decay == 0.1


@pytest.mark.parametrize("name", options("experiment"))
def test_every_experiment_composes_and_instantiates(name, data_dir, tmp_path):
    cfg = compose_train([f"experiment={name}", f"data.path={SHAKESPEARE}", f"paths.data_dir={data_dir}",
                         f"paths.output_dir={tmp_path}"])
    # the default experiment keeps the default task name, so `python train.py` writes to outputs/train/
    expected = {"finetune_shakespeare": "finetune", "shakespeare_char_cpu": "train"}.get(name, name)
    assert cfg.task_name == expected
    assert isinstance(hydra.utils.instantiate(cfg.data), TokenDataModule)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model_config({**model, "vocab_size": model.get("vocab_size") or 50257})
    if cfg.trainer.accelerator == "cpu":
        hydra.utils.instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    elif "strategy" in cfg.trainer:
        hydra.utils.instantiate(cfg.trainer.strategy)


@pytest.mark.parametrize("name", options("debug"))
def test_debug_configs_compose_over_an_experiment(name):
    cfg = compose_train(["experiment=gpt2_124m", f"debug={name}"])
    assert cfg.task_name == "debug"
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.devices == 1 and "strategy" not in cfg.trainer
    assert cfg.model.compile is False


# -- a couple of steps of each preset, in-process -----------------------------------------------------
TINY_MODEL = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "model.compile=false"]
QUICK = [
    "data.batch_size=4",
    "data.val_windows=8",
    "data.num_workers=0",
    "data.pin_memory=false",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "callbacks.text_sample.max_new_tokens=4",
    "callbacks.throughput.window_size=2",
    "~callbacks.progress_bar",
]
RUNS = {
    "experiment=shakespeare_char": ["trainer=cpu"],
    "experiment=shakespeare_char_cpu": [],
    "experiment=shakespeare_char_cpu_long": [],
    "experiment=shakespeare_bpe": ["trainer=cpu"],
    "experiment=gpt2_124m": ["trainer=cpu", "trainer.devices=1", "trainer.accumulate_grad_batches=2"],
    "experiment=finetune_shakespeare": ["trainer=cpu", "model.init_from=null", "trainer.accumulate_grad_batches=2"],
    "debug=default": [],
    "debug=fdr": [],
    "debug=overfit": ["trainer.max_steps=4", "trainer.check_val_every_n_epoch=2", "trainer.val_check_interval=null"],
    "debug=profiler": [],
}


@pytest.mark.parametrize("choice", list(RUNS))
def test_preset_trains_a_few_steps(choice, tmp_path, data_dir):
    overrides = [choice, f"data.path={SHAKESPEARE}", f"paths.data_dir={data_dir}", *TINY_MODEL, *QUICK, *RUNS[choice]]
    value = run_train(overrides, tmp_path)
    assert value is not None and math.isfinite(value)
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt")) if (tmp_path / "checkpoints").exists() else []
    if choice == "debug=fdr":  # fast_dev_run: no TensorBoard run, no checkpoint, still a validation loss
        assert ckpts == [] and not (tmp_path / "tensorboard").exists()
        return
    assert "last.ckpt" in ckpts
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    expected_steps = 4 if choice == "debug=overfit" else 2
    assert ckpt["global_step"] == expected_steps
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    if choice == "debug=profiler":
        assert (tmp_path / "fit-profile.txt").is_file()
    if choice == "experiment=gpt2_124m":
        assert ckpt["hyper_parameters"]["tokenizer"]["kind"] == "bpe"
        assert ckpt["gptlab"]["micro_step"] == 4


@pytest.mark.parametrize("precision, clip, fused", [("32-true", 1.0, True), ("bf16-mixed", 0.0, True),
                                                    ("bf16-mixed", 1.0, False)])
def test_fused_adamw_by_default_except_where_lightning_cannot_clip(precision, clip, fused):
    import lightning as L

    from gptlab.training import LanguageModel

    module = LanguageModel(model={"arch": "gpt", "vocab_size": 65, "block_size": 8, "n_layer": 1, "n_head": 2,
                                  "n_embd": 8}, optim={"decay_steps": 10})
    module.trainer = L.Trainer(accelerator="cpu", precision=precision, gradient_clip_val=clip, max_steps=10,
                               logger=False, enable_checkpointing=False, enable_progress_bar=False)
    defaults = module.configure_optimizers()["optimizer"].defaults
    assert bool(defaults["fused"]) is fused and bool(defaults["foreach"]) is not fused
