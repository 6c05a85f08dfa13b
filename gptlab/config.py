"""The config check: every value of a composed config against what the code that consumes it declares
(its type, range and choices, see gptlab/schema.py), before a run reads data or writes anything, so a
wrong value is one line naming the key.

A node with a `_target_` is checked against the signature of what it instantiates (TokenDataModule,
lightning.Trainer with gptlab/training/trainer_settings.py's ranges, every callback and logger, ...);
`model` against its architecture's config dataclass; `optim` against OptimConfig; `budget` against Budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gptlab import schema
from gptlab.errors import ConfigError
from gptlab.models import RUN_SWITCHES  # noqa: F401  (declared with the models; imported from here too)


def check_node(node: Mapping[str, Any], prefix: str, hints: dict[str, Any]) -> None:
    for key, value in node.items():
        if str(key).startswith("_") or isinstance(value, Mapping) and "_target_" in value:
            continue
        schema.check(f"{prefix}{key}", value, hints.get(key, Any), null_is_default=True)


def check_target(node: Mapping[str, Any], prefix: str) -> None:
    """A `_target_` node against the signature of what it instantiates."""
    from hydra.utils import get_object
    from lightning.pytorch import Trainer

    from gptlab.training.trainer_settings import trainer_hints

    try:
        target = get_object(node["_target_"])
    except Exception:
        return  # instantiating it reports the missing module or class (gptlab.errors.user_error)
    check_node(node, prefix, trainer_hints() if target is Trainer else schema.hints(target))


def validate_train(cfg: DictConfig) -> None:
    """train.py's config, before anything is read or written."""
    from gptlab.models import ARCHS
    from gptlab.training.budget import Budget
    from gptlab.training.optim import OptimConfig
    from gptlab.training.trainer_settings import budget_seconds

    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # an interpolation that does not resolve
        raise ConfigError(str(e).strip().splitlines()[0]) from None
    model = container.get("model") or {}
    arch = model.get("arch", "gpt")
    if arch in ARCHS:
        check_node({k: v for k, v in model.items() if k != "arch"}, "model.", schema.hints(ARCHS[arch][1]))
    check_node(container.get("optim") or {}, "optim.", schema.hints(OptimConfig))
    check_node(container.get("budget") or {}, "budget.", schema.hints(Budget))
    for group in ("data", "trainer"):
        node = container.get(group)
        if isinstance(node, Mapping) and "_target_" in node:
            check_target(node, f"{group}.")
    for group in ("callbacks", "logger"):  # groups of named entries, each instantiated on its own
        for name, node in (container.get(group) or {}).items():
            if isinstance(node, Mapping) and "_target_" in node:
                check_target(node, f"{group}.{name}.")
    schema.check("seed", container.get("seed"), int, null_is_default=True)
    budget_seconds((container.get("trainer") or {}).get("max_time"))


def validate_dataclass(node: Mapping[str, Any], cls: type) -> Any:
    """A flat config (sample.py's) checked against the dataclass that declares it, returned as one."""
    known = {f.name for f in dataclasses.fields(cls)}
    check_node({k: v for k, v in node.items() if k in known}, "", schema.hints(cls))
    return cls(**{k: v for k, v in node.items() if k in known})
