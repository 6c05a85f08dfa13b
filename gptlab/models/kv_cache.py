"""The key/value cache of one attention layer, for incremental decoding (gptlab.sampling.generate)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from gptlab.models.gpt import GPTConfig


class KVCache:
    """Keys and values of one attention layer, shape (B, n_kv_head, block_size, head_dim).

    A ring buffer: position p lives in slot p % block_size. Learned positions never get past
    block_size (gptlab.sampling rebuilds the cache first). RoPE keys carry their position in their
    rotation and a single new query may look at all of them, so their order does not matter: once
    full, each new token overwrites the oldest and the window slides by one, at no cost.
    """

    def __init__(self, batch_size: int, config: GPTConfig, device: torch.device, dtype: torch.dtype,
                 n_kv_head: int | None = None):
        # n_kv_head: the layer's own heads (fewer than the config's under tensor parallelism)
        shape = (batch_size, n_kv_head or config.n_kv_head, config.block_size, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v of positions [pos, pos + T) and return every cached one (at most block_size)."""
        T, size = k.size(2), self.k.size(2)
        if pos == 0:  # prefill
            self.k[:, :, :T], self.v[:, :, :T] = k, v
            return self.k[:, :, :T], self.v[:, :, :T]
        if T != 1:
            raise ValueError("KV-cache decoding after the prefill takes one token at a time")
        slot = pos % size  # a slice, not an index: under torch.compile an integer index pins pos's value
        self.k[:, :, slot : slot + 1], self.v[:, :, slot : slot + 1] = k, v
        n = min(pos + 1, size)
        return self.k[:, :, :n], self.v[:, :, :n]
