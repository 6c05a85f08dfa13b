"""Configs: every option composes (and instantiates where that needs no GPU), every experiment preset
and debug config trains a couple of steps in-process, and the schema refuses bad values with one line
naming the key, before anything is read or written."""

from __future__ import annotations

import math

import hydra
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from omegaconf import DictConfig, OmegaConf

from gptlab.data import TokenDataModule
from gptlab.errors import ConfigError, GptlabError
from gptlab.models import GPTConfig, model_config
from gptlab.models.gpt import Block
from gptlab.sampling import generate
from gptlab.training.optim import OptimConfig

from conftest import SHAKESPEARE
from gptlab.config import RUN_SWITCHES, validate_train

from inprocess import CONF, compose_config


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_train(overrides: list[str], hydra_cfg: bool = False) -> DictConfig:
    return compose_config(overrides, hydra_cfg=hydra_cfg)


# -- composition -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", options("model"))
def test_model_options_compose(name):
    cfg = compose_train([f"model={name}"])
    model = OmegaConf.to_container(cfg.model, resolve=True)
    assert {model.pop(k) for k in RUN_SWITCHES} == {False, None}  # the run switches' defaults
    model_config({**model, "vocab_size": model.get("vocab_size") or 65})  # validates every other key


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
        assert isinstance(strategy, (DDPStrategy, FSDPStrategy, ModelParallelStrategy))
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


def test_hydra_launcher_and_sweeper_options_compose():
    slurm = compose_train(["hydra/launcher=slurm"], hydra_cfg=True).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and slurm.tasks_per_node == slurm.gpus_per_node
    joblib = compose_train(["hydra/launcher=joblib"], hydra_cfg=True).hydra.launcher
    assert joblib._target_.endswith("JoblibLauncher")
    cfg = compose_train(["hparams_search=optuna"], hydra_cfg=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.gptlab_sweeper.study_sweeper.StudySweeper"
    assert sweeper.storage == f"sqlite:///{cfg.hydra.sweep.dir}/optuna.db?timeout=60"
    assert cfg.hydra.sweep.dir.endswith("/train/optuna/gptlab")  # one directory per study: re-runs find it
    assert sweeper.direction is None and sweeper.n_trials == 20  # null: optimized_metric decides
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed == cfg.seed
    assert set(sweeper.params) == {"optim.lr", "model.n_layer", "model.n_embd", "model.dropout"}
    assert cfg.optimized_metric == "val/loss"


def test_presets_state_only_their_differences():
    """Experiments override only what differs from the groups they pick; `python train.py` is the quick
    CPU recipe; the GPT-2 124M preset keeps nanoGPT's ~0.5M tokens per optimizer step."""
    assert compose_train([]) == compose_train(["experiment=shakespeare_char_cpu"])
    assert compose_train(["optim=adamw"]).optim.name == "adamw"  # the command line picks the optimizer
    baby = compose_train(["experiment=shakespeare_char"])
    shape = OmegaConf.to_container(compose_train(["model=baby_shakespeare"]).model)
    assert OmegaConf.to_container(baby.model) == {**shape, "compile": True}
    assert baby.model.compile is True and baby.trainer.precision == "bf16-mixed"
    cfg = compose_train(["experiment=gpt2_124m"])
    t = cfg.trainer
    assert cfg.data.batch_size * cfg.model.block_size * t.accumulate_grad_batches * t.devices == 491_520
    for name in options("model"):  # shapes only: the run switches are declared in conf/train.yaml
        assert not set(RUN_SWITCHES) & set(OmegaConf.load(CONF / "model" / f"{name}.yaml")), name


@pytest.mark.parametrize("name", options("experiment"))
def test_every_experiment_composes_and_instantiates(name, data_dir, tmp_path):
    cfg = compose_train([f"experiment={name}", f"data.path={SHAKESPEARE}", f"paths.data_dir={data_dir}",
                         f"paths.output_dir={tmp_path}"])
    # the default experiment keeps the default task name, so `python train.py` writes to outputs/train/
    expected = {"finetune_shakespeare": "finetune", "shakespeare_char_cpu": "train"}.get(name, name)
    assert cfg.task_name == expected
    validate_train(cfg)
    assert isinstance(hydra.utils.instantiate(cfg.data), TokenDataModule)
    model = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k not in RUN_SWITCHES}
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


