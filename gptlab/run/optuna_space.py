"""Hydra's sweep syntax as an Optuna search space, for the Optuna sweeper and the report.

| override                          | Optuna distribution                                        |
|-----------------------------------|------------------------------------------------------------|
| `key=choice(a, b, c)`, `key=a,b,c`| CategoricalDistribution([a, b, c])                         |
| `key=range(1, 9, 2)`              | IntDistribution(1, 7, step=2): the values Hydra's range gives (stop excluded) |
| `key=range(0, 1, 0.25)`           | FloatDistribution(0, 0.75, step=0.25)                      |
| `key=shuffle(range(...))`         | CategoricalDistribution of the range's values              |
| `key=interval(1e-4, 1e-2)`        | FloatDistribution(1e-4, 1e-2) (Hydra's interval is a float's) |
| `key=tag(log, interval(...))`     | the same with log=True                                     |
| `key=value`                       | a fixed value, not searched                                |

Anything else (`glob(...)`, an interval whose bounds Optuna refuses) is a ConfigError naming the override.
"""

from __future__ import annotations

from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from gptlab.errors import ConfigError


def distribution(override: Any) -> BaseDistribution | str:
    """One parsed Hydra override (hydra.core.override_parser.types.Override) as a distribution, or the
    value (as the override's text) of one that is not a sweep."""
    from hydra.core.override_parser.types import Glob, IntervalSweep, Transformer

    if not override.is_sweep_override():
        return override.get_value_element_as_str()
    value = override.value()
    if override.is_interval_sweep():
        assert isinstance(value, IntervalSweep)
        return FloatDistribution(float(value.start), float(value.end), log="log" in value.tags)
    if isinstance(value, Glob):
        raise ValueError("glob() selects config group options, which Optuna cannot sample")
    values = list(override.sweep_iterator(transformer=Transformer.encode))
    if not values:
        raise ValueError("no values to choose from")
    if override.is_range_sweep() and not value.shuffle:
        step = values[1] - values[0] if len(values) > 1 else 1
        if all(isinstance(v, int) for v in values):
            return IntDistribution(values[0], values[-1], step=step)
        return FloatDistribution(float(values[0]), float(values[-1]), step=float(step))
    return CategoricalDistribution(values)


def search_space(overrides: list[str], where: str = "hydra.sweeper.params") -> tuple[dict[str, BaseDistribution], dict[str, str]]:
    """(searched key -> distribution, fixed key -> its override's text) of Hydra overrides; a later
    override of a key replaces an earlier one (the command line's replace the config's `params`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    space: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    for text in overrides:
        try:
            override = parser.parse_override(text)
            dist = distribution(override)
        except (HydraException, ValueError, TypeError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"{where}: {text}: a search space Optuna cannot express ({reason})") from None
        key = override.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        if isinstance(dist, BaseDistribution):
            space[key] = dist
        else:
            fixed[key] = text
    return space, fixed


def grid(space: dict[str, BaseDistribution]) -> dict[str, list]:
    """Every value of each dimension, for Optuna's GridSampler: continuous intervals have none."""
    out = {}
    for key, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            out[key] = list(dist.choices)
        elif isinstance(dist, (IntDistribution, FloatDistribution)) and dist.step is not None and not dist.log:
            n = int(round((dist.high - dist.low) / dist.step)) + 1
            out[key] = [dist.low + i * dist.step for i in range(n)]
        else:
            raise ConfigError(f"hydra.sweeper.params: {key} is a continuous interval; the grid sampler needs "
                              f"choice(...) or range(...)")
    return out


def override(key: str, value: Any) -> str:
    """A sampled value as the job's override (`optim.lr=0.0012`)."""
    return f"{key}={value}"
