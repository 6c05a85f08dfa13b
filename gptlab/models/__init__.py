"""Models and the one way to build them from a plain config dict (as stored in checkpoints)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch.nn as nn

from gptlab.errors import ConfigError
from gptlab.models.bigram import Bigram, BigramConfig
from gptlab.models.gpt import GPT, GPTConfig, KVCache

ARCHS: dict[str, tuple[type, type]] = {"gpt": (GPT, GPTConfig), "bigram": (Bigram, BigramConfig)}

# the key of a model config that picks the class; the others are its config dataclass's fields
RUNTIME_KEYS = ("arch",)
# keys of `model` that say how to run it, not what it is (conf/train.yaml declares them); checkpoints keep
# the rest, the shape (readers drop these where a checkpoint's config carries them)
RUN_SWITCHES = ("compile", "init_from", "activation_checkpointing")


def model_config(cfg: dict[str, Any]) -> GPTConfig | BigramConfig:
    """The dataclass config of `cfg` (a plain dict, e.g. conf/model/*.yaml plus vocab_size).

    Unknown keys are an error that names them, so a typo never silently falls back to a default.
    """
    arch = cfg.get("arch", "gpt")
    if arch not in ARCHS:
        raise ConfigError(f"model.arch={arch!r} is unknown; choose one of {sorted(ARCHS)}")
    _, config_cls = ARCHS[arch]
    fields = {f.name for f in dataclasses.fields(config_cls)}
    shape = {k: v for k, v in cfg.items() if k not in RUNTIME_KEYS}
    unknown = sorted(set(shape) - fields)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} for model.arch={arch!r}; valid keys: {sorted(fields | set(RUNTIME_KEYS))}"
        )
    return config_cls(**shape)


def build_model(cfg: dict[str, Any]) -> nn.Module:
    arch = cfg.get("arch", "gpt")
    config = model_config(cfg)
    model_cls, _ = ARCHS[arch]
    return model_cls(config)


__all__ = ["GPT", "GPTConfig", "KVCache", "Bigram", "BigramConfig", "build_model", "model_config", "ARCHS",
           "RUN_SWITCHES"]