# -- the schema: one line naming the key, nothing read or written ---------------------------------------
BAD = [
    ("data.val_fraction=abc", "data.val_fraction='abc': expected a number"),
    ("model.dropout=abc", "model.dropout='abc': expected a number"),
    ("model.dropout=1.5", "model.dropout=1.5: must be >= 0.0 and < 1.0"),
    ("optim.lr=abc", "optim.lr='abc': expected a number"),
    ("optim.lr=-1", "optim.lr=-1: must be > 0.0"),
    ("trainer.val_check_interval=0", "trainer.val_check_interval=0: must be > 0"),
    ("trainer.max_time=10min", "trainer.max_time='10min': expected a duration > 0, DD:HH:MM:SS"),
    ("trainer.max_time={minutez: 3}", "trainer.max_time={'minutez': 3}: expected a duration"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0: must be >= 1"),
    ("trainer.max_steps=abc", "trainer.max_steps='abc': expected an integer"),
    ("trainer.precision=bogus", "trainer.precision='bogus': expected one of"),
    ("data.stride=-5", "data.stride=-5: must be >= 1"),
    ("data.num_workers=-1", "data.num_workers=-1: must be >= 0"),
    ("model.block_size=0", "model.block_size=0: must be >= 1"),
    ("model.n_layer=2.5", "model.n_layer=2.5: expected an integer"),
    ("seed=abc", "seed='abc': expected an integer"),
    ("optim.betas=[0.9,1.5]", "optim.betas=[0.9, 1.5]: need two values in [0, 1)"),
    ("callbacks.text_sample.max_new_tokens=abc", "callbacks.text_sample.max_new_tokens='abc': expected an integer"),
    ("callbacks.attention_maps.max_tokens=0", "callbacks.attention_maps.max_tokens=0: must be >= 1"),
]


@pytest.mark.parametrize("override, message", BAD, ids=[b[0] for b in BAD])
def test_bad_values_are_one_line_naming_the_key(override, message, tmp_path, data_dir):
    from inprocess import run_train

    with pytest.raises(GptlabError) as info:
        run_train([f"data.path={SHAKESPEARE}", f"paths.data_dir={data_dir}", "data.sampler=sliding", override],
                  tmp_path / "run")
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()  # refused before anything was written


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
    "experiment=shakespeare_char_cpu_long": [],
    "experiment=shakespeare_char_cpu_record": [],
    "experiment=shakespeare_bpe": ["trainer=cpu"],
    "experiment=gpt2_124m": ["trainer=cpu", "trainer.devices=1", "trainer.accumulate_grad_batches=2"],
    "experiment=finetune_shakespeare": ["trainer=cpu", "model.init_from=null", "trainer.accumulate_grad_batches=2"],
    "debug=fdr": [],
    "debug=overfit": ["trainer.max_steps=4", "trainer.check_val_every_n_epoch=2", "trainer.val_check_interval=null"],
    "debug=profiler": [],
}


@pytest.mark.parametrize("choice", list(RUNS))
def test_preset_trains_a_few_steps(choice, tmp_path, data_dir):
    from inprocess import run_train

    overrides = [choice, f"data.path={SHAKESPEARE}", f"paths.data_dir={data_dir}", *TINY_MODEL, *QUICK, *RUNS[choice]]
    value = run_train(overrides, tmp_path)
    assert value is not None and math.isfinite(value)
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt")) if (tmp_path / "checkpoints").exists() else []
    if choice == "debug=fdr":  # fast_dev_run: no TensorBoard run, no checkpoint, still a validation loss
        assert ckpts == [] and not (tmp_path / "tensorboard").exists()
        return
    assert "last.ckpt" in ckpts
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == (4 if choice == "debug=overfit" else 2)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    if choice == "debug=profiler":
        assert (tmp_path / "fit-profile.txt").is_file()
    if choice == "experiment=gpt2_124m":
        assert ckpt["hyper_parameters"]["tokenizer"]["kind"] == "bpe"
        assert ckpt["gptlab"]["micro_step"] == 4


# -- one declaration per rule: the owner's own check and the config check say the same ----------------
@pytest.mark.parametrize("override, direct", [
    ("model.n_head=0", lambda: GPTConfig(n_head=0)),
    ("model.pos=alibi", lambda: GPTConfig(pos="alibi")),
    ("optim.eps=0", lambda: OptimConfig(eps=0)),
    ("data.val_fraction=1.0", lambda: TokenDataModule(val_fraction=1.0)),
    ("data.sampler=shuffled", lambda: TokenDataModule(sampler="shuffled")),
    ("callbacks.text_sample.top_k=0", lambda: generate(None, None, 1, top_k=0)),
])
def test_the_owner_and_the_config_check_report_alike(override, direct, tmp_path):
    with pytest.raises(ConfigError) as config:
        validate_train(compose_train([override, f"paths.output_dir={tmp_path}"]))
    with pytest.raises(ConfigError) as owner:
        direct()
    key = override.split("=")[0]
    assert str(config.value).startswith(f"{key}=")
    assert str(config.value).split(":", 1)[1] == str(owner.value).split(":", 1)[1]
