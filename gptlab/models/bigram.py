"""Bigram baseline: the next token depends on the current one only, through one vocab x vocab table."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from gptlab.schema import Positive, check_fields


@dataclass
class BigramConfig:
    vocab_size: Positive = 65
    block_size: Positive = 8  # only used to size training windows; the model itself looks back one token

    def __post_init__(self) -> None:
        check_fields(self, "model.")


class Bigram(nn.Module):
    def __init__(self, config: BigramConfig):
        super().__init__()
        self.config = config
        self.table = nn.Embedding(config.vocab_size, config.vocab_size)

    def forward(self, idx: torch.Tensor, cache: None = None, pos: int = 0) -> torch.Tensor:
        return self.table(idx)

    def num_params(self, non_embedding: bool = False) -> int:
        return self.table.weight.numel()

    def flops_per_token(self, seq_len: int | None = None) -> int:
        # A lookup has no matmul; count the backward's gradient scatter and the logits' softmax.
        return 6 * self.config.vocab_size
