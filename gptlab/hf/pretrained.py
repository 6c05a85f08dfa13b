"""The model config of a run that starts from pretrained weights (`model.init_from`).

As in nanoGPT's `from_pretrained`, the shape is the checkpoint's: its config.json (a Hugging Face
GPT-2 or Llama directory) or its stored model config (a gptlab checkpoint). The run's
conf/model/*.yaml contributes only what leaves the weights as they are (`dropout`). A shape value
given explicitly on the command line (`model.n_layer=4`, as Hydra's task overrides record it) must
agree with the checkpoint, else the run stops with one line naming the key, the value given and
the checkpoint's. One exception: `model.block_size` may be smaller than the checkpoint's (the
first positions of a learned position table are kept, as nanoGPT's `crop_block_size` does; RoPE
has no table).

Plain functions on config dicts; reading the checkpoint is gptlab.hf.convert's business.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch.nn as nn

from gptlab.errors import ConfigError
from gptlab.models import ARCHS, model_config

# model config keys that are training settings, not properties of the weights: the run's value wins
FREE_KEYS = ("dropout",)


def explicit_keys(overrides: list[str], group: str = "model") -> list[str]:
    """The keys of `group` that command-line overrides set: `model.n_layer=4` -> n_layer (a group
    choice such as `model=gpt2` sets none)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    prefix = group + "."
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [o.key_or_group[len(prefix):] for o in parsed if o.key_or_group.startswith(prefix)]


def full(cfg: dict[str, Any]) -> dict[str, Any]:
    """Every field of a model config, with defaults and derived values (n_kv_head, mlp_hidden) filled in."""
    return {"arch": cfg.get("arch", "gpt"), **dataclasses.asdict(model_config(cfg))}


def _text(value: Any) -> str:
    """A value as it is written on the command line."""
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _conflict(key: str, given: Any, theirs: dict[str, Any], source: str, advice: str = "") -> str | None:
    """Why `model.<key>=<given>` cannot go with a checkpoint whose full config is `theirs` (None: it can)."""
    if key not in theirs:
        return f"model.{key}={_text(given)}: the model of {source} has no such setting"
    try:  # a null fills in as it does for the checkpoint (qkv_bias=null: the same as bias)
        mine = full({**theirs, key: given})[key]
    except ConfigError:
        mine = given
    if mine == theirs[key]:
        return None
    if key == "block_size" and isinstance(mine, int) and not isinstance(mine, bool) and 0 < mine < theirs[key]:
        return None  # a shorter context: the first positions
    hint = "; model.block_size may only be smaller" if key == "block_size" else ""
    return f"model.{key}={_text(given)} but {source} has {key}={_text(theirs[key])}{hint}{advice}"


def merge_shape(theirs: dict[str, Any], ours: dict[str, Any], explicit: list[str], source: str) -> dict[str, Any]:
    """The model config of a run from a checkpoint of model config `theirs`.

    `ours`: the run's model config (conf/model/*.yaml and overrides, without the run switches);
    `explicit`: its keys set on the command line (`explicit_keys`)."""
    theirs = full(theirs)
    shape = dict(theirs)
    for key in FREE_KEYS:
        if key in shape and key in ours:
            shape[key] = ours[key]
    for key in explicit:
        if key in FREE_KEYS or key not in ours:
            continue
        advice = f" (with model.init_from the shape is the checkpoint's: leave model.{key} out)"
        problem = _conflict(key, ours[key], theirs, source, advice)
        if problem:
            raise ConfigError(problem)
        if key == "block_size":
            shape[key] = ours[key]
    return shape


def check_model(model: nn.Module, theirs: dict[str, Any], source: str) -> None:
    """`model` has the shape of a checkpoint whose model config is `theirs` (block_size: at most its)."""
    arch = next((name for name, (cls, _) in ARCHS.items() if isinstance(model, cls)), type(model).__name__)
    config = getattr(model, "config", None)
    mine = {"arch": arch, **(dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {})}
    full_theirs = full(theirs)
    for key in [k for k in {**full_theirs, **mine} if k not in FREE_KEYS]:
        problem = _conflict(key, mine.get(key), full_theirs, f"the checkpoint {source}")
        if problem:
            raise ConfigError(problem)
