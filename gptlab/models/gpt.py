"""GPT-2 style language model in plain PyTorch.

One file, top to bottom: config, attention (with an optional key/value cache for incremental
decoding), MLP, block, model. The design is GPT-2's: token + learned position embeddings,
pre-LayerNorm residual blocks, causal multi-head self-attention, a 4x GELU MLP, a final LayerNorm
and an output head tied to the token embedding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.errors import ConfigError


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers (but see qkv_bias) and LayerNorms
    qkv_bias: bool | None = None  # bias of the query/key/value projection; None: same as `bias`
    tie_weights: bool = True  # share the output head with the token embedding (GPT-2 does)
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"model.{name}={value!r}: must be a positive integer")
        if self.n_embd % self.n_head != 0:
            raise ConfigError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}: "
                f"each head gets n_embd / n_head channels; pick e.g. "
                f"model.n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout}: must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class KVCache:
    """Preallocated keys and values of one attention layer, shape (B, n_head, block_size, head_dim)."""

    def __init__(self, batch_size: int, config: GPTConfig, device: torch.device, dtype: torch.dtype):
        shape = (batch_size, config.n_head, config.block_size, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v for positions [pos, pos + T) and return everything cached up to there."""
        end = pos + k.size(2)
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # query, key and value for all heads in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.qkv_bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        is_causal = True
        if cache is not None:
            k, v = cache.update(pos, k, v)
            if pos > 0:
                # Decoding: the new queries may look at every cached position. Only single-token steps
                # (or a prefill from position 0) are issued by gptlab.sampling, so no mask is needed.
                if T != 1:
                    raise ValueError("KV-cache decoding after the prefill takes one token at a time")
                is_causal = False
        # Flash / memory-efficient attention where the backend has it; the causal mask is implicit.
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # GPT-2 used the tanh approximation of GELU; keep it so imported weights behave identically.
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        # pre-LayerNorm: the residual stream itself is never normalised, which keeps deep stacks stable
        x = x + self.attn(self.ln_1(x), cache, pos)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            # One matrix serves as input embedding and output projection (GPT-2, "Using the Output
            # Embedding to Improve Language Models"): fewer parameters and a better bigram prior.
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer), since each block adds two
        # contributions to the residual stream whose variance would otherwise grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self, idx: torch.Tensor, cache: list[KVCache] | None = None, pos: int = 0
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids `idx` (B, T) that stand at positions [pos, pos + T)."""
        T = idx.size(1)
        if pos + T > self.config.block_size:
            raise ValueError(
                f"sequence of {pos + T} tokens exceeds block_size={self.config.block_size}; crop the context"
            )
        positions = torch.arange(pos, pos + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache[i] if cache is not None else None, pos)
        return self.lm_head(self.transformer.ln_f(x))

    def new_cache(self, batch_size: int) -> list[KVCache]:
        """Empty key/value caches for incremental decoding (see gptlab.sampling.generate)."""
        weight = self.transformer.wte.weight
        dtype = torch.get_autocast_dtype(weight.device.type) if torch.is_autocast_enabled(weight.device.type) else weight.dtype
        return [KVCache(batch_size, self.config, weight.device, dtype) for _ in self.transformer.h]

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; a tied head is counted once. `non_embedding` leaves out the position
        embedding (and the token embedding when it is not reused as the head), as nanoGPT reports."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields shared tensors once
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 L H Q T."""
        cfg = self.config
        T = seq_len or cfg.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T

    def memory_report(self) -> dict[str, float]:
        """Parameter count and the bytes the weights take at common dtypes (tied head counted once)."""
        n = self.num_params()
        return {
            "params": n,
            "fp32_mb": n * 4 / 1024**2,
            "bf16_mb": n * 2 / 1024**2,
        }
