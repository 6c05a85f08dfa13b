"""Optimizer construction: the config, the parameter groups, AdamW or Muon, and the LR schedule.

The LightningModule (`configure_optimizers`) and the raw-loop benchmarks (bench/) build their
optimizers here, so both sides of a comparison train with the same groups and schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn as nn

from gptlab.compat import CHECKPOINT_PREFIX, COMPILE_PREFIX, FSDP_PREFIX
from gptlab.errors import ConfigError
from gptlab.schema import Positive, Range, Say, check_fields
from gptlab.training.muon import Momentum, Muon, NsSteps


@dataclass
class OptimConfig:
    # adamw, or muon: Muon for the hidden matrices, AdamW for the rest
    name: Annotated[Literal["adamw", "muon"], Say("'adamw' or 'muon' (optim=adamw / optim=muon)")] = "adamw"
    lr: Annotated[float, Range(0.0, low_open=True)] = 1e-3
    min_lr: Annotated[float, Range(0.0)] = 1e-4  # at most lr
    weight_decay: Annotated[float, Range(0.0)] = 0.1
    betas: tuple[float, float] = (0.9, 0.99)
    eps: Annotated[float, Range(0.0, low_open=True)] = 1e-8
    warmup_steps: Annotated[int, Range(0)] = 100
    decay_steps: Positive | None = None  # cosine decay ends here; None: the trainer's max_steps
    fused: bool | None = None  # None: fused AdamW on CPU and CUDA, foreach elsewhere
    # Muon's peak learning rate; None: lr (min_lr / lr scales both alike)
    muon_lr: Annotated[float | None, Range(0.0, low_open=True)] = None
    momentum: Momentum = 0.95  # Muon's (Nesterov) momentum
    ns_steps: NsSteps = 5  # Muon's Newton-Schulz iterations

    def __post_init__(self) -> None:
        check_fields(self, "optim.")
        self.betas = tuple(self.betas)
        if self.min_lr > self.lr:
            raise ConfigError(f"optim.lr={self.lr}, optim.min_lr={self.min_lr}: need 0 <= min_lr <= lr, lr > 0")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas={list(self.betas)}: need two values in [0, 1)")


def lr_factor(step: int, warmup: int, decay_steps: int | None, min_ratio: float, time_used: float = 0.0) -> float:
    """Linear warmup to 1, then cosine decay to `min_ratio`, then flat. The decay's progress is the
    larger of the steps' ((step - warmup) / (decay_steps - warmup)) and `time_used`, the fraction of a
    time budget spent: the decay ends when the run does, at its last step or its last second."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = time_used
    if decay_steps is not None:
        progress = max(progress, (step - warmup) / max(1, decay_steps - warmup))
    if progress >= 1.0:
        return min_ratio
    return min_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_ratio)


def plain_name(name: str) -> str:
    """A parameter's name without the wrappers FSDP, activation checkpointing or torch.compile insert."""
    for wrapper in (FSDP_PREFIX, CHECKPOINT_PREFIX, COMPILE_PREFIX):
        name = name.replace(wrapper, "")
    return name


@dataclass
class ParamRoles:
    """Which parameters are matrices (decayed) and which are hidden-layer matrices (Muon's share),
    decided on the whole model, before FSDP turns them into flat 1-D shards."""

    matrices: set[str]
    hidden: set[str]

    @classmethod
    def of(cls, model: nn.Module) -> ParamRoles:
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        head = getattr(model, "lm_head", None)
        return cls(
            matrices={n for n, p in model.named_parameters() if p.dim() >= 2},
            hidden={
                n for n, p in model.named_parameters()
                if p.dim() == 2 and id(p) not in embeddings and (head is None or p is not head.weight)
            },
        )


def param_groups(named: list[tuple[str, nn.Parameter]], roles: ParamRoles, cfg: OptimConfig) -> list[dict]:
    """Weight decay on matrices (Linear weights, embeddings) only, not on biases and norms; with Muon,
    the hidden matrices form a last group, so that group 0 keeps optim.lr whichever the optimizer."""
    named = [(plain_name(n), p) for n, p in named if p.requires_grad]
    hidden = roles.hidden if cfg.name == "muon" else set()
    groups = [
        {"params": [p for n, p in named if n in roles.matrices and n not in hidden],
         "weight_decay": cfg.weight_decay, "name": "decay"},
        {"params": [p for n, p in named if n not in roles.matrices], "weight_decay": 0.0, "name": "no_decay"},
    ]
    if hidden:
        from gptlab.training.parallel import qkv_rows

        muon = [(n, p) for n, p in named if n in hidden]
        groups.append({"params": [p for _, p in muon], "weight_decay": cfg.weight_decay, "name": "muon",
                       "muon": True, "lr": cfg.muon_lr or cfg.lr, "fuse": qkv_rows([n for n, _ in muon])})
    return groups


def fused_by_default(device: torch.device, precision: str = "32-true", gradient_clip_val: float | None = None) -> bool:
    """The fused kernel makes one pass over all parameters: on the CPU its step is 3x (small models) to
    5x faster than foreach. Lightning refuses gradient clipping with a fused optimizer under mixed
    precision (it would unscale gradients itself), so there foreach it is."""
    if "mixed" in str(precision) and gradient_clip_val:
        return False
    return device.type in ("cpu", "cuda")


def build_optimizer(groups: list[dict], cfg: OptimConfig, fused: bool) -> torch.optim.Optimizer:
    if cfg.name == "muon":
        try:
            return Muon(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, momentum=cfg.momentum, ns_steps=cfg.ns_steps)
        except ValueError as e:  # e.g. FSDP's flat shards instead of matrices
            raise ConfigError(f"optim=muon: {e}; use DDP (trainer=ddp) or optim=adamw") from e
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                             **({"fused": True} if fused else {"foreach": True}))


def build_schedule(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int | None,
                   time_used: Callable[[], float] | None = None):
    """Warmup + cosine, stepped after every optimizer step (not every epoch, not every micro-batch).
    With a time budget (trainer.max_time), `time_used()` is the fraction of it spent, and the cosine
    follows whichever of the steps and the time runs out first."""
    decay_steps = cfg.decay_steps or (max_steps if max_steps is not None and max_steps > 0 else None)
    if decay_steps is None and time_used is None:
        raise ConfigError("set trainer.max_steps, optim.decay_steps or trainer.max_time: the LR schedule decays "
                          "over the run's steps or its time budget")
    ratio = cfg.min_lr / cfg.lr
    used = time_used or (lambda: 0.0)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg.warmup_steps, decay_steps, ratio, used()))
