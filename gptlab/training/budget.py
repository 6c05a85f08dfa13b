"""Compute budgets: train every model of a comparison on the same FLOPs (or tokens) by construction.

`budget.flops=1e15` (or `budget.tokens=2e7`) sets the number of optimizer steps from

    tokens per step = data.batch_size x model.block_size x devices x nodes x accumulate_grad_batches
    FLOPs per token = the model's `flops_per_token()`: 6N + 12 L H Q T (the count of the MFU figures)
    steps = floor(budget.flops / (FLOPs per token x tokens per step))   or   floor(budget.tokens / tokens per step)

The budget replaces `trainer.max_steps` of the config files (a line says so); `trainer.max_steps` given
on the command line as well is refused, and so are `trainer.max_time` and `optim.decay_steps` (another
stop or another end of the LR schedule would break the equal compute). The LR schedule decays over the
derived steps. What was spent (`Spend`) goes to the console, the trackers and the job's DONE marker.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Annotated

from gptlab.errors import ConfigError
from gptlab.schema import Range, check_fields


@dataclass
class Budget:
    """conf/train.yaml's `budget` node (gptlab.config checks a composed config against it): at most one."""

    flops: Annotated[float | None, Range(0, low_open=True)] = None
    tokens: Annotated[float | None, Range(0, low_open=True)] = None

    def __post_init__(self) -> None:
        check_fields(self, "budget.")
        if self.flops is not None and self.tokens is not None:
            raise ConfigError(f"budget.flops={self.flops:g} and budget.tokens={self.tokens:g}: set one of them")

    @property
    def given(self) -> bool:
        return self.flops is not None or self.tokens is not None

    def describe(self) -> str:
        return f"budget.flops={self.flops:.3g}" if self.flops is not None else f"budget.tokens={self.tokens:.3g}"


@dataclass
class Spend:
    """What a budget buys: written to DONE as `budget` and read back by the report."""

    flops: float | None  # the budget given (one of the two)
    tokens: float | None
    steps: int  # optimizer steps derived from it
    tokens_per_step: int
    flops_per_token: float
    params: int  # N of the 6N term: the parameters every token's matmuls touch (no embedding lookups)
    tokens_spent: float = 0.0  # what the steps trained on: steps x tokens per step
    flops_spent: float = 0.0

    def record(self, steps_done: int) -> dict:
        """DONE's `budget` entry for a run that trained `steps_done` steps in all."""
        tokens = float(steps_done * self.tokens_per_step)
        return {**asdict(self), "tokens_spent": tokens, "flops_spent": tokens * self.flops_per_token}


def tokens_per_step(batch_size: int, block_size: int, devices: int = 1, num_nodes: int = 1, accumulate: int = 1) -> int:
    """Tokens one optimizer step trains on, over every process and micro-batch."""
    return batch_size * block_size * devices * num_nodes * accumulate


def budget_steps(budget: Budget, flops_per_token: float, step_tokens: int) -> int:
    """Optimizer steps that fit in the budget (whole steps: what is left over is not spent)."""
    if budget.flops is not None:
        per_step = flops_per_token * step_tokens
        steps = math.floor(budget.flops / per_step)
        cost = f"one step ({step_tokens} tokens x {flops_per_token:.4g} FLOPs/token) costs {per_step:.4g} FLOPs"
    else:
        steps = math.floor(budget.tokens / step_tokens)
        cost = f"one step trains on {step_tokens} tokens"
    if steps < 1:
        raise ConfigError(f"{budget.describe()} is too small for one optimizer step: {cost}")
    return steps


def plan(budget: Budget, model, batch_size: int, world_size: int, accumulate: int) -> Spend:
    """The Spend of `budget` for `model` (a gptlab model, whole: before any sharding) trained on
    batches of `batch_size` windows of its block size by `world_size` processes."""
    block = model.config.block_size
    step_tokens = tokens_per_step(batch_size, block, world_size, 1, accumulate)
    per_token = float(model.flops_per_token(block))
    steps = budget_steps(budget, per_token, step_tokens)
    return Spend(budget.flops, budget.tokens, steps, step_tokens, per_token, int(model.num_params(non_embedding=True)))


def from_config(cfg, given: set[str] = frozenset()) -> Budget | None:
    """The run's budget (None: none given), refused with the settings it cannot share a run with.
    `given`: the keys set on the command line (gptlab.run.naming.command_line_keys)."""
    budget = Budget(**(cfg.get("budget") or {}))
    if not budget.given:
        return None
    check_settings(budget, cfg, given)
    return budget


def check_settings(budget: Budget, cfg, given: set[str]) -> None:
    """See the module's docstring: trainer.max_steps on the command line, max_time, decay_steps."""
    if "trainer.max_steps" in given:
        raise ConfigError(f"{budget.describe()} and trainer.max_steps={cfg.trainer.max_steps} on the command line: "
                          f"the budget sets the steps; give one of them")
    if cfg.trainer.get("max_time") is not None:
        raise ConfigError(f"{budget.describe()} and trainer.max_time={cfg.trainer.max_time}: a time limit could stop "
                          f"the run before its budget is spent; give one of them")
    if cfg.optim.get("decay_steps") is not None:
        raise ConfigError(f"{budget.describe()} and optim.decay_steps={cfg.optim.decay_steps}: with a budget the LR "
                          f"schedule ends with the budget's steps; drop optim.decay_steps")


def apply(budget: Budget, cfg, trainer, model) -> Spend:
    """Set `trainer`'s max_steps (and the config's, which the trackers log) to what `budget` buys."""
    from omegaconf import open_dict

    spend = plan(budget, model, cfg.data.batch_size, trainer.world_size, trainer.accumulate_grad_batches)
    # the attribute Lightning's own learning-rate finder sets to change a built Trainer's max_steps
    trainer.fit_loop.epoch_loop.max_steps = spend.steps
    if trainer.is_global_zero:
        print(describe(spend, cfg.trainer.get("max_steps")))
        warmup = cfg.optim.get("warmup_steps") or 0
        if spend.steps <= warmup:
            print(f"[gptlab] warning: the budget's {spend.steps} steps end within optim.warmup_steps={warmup}: "
                  f"the learning rate never reaches its peak; lower optim.warmup_steps or raise the budget")
    with open_dict(cfg):
        cfg.trainer.max_steps = spend.steps
        cfg.budget.update(steps=spend.steps, tokens_per_step=spend.tokens_per_step,
                          flops_per_token=spend.flops_per_token, params=spend.params)
    return spend


def log_spent(trainer, record: dict) -> None:
    """The FLOPs and tokens spent, as scalars at the last step, for every tracker."""
    metrics = {"budget/flops_spent": record["flops_spent"], "budget/tokens_spent": record["tokens_spent"]}
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=max(0, trainer.global_step - 1))
        logger.save()


def describe(spend: Spend, replaced: int | None) -> str:
    budget = Budget(spend.flops, spend.tokens)
    line = (f"[gptlab] {budget.describe()}: {spend.steps} steps of {spend.tokens_per_step} tokens at "
            f"{spend.flops_per_token:.4g} FLOPs/token (N={spend.params:,}) = "
            f"{spend.steps * spend.tokens_per_step * spend.flops_per_token:.4g} FLOPs")
    return line + (f"; replaces trainer.max_steps={replaced}" if replaced not in (None, spend.steps) else "")
