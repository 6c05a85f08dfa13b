"""Rotary position embedding (RoPE, Su et al. 2021) in the rotate-half layout of Hugging Face's Llama."""

from __future__ import annotations

import torch


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, head_dim), in float32, of the rotation of each position.

    The rotate-half layout of Hugging Face's Llama: channel i is paired with channel i + head_dim/2
    (not with its neighbour, as Meta's original code pairs them), so HF Llama's q/k weights load unpermuted.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, head_dim) by its positions' angles; cast like HF, to x's dtype."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)
