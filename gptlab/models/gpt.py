"""GPT language model in plain PyTorch: GPT-2 by default, later designs by config switch.

Top to bottom: the config, then the model; its transformer block (attention, MLP, norm) is in
block.py, the key/value cache for incremental decoding in kv_cache.py, the rotary embedding in rope.py.
The defaults are GPT-2: token + learned position embeddings, pre-LayerNorm residual blocks, causal
multi-head self-attention, a 4x GELU MLP, a final LayerNorm and an output head tied to the token
embedding. Each switch below swaps in one part of a later model; Llama is
`pos=rope norm=rmsnorm mlp=swiglu bias=false` (Llama 3 adds `n_kv_head`):

    pos       learned | rope          rotary position embedding (base `rope_theta`) on q and k
    norm      layernorm | rmsnorm     for the blocks and the final norm
    mlp       gelu | swiglu | relu2   hidden width `mlp_hidden`
    qk_norm   RMSNorm on queries and keys, per head, before RoPE (OLMo 2, Qwen 3)
    n_kv_head fewer key/value heads than query heads: grouped-query attention (1: multi-query)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn as nn
import torch.utils.checkpoint

from gptlab.errors import ConfigError
from gptlab.models.block import Block, make_norm
from gptlab.models.kv_cache import KVCache
from gptlab.models.rope import rope_angles
from gptlab.schema import Positive, Range, check_fields


@dataclass
class GPTConfig:
    vocab_size: Positive = 50257
    block_size: Positive = 1024
    n_layer: Positive = 12
    n_head: Positive = 12
    n_embd: Positive = 768
    dropout: Annotated[float, Range(0.0, 1.0)] = 0.0
    bias: bool = True  # biases in Linear layers (but see qkv_bias) and LayerNorms (RMSNorm has none)
    qkv_bias: bool | None = None  # bias of the query/key/value projection; None: same as `bias`
    tie_weights: bool = True  # share the output head with the token embedding (GPT-2 does)
    layer_norm_eps: Annotated[float, Range(0.0, low_open=True)] = 1e-5  # epsilon of every norm, LayerNorm or RMSNorm
    pos: Literal["learned", "rope"] = "learned"  # learned: GPT-2's position embedding table; rope: rotary embedding
    rope_theta: Annotated[float, Range(0.0, low_open=True)] = 10000.0  # RoPE's base (Llama 2: 1e4, Llama 3: 5e5)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    mlp: Literal["gelu", "swiglu", "relu2"] = "gelu"
    mlp_hidden: Positive | None = None  # None: 4 n_embd; for swiglu 8/3 n_embd rounded up to a multiple of 32
    qk_norm: bool = False
    n_kv_head: Positive | None = None  # None: n_head (multi-head attention)

    def __post_init__(self) -> None:
        check_fields(self, "model.")
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.mlp_hidden is None:
            # swiglu has three matrices: 8/3 of the width keeps the parameters of a 4x two-matrix MLP
            self.mlp_hidden = 32 * math.ceil(8 * self.n_embd / 3 / 32) if self.mlp == "swiglu" else 4 * self.n_embd
        if self.n_embd % self.n_head != 0:
            raise ConfigError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}: "
                f"each head gets n_embd / n_head channels; pick e.g. "
                f"model.n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}"
            )
        if self.n_head % self.n_kv_head != 0:
            raise ConfigError(
                f"model.n_kv_head={self.n_kv_head} does not divide model.n_head={self.n_head}: each key/value "
                f"head serves n_head / n_kv_head query heads"
            )
        if self.pos == "rope" and self.head_dim % 2:
            raise ConfigError(f"model.pos=rope needs an even head size, not n_embd / n_head = {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def variant_options(self) -> list[str]:
        """The switches set away from GPT-2's, as `model.key=value` (for exporters that speak GPT-2 only)."""
        gpt2 = {"pos": "learned", "norm": "layernorm", "mlp": "gelu", "qk_norm": False,
                "n_kv_head": self.n_head, "mlp_hidden": 4 * self.n_embd}
        return [f"model.{k}={getattr(self, k)}" for k, v in gpt2.items() if getattr(self, k) != v]


class GPT(nn.Module):
    # recompute each Block's activations in backward instead of keeping them (a run switch, not the shape)
    activation_checkpointing: bool = False

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        layers = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.pos == "learned":
            layers["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        else:
            # Non-persistent buffers: not in the state_dict, but they follow .to(device / dtype).
            cos, sin = rope_angles(torch.arange(config.block_size), config.head_dim, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        layers.update(
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config, config.n_embd),
        )
        self.transformer = nn.ModuleDict(layers)
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

    @property
    def sliding_cache(self) -> bool:
        """Whether a full KV cache may slide (RoPE) rather than be rebuilt (learned positions)."""
        return self.config.pos == "rope"

    def forward(self, idx, cache=None, pos=0, window=None, attention=None) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids `idx` (B, T) that stand at positions [pos, pos + T).

        `window`: each token attends to the last `window` tokens only (itself included), which is what
        decoding with a sliding cache computes; with RoPE the sequence may then be longer than block_size.
        `attention`: a list that receives each layer's attention probabilities (B, n_head, T, T), from
        an explicit softmax instead of scaled_dot_product_attention (for pictures; slower).
        """
        T, block = idx.size(1), self.config.block_size
        learned = self.config.pos == "learned"
        if (pos + T > block and learned) or (T > block and not learned and window is None):
            raise ValueError(f"sequence of {pos + T} tokens exceeds block_size={block}; crop the context")
        x = self.transformer.wte(idx)
        rope = None if learned else self._rope(pos, T)
        if learned:
            x = x + self.transformer.wpe(torch.arange(pos, pos + T, dtype=torch.long, device=idx.device))
        mask = None
        if window is not None:
            if cache is not None:
                raise ValueError("window= is for full sequences, not for KV-cache decoding")
            i = torch.arange(T, device=idx.device)
            mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
        x = self.transformer.drop(x)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, block_ in enumerate(self.transformer.h):
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block_, x, rope, None, pos, mask, attention, use_reentrant=False)
            else:
                x = block_(x, rope, cache[i] if cache is not None else None, pos, mask, attention)
        return self.lm_head(self.transformer.ln_f(x))

    def _rope(self, pos: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        if pos + T <= self.rope_cos.size(0):
            return self.rope_cos[pos : pos + T], self.rope_sin[pos : pos + T]
        # decoding past block_size: positions keep growing (only distances matter to RoPE)
        positions = torch.arange(pos, pos + T, device=self.rope_cos.device)
        cos, sin = rope_angles(positions, self.config.head_dim, self.config.rope_theta)
        return cos.to(self.rope_cos.dtype), sin.to(self.rope_sin.dtype)

    def new_cache(self, batch_size: int) -> list[KVCache]:
        """Empty key/value caches for incremental decoding (see gptlab.sampling.generate)."""
        weight = self.transformer.wte.weight
        dtype = torch.get_autocast_dtype(weight.device.type) if torch.is_autocast_enabled(weight.device.type) else weight.dtype
        return [KVCache(batch_size, self.config, weight.device, dtype, b.attn.n_kv_head) for b in self.transformer.h]

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; a tied head is counted once. `non_embedding` leaves out the embedding
        lookups (which cost no FLOPs): the position table, and the token table unless it is the head."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields shared tensors once
        if non_embedding:
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_weights:
                n -= self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 L H Q T.

        N holds every matmul's weights, so grouped-query attention (smaller c_attn) and swiglu (three
        matrices) are counted as they are; the attention term has one score per query head.
        """
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
