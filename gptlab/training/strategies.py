"""Distributed strategies built from config: FSDP with the transformer Block as the wrapping unit."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from lightning.pytorch.strategies import FSDPStrategy

from gptlab.models.block import Block


def fsdp(
    sharding_strategy: str = "FULL_SHARD",
    activation_checkpointing: bool = False,
    state_dict_type: str = "full",
    cpu_offload: bool = False,
    timeout_minutes: float | None = None,
    **kwargs: Any,
) -> FSDPStrategy:
    """Lightning's FSDPStrategy sharding each transformer `Block` (and optionally recomputing its
    activations in the backward pass).

    Args:
        sharding_strategy: FULL_SHARD (parameters, gradients and optimizer state, ZeRO-3),
            SHARD_GRAD_OP (gradients and optimizer state, ZeRO-2), NO_SHARD (like DDP),
            HYBRID_SHARD (full shard within a node, replicate across nodes).
        activation_checkpointing: recompute each Block's activations in backward (less memory, ~30% slower).
        state_dict_type: "full" writes one ordinary checkpoint file (loadable by sample.py);
            "sharded" writes a directory of per-rank shards (faster for large models).
        cpu_offload: keep parameters on the CPU between uses.
        kwargs: passed on to FSDPStrategy (e.g. limit_all_gathers, process_group_backend).
    """
    if timeout_minutes is not None:
        kwargs["timeout"] = timedelta(minutes=timeout_minutes)
    return FSDPStrategy(
        auto_wrap_policy={Block},
        activation_checkpointing_policy={Block} if activation_checkpointing else None,
        sharding_strategy=sharding_strategy,
        state_dict_type=state_dict_type,
        cpu_offload=cpu_offload,
        **kwargs,
    )
