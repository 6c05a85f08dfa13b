"""The job lists of two structured sweeps, run by Hydra's basic sweeper (one job after another, each
with gptlab's failure isolation: a failed job gets FAILED and the sweep goes on). Each job is composed
by Hydra from its own overrides, so group switches (`optim=adamw`) work as on the command line, and the
report groups the jobs by them (gptlab.report.groups).

* ablation (conf/hparams_search/ablation.yaml): the command line is the base; each seed runs the base
  and then each change, one switch at a time:
      seed=1, [seed=1 model.pos=learned], [seed=1 optim=adamw], seed=2, ...
  Seeds come first so that an interrupted sweep has balanced groups. A compute budget is required.
* isoFLOP (conf/hparams_search/isoflop.yaml): every FLOP budget times every model depth d, the width
  following the depth: n_layer = d, n_embd = aspect x d, n_head = n_embd / head_dim (aspect 32 and
  head size 32 by default: d = 4 is gpt_micro's 4 layers, 4 heads, 128 channels).

Command-line sweeps (`optim.lr=1e-3,3e-3`) multiply both lists; a job's own override of a key replaces
the command line's.
"""

from __future__ import annotations

from collections.abc import Sequence

from gptlab.errors import ConfigError
from gptlab.run.naming import key_of


def with_overrides(base: Sequence[str], extra: Sequence[str]) -> list[str]:
    """`base` with each override of `extra` replacing the one of the same key (or added)."""
    keys = {key_of(o) for o in extra}
    return [o for o in base if key_of(o) not in keys] + list(extra)


def seed_list(seeds: int | Sequence[int] | None) -> list[int | None]:
    """`3`: seeds 1, 2, 3; a list: those; None or 0: no seed override (the config's seed)."""
    if not seeds:
        return [None]
    if isinstance(seeds, int):
        if seeds < 0:
            raise ConfigError(f"hydra.sweeper.seeds={seeds}: a number of seeds >= 1, or a list of seeds")
        return list(range(1, seeds + 1))
    return [int(s) for s in seeds]


def _seed(seed: int | None) -> list[str]:
    return [] if seed is None else [f"seed={seed}"]


def ablation_jobs(bases: list[list[str]], changes: Sequence[str | Sequence[str]],
                  seeds: int | Sequence[int]) -> list[list[str]]:
    switches: list[list[str]] = [[]]
    for change in changes:
        change = [change] if isinstance(change, str) else list(change)
        if not change or any("=" not in c for c in change):
            raise ConfigError(f"hydra.sweeper.changes: {change!r} is not an override (key=value)")
        switches.append(change)
    return [with_overrides(base, [*switch, *_seed(seed)])
            for base in bases for seed in seed_list(seeds) for switch in switches]


def model_shape(depth: int, aspect: int, head_dim: int) -> list[str]:
    width = aspect * depth
    if depth < 1 or width % head_dim:
        raise ConfigError(f"isoFLOP depth {depth}: width {aspect} x {depth} = {width} is not a multiple of "
                          f"hydra.sweeper.head_dim={head_dim}")
    return [f"model.n_layer={depth}", f"model.n_embd={width}", f"model.n_head={width // head_dim}"]


def isoflop_jobs(bases: list[list[str]], budgets: Sequence[float], depths: Sequence[int], aspect: int = 32,
                 head_dim: int = 32, seeds: int | Sequence[int] | None = None) -> list[list[str]]:
    if not budgets or not depths:
        raise ConfigError("hparams_search=isoflop needs hydra.sweeper.budgets (FLOPs) and hydra.sweeper.depths")
    for budget in budgets:
        if not float(budget) > 0:
            raise ConfigError(f"hydra.sweeper.budgets: {budget!r} is not a number of FLOPs > 0")
    return [with_overrides(base, [f"budget.flops={float(c):g}", *model_shape(int(d), aspect, head_dim), *_seed(s)])
            for base in bases for c in budgets for d in depths for s in seed_list(seeds)]
