"""The config schema: every value is checked against the type its consumer declares, and against the
ranges below, before a run reads data or writes anything, so a wrong value is one line naming the key.

The types come from the code itself: a node with a `_target_` is checked against the signature of
what it instantiates (TokenDataModule, lightning.Trainer, every callback and logger, ...); `model` against its architecture's
config dataclass; `optim` against OptimConfig. Only the ranges are written down here.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gptlab.errors import ConfigError

# keys of `model` that say how to run it, not what it is (conf/train.yaml declares them); checkpoints keep
# the rest, the shape (readers drop these where a checkpoint's config carries them)
RUN_SWITCHES = ("compile", "init_from")

# key: (low, high, whether low itself is allowed); None: unbounded. Nulls pass (they mean "default").
RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    "model.block_size": (1, None, True), "model.n_layer": (1, None, True), "model.n_head": (1, None, True),
    "model.n_embd": (1, None, True), "model.vocab_size": (1, None, True), "model.dropout": (0.0, 1.0, True),
    "data.batch_size": (1, None, True), "data.val_windows": (1, None, True), "data.val_fraction": (0.0, 1.0, False),
    "data.stride": (1, None, True), "data.num_workers": (0, None, True), "data.prepare_workers": (1, None, True),
    "optim.lr": (0.0, None, False), "optim.min_lr": (0.0, None, True), "optim.weight_decay": (0.0, None, True),
    "optim.warmup_steps": (0, None, True), "optim.decay_steps": (1, None, True), "optim.eps": (0.0, None, False),
    "trainer.max_steps": (-1, None, True), "trainer.val_check_interval": (0, None, False),
    "trainer.accumulate_grad_batches": (1, None, True), "trainer.log_every_n_steps": (1, None, True),
    "trainer.gradient_clip_val": (0.0, None, True), "trainer.num_nodes": (1, None, True),
    "trainer.num_sanity_val_steps": (-1, None, True),
    "callbacks.text_sample.max_new_tokens": (1, None, True), "callbacks.attention_maps.max_tokens": (1, None, True),
    "callbacks.attention_maps.every_n_validations": (1, None, True), "callbacks.attention_maps.cell_pixels": (1, None, True),
    "callbacks.throughput.window_size": (1, None, True),
    "max_new_tokens": (1, None, True), "num_samples": (1, None, True), "temperature": (0.0, None, True),
    "top_k": (1, None, True), "top_p": (0.0, 1.0, False),
}


def _describe(tp: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}
    if tp in names:
        return names[tp]
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(a) for a in typing.get_args(tp)))
    if origin in (list, tuple) or tp in (list, tuple):
        return "a list"
    return getattr(tp, "__name__", str(tp))


def _fits(value: Any, tp: Any) -> bool:
    if tp is Any or tp is inspect.Parameter.empty or value is None:
        return True  # null means "the default" (e.g. model.vocab_size: the tokenizer's)
    if tp is type(None) or tp is None:
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(tp))
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin in (dict, Mapping) or tp is dict:
        return isinstance(value, Mapping)
    return True  # a class (an Accelerator, a Strategy, ...): instantiated from a node or a name


def check(key: str, value: Any, tp: Any = Any) -> None:
    """One value: its type, then its range."""
    if not _fits(value, tp):
        raise ConfigError(f"{key}={value!r}: expected {_describe(tp)}")
    bounds = RANGES.get(key)
    if bounds is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    low, high, low_ok = bounds
    if (low is not None and (value < low or (value == low and not low_ok))) or (high is not None and value >= high):
        lo = "" if low is None else f"{'>=' if low_ok else '>'} {low}"
        hi = "" if high is None else f"< {high}"
        raise ConfigError(f"{key}={value!r}: must be {' and '.join(b for b in (lo, hi) if b)}")


def _hints(target: Any) -> dict[str, Any]:
    fn = target.__init__ if inspect.isclass(target) else target
    try:
        return typing.get_type_hints(fn)
    except Exception:  # annotations that do not evaluate here: trust the target to check its own
        return {}


def check_node(node: Mapping[str, Any], prefix: str, hints: dict[str, Any]) -> None:
    for key, value in node.items():
        if str(key).startswith("_") or isinstance(value, Mapping) and "_target_" in value:
            continue
        check(f"{prefix}{key}", value, hints.get(key, Any))


def check_target(node: Mapping[str, Any], prefix: str) -> None:
    """A `_target_` node against the signature of what it instantiates."""
    from hydra.utils import get_object

    try:
        target = get_object(node["_target_"])
    except Exception:
        return  # instantiating it reports the missing module or class (gptlab.errors.user_error)
    check_node(node, prefix, _hints(target))


def check_dataclass(node: Mapping[str, Any], prefix: str, cls: type) -> None:
    check_node(node, prefix, typing.get_type_hints(cls))


def validate_train(cfg: DictConfig) -> None:
    """train.py's config, before anything is read or written."""
    from gptlab.models import ARCHS
    from gptlab.training.optim import OptimConfig

    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # an interpolation that does not resolve
        raise ConfigError(str(e).strip().splitlines()[0]) from None
    model = container.get("model") or {}
    arch = model.get("arch", "gpt")
    if arch in ARCHS:
        check_dataclass({k: v for k, v in model.items() if k != "arch"}, "model.", ARCHS[arch][1])
    check_dataclass(container.get("optim") or {}, "optim.", OptimConfig)
    for group in ("data", "trainer"):
        node = container.get(group)
        if isinstance(node, Mapping) and "_target_" in node:
            check_target(node, f"{group}.")
    for group in ("callbacks", "logger"):  # groups of named entries, each instantiated on its own
        for name, node in (container.get(group) or {}).items():
            if isinstance(node, Mapping) and "_target_" in node:
                check_target(node, f"{group}.{name}.")
    for key in ("seed",):
        check(key, container.get(key), int)
    budget_seconds((container.get("trainer") or {}).get("max_time"))


def budget_seconds(max_time: Any) -> float | None:
    """trainer.max_time in seconds (None: no time budget), read as Lightning's Timer reads it."""
    from lightning.pytorch.callbacks import Timer
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    if max_time is None:
        return None
    if isinstance(max_time, DictConfig):
        max_time = OmegaConf.to_container(max_time)
    try:
        seconds = Timer(duration=max_time).time_remaining()  # a Timer not started: its whole duration
    except (MisconfigurationException, TypeError, AttributeError):
        seconds = None
    if seconds is None or seconds <= 0:
        raise ConfigError(f"trainer.max_time={max_time!r}: expected a duration > 0, DD:HH:MM:SS (00:00:10:00) "
                          f"or a mapping ({{minutes: 10}}, {{hours: 1, minutes: 30}})")
    return seconds


def validate_dataclass(node: Mapping[str, Any], cls: type) -> Any:
    """A flat config (sample.py's) checked against the dataclass that declares it, returned as one."""
    known = {f.name for f in dataclasses.fields(cls)}
    check_node({k: v for k, v in node.items() if k in known}, "", typing.get_type_hints(cls))
    return cls(**{k: v for k, v in node.items() if k in known})
