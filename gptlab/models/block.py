"""The transformer block of gptlab/models/gpt.py, top to bottom: the block (a pre-norm residual pair),
causal self-attention (multi-, grouped- or multi-query heads; RoPE and a QK norm by switch), the MLP
(GELU, SwiGLU or squared ReLU) and the norm both use (LayerNorm or RMSNorm)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.models.rope import apply_rope

if TYPE_CHECKING:
    from gptlab.models.gpt import GPTConfig


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache=None, pos=0, mask=None, attention=None) -> torch.Tensor:
        # pre-norm: the residual stream itself is never normalised, which keeps deep stacks stable
        x = x + self.attn(self.ln_1(x), rope, cache, pos, mask, attention)
        return x + self.mlp(self.ln_2(x))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.dropout = config.dropout
        # queries for all heads, keys and values for the n_kv_head heads, in one matmul
        kv = config.n_kv_head * config.head_dim
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * kv, bias=config.qkv_bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        if config.qk_norm:
            self.q_norm = nn.RMSNorm(config.head_dim, eps=config.layer_norm_eps)
            self.k_norm = nn.RMSNorm(config.head_dim, eps=config.layer_norm_eps)
        self.qk_norm = config.qk_norm
        self.resid_dropout = nn.Dropout(config.dropout)

    def qkv(self, x, rope=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, n_head, T, head_dim), keys and values (B, n_kv_head, T, head_dim) of `x`,
        normalised and rotated as attention sees them."""
        B, T, _ = x.size()
        # this rank's heads: all of them, or n_head / tp under tensor parallelism (gptlab.training.parallel)
        C, kv = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.c_attn(x).split((C, kv, kv), dim=2)
        # (B, T, heads * head_dim) -> (B, heads, T, head_dim)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def forward(self, x, rope=None, cache=None, pos=0, mask=None, attention=None) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.qkv(x, rope)
        is_causal = mask is None
        if cache is not None:
            k, v = cache.update(pos, k, v)
            if pos > 0:  # decoding after the prefill: the new token may look at every cached position
                is_causal = False  # (a branch, not `is_causal and pos == 0`: under torch.compile pos is symbolic)
        if attention is None:
            # Flash / memory-efficient attention where the backend has it; the causal mask is implicit
            # (is_causal) unless a sliding-window mask is given
            gqa = {"enable_gqa": True} if self.n_kv_head != self.n_head else {}
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal, **gqa
            )
        else:
            y = self._explicit(q, k, v, is_causal, mask, attention)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)  # (this rank's heads)
        return self.resid_dropout(self.c_proj(y))

    @staticmethod
    def _explicit(q, k, v, is_causal, mask, attention: list) -> torch.Tensor:
        """SDPA's math written out (no dropout), keeping the probabilities (B, n_head, T, S) for pictures."""
        rep = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # SDPA's enable_gqa grouping
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        T, S = q.size(2), k.size(2)
        if mask is None and is_causal:
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1)
        attention.append(probs)
        return probs @ v


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind = config.mlp
        self.c_fc = nn.Linear(config.n_embd, config.mlp_hidden, bias=config.bias)
        if config.mlp == "swiglu":  # SiLU(x W_gate) * (x W_fc): the gate of Llama's MLP
            self.c_gate = nn.Linear(config.n_embd, config.mlp_hidden, bias=config.bias)
        elif config.mlp == "gelu":  # GPT-2's tanh approximation, so imported weights behave identically
            self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            h = F.silu(self.c_gate(x)) * self.c_fc(x)
        elif self.kind == "relu2":  # squared ReLU (Primer; modded-nanogpt)
            h = F.relu(self.c_fc(x)).square()
        else:
            h = self.gelu(self.c_fc(x))
        return self.dropout(self.c_proj(h))


def make_norm(config: GPTConfig, dim: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=config.layer_norm_eps)
    return nn.LayerNorm(dim, eps=config.layer_norm_eps, bias=config.bias)
