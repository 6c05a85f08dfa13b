"""Declared rules: a setting's type, range and choices live in the annotation of the code that uses it.

    block_size: Annotated[int, Range(1)] = 64            # an integer >= 1
    val_fraction: Annotated[float, Range(0.0, 1.0, low_open=True)] = 0.1
    pos: Literal["learned", "rope"] = "learned"          # a choice

The owner checks its own values with `check_fields` (a dataclass, from __post_init__) or `check_args`
(a function's arguments), and gptlab/config.py checks a whole composed config through the same
annotations before a run writes anything, so both report one line, `model.n_head=0: must be >= 1`.
Rules between fields (n_embd divisible by n_head) stay in their owner's code.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any

from gptlab.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Range:
    """Bounds of a number: `low` (itself allowed unless `low_open`) and `high` (itself excluded unless
    not `high_open`); None: unbounded on that side."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = True

    def holds(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or value < self.high or (not self.high_open and value == self.high)

    def __str__(self) -> str:
        lo = None if self.low is None else f"{'>' if self.low_open else '>='} {self.low}"
        hi = None if self.high is None else f"{'<' if self.high_open else '<='} {self.high}"
        return " and ".join(b for b in (lo, hi) if b)


@dataclasses.dataclass(frozen=True)
class Say:
    """What a wrong value is told it must be, where the type and range alone would say less."""

    text: str


Positive = Annotated[int, Range(1)]


def _parts(tp: Any) -> tuple[Any, list[Any]]:
    """(the type, its Annotated metadata) of `tp`, looking through Optional[Annotated[...]]."""
    if typing.get_origin(tp) is Annotated:
        return tp.__origin__, list(tp.__metadata__)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        extras = [m for a in typing.get_args(tp) for m in _parts(a)[1]]
        return typing.Union[tuple(_parts(a)[0] for a in typing.get_args(tp))], extras
    return tp, []


def describe(tp: Any) -> str:
    tp = _parts(tp)[0]
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}
    if tp in names:
        return names[tp]
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(describe(a) for a in typing.get_args(tp)))
    if origin in (list, tuple) or tp in (list, tuple):
        return "a list"
    return getattr(tp, "__name__", str(tp))


def fits(value: Any, tp: Any) -> bool:
    """Whether `value` has type `tp` (a class that is not a plain value type always fits: it is
    instantiated from a node or a name, e.g. a Strategy)."""
    tp = _parts(tp)[0]
    if tp is Any or tp is inspect.Parameter.empty:
        return True
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
        return any(fits(value, a) for a in typing.get_args(tp))
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin in (dict, Mapping) or tp is dict:
        return isinstance(value, Mapping)
    return value is not None


def check(key: str, value: Any, tp: Any = Any, null_is_default: bool = False) -> None:
    """ConfigError `key=value: ...` unless `value` has the type, range and choices `tp` declares.
    `null_is_default`: None passes (in a config, null means "the default", e.g. model.vocab_size)."""
    if value is None and null_is_default:
        return
    base, extras = _parts(tp)
    say = next((m.text for m in extras if isinstance(m, Say)), None)
    if not fits(value, base):
        if say:
            raise ConfigError(f"{key}={value!r}: must be {say}")
        if typing.get_origin(base) is typing.Literal:
            raise ConfigError(f"{key}={value!r}: choose one of {', '.join(map(str, typing.get_args(base)))}")
        raise ConfigError(f"{key}={value!r}: expected {describe(base)}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    for rule in extras:
        if isinstance(rule, Range) and not rule.holds(value):
            raise ConfigError(f"{key}={value!r}: must be {say or rule}")


@functools.cache
def hints(target: Any) -> dict[str, Any]:
    """The annotations (Annotated kept) of a function, or of a class's fields or constructor."""
    if dataclasses.is_dataclass(target) and isinstance(target, type):
        return typing.get_type_hints(target, include_extras=True)
    fn = target.__init__ if inspect.isclass(target) else target
    try:
        return typing.get_type_hints(fn, include_extras=True)
    except Exception:  # annotations that do not evaluate here: trust the target to check its own
        return {}


def check_args(target: Any, values: Mapping[str, Any], prefix: str = "", keys: Mapping[str, str] | None = None,
               null_is_default: bool = False) -> None:
    """Each of `values` that `target` annotates, named `prefix + name` (or `keys[name]`)."""
    declared = hints(target)
    keys = keys or {}
    for name, value in values.items():
        if name in declared and name != "return":
            check(keys.get(name, f"{prefix}{name}"), value, declared[name], null_is_default)


def check_fields(obj: Any, prefix: str = "") -> None:
    """Every field of the dataclass instance `obj` against its annotation."""
    check_args(type(obj), {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}, prefix)
