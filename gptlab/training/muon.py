"""Muon for the hidden weight matrices, AdamW for everything else, as one optimizer.

Muon (Keller Jordan, 2024; https://kellerjordan.github.io/posts/muon/) keeps SGD momentum for each
weight matrix and replaces the update by the nearest semi-orthogonal matrix, computed with a few
Newton-Schulz iterations. Embeddings, the output head, biases and LayerNorm gains are not hidden
matrices and keep AdamW. On the small character models of conf/experiment/ it reaches a given val
loss in fewer steps than AdamW (bench/quality.py). Its cost: ~5 small matrix products per matrix and step.

Why not `torch.optim.Muon`: Lightning's automatic optimization drives one optimizer, and torch's Muon
takes only matrices; it also runs Newton-Schulz in bfloat16, which CPUs without native bf16 emulate
~20x slower than float32. Here the iteration runs in bfloat16 on CUDA and in float32 elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Annotated, Any

import torch

from gptlab.schema import Positive, Range, check_args

# the quintic iteration's coefficients, tuned for a steep slope at zero (Muon's reference implementation)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
Momentum = Annotated[float, Range(0.0, 1.0)]
NsSteps = Positive


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T for g = U S V^T, by Newton-Schulz iteration (singular values end in ~[0.7, 1.2])."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    transposed = x.size(0) > x.size(1)
    if transposed:  # iterate on the short side: the Gram matrix x x^T is then the small one
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1: inside the basin
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if transposed else x).to(g.dtype)


def is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def orthogonalize_local(matrices: list[list[torch.Tensor]], steps: int) -> list[list[torch.Tensor]]:
    """Each matrix (a list of row blocks) orthogonalised whole, returned in the same blocks."""
    out = []
    for blocks in matrices:
        full = orthogonalize(torch.cat(blocks) if len(blocks) > 1 else blocks[0], steps)
        out.append(list(full.split([b.size(0) for b in blocks])))
    return out


def orthogonalize_sharded(matrices: list[list[torch.Tensor]], steps: int) -> list[list[torch.Tensor]]:
    """orthogonalize_local for DTensors (FSDP2, tensor parallel): each matrix gathered whole once, the
    Newton-Schulz work spread over the ranks (rank r takes matrices r, r + W, ...) and each result
    broadcast from its rank; every rank then keeps its own shard. The same updates as on one device."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate

    world, rank = dist.get_world_size(), dist.get_rank()
    results, pending = [], []
    for j, blocks in enumerate(matrices):
        full = torch.cat([b.full_tensor() if is_dtensor(b) else b for b in blocks])
        owner = j % world
        # contiguous: the broadcast sends the owner's memory as it lies (a transposed result would arrive scrambled)
        full = orthogonalize(full, steps).contiguous() if owner == rank else torch.empty_like(full)
        pending.append(dist.broadcast(full, src=owner, async_op=True))
        results.append(full)
    for work in pending:
        work.wait()
    out = []
    for blocks, full in zip(matrices, results):
        parts = full.split([b.size(0) for b in blocks])
        out.append([DTensor.from_local(part, b.device_mesh, [Replicate()] * b.device_mesh.ndim, run_check=False)
                    .redistribute(b.device_mesh, b.placements) if is_dtensor(b) else part
                    for b, part in zip(blocks, parts)])
    return out


class Muon(torch.optim.Optimizer):
    """Parameter groups with `muon=True` get Muon, the others AdamW; all share `lr` and `weight_decay`
    semantics, so one LR schedule drives both.

    Muon's update is scaled by 0.2 * sqrt(max(rows, cols)), which gives it the RMS of a typical AdamW
    update (Moonshot AI, "Muon is scalable for LLM training", 2025): the AdamW learning rate and weight
    decay carry over. Weight decay is decoupled, as in AdamW.
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: Momentum = 0.95,
        nesterov: bool = True,
        ns_steps: NsSteps = 5,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
    ):
        check_args(Muon, {"momentum": momentum, "ns_steps": ns_steps})  # ConfigError, a ValueError
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, betas=tuple(betas), eps=eps, muon=False, fuse=[])
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["muon"]:
                for p in group["params"]:
                    if p.dim() != 2:
                        raise ValueError(
                            f"Muon updates whole weight matrices; got a parameter of shape {tuple(p.shape)} "
                            f"(biases, gains and sharded (FSDP) parameters cannot use it)"
                        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("Muon does not support sparse gradients")
            if group["muon"]:
                self._muon_step(group)
            else:
                for p in params:
                    self._adamw_update(p, self.state[p], group)
        return loss

    def _muon_step(self, group: dict) -> None:
        """Each matrix's momentum, orthogonalised whole. A matrix is one parameter, or several stacked
        by rows (`group["fuse"]`: the q, k and v linears of a model-parallel run are one `c_attn`)."""
        params = group["params"]
        fused = [list(rows) for rows in group.get("fuse", ())]
        alone = set(range(len(params))) - {i for rows in fused for i in rows}
        matrices = [rows for rows in [[i] for i in sorted(alone)] + fused if all(params[i].grad is not None for i in rows)]
        updates = {i: self._momentum(params[i], self.state[params[i]], group) for rows in matrices for i in rows}
        ortho = orthogonalize_sharded if any(is_dtensor(u) for u in updates.values()) else orthogonalize_local
        lr, wd = group["lr"], group["weight_decay"]
        for rows, new in zip(matrices, ortho([[updates[i] for i in rows] for rows in matrices], group["ns_steps"])):
            scale = 0.2 * math.sqrt(max(sum(params[i].shape[0] for i in rows), params[rows[0]].shape[1]))
            for i, u in zip(rows, new):
                params[i].mul_(1 - lr * wd)
                params[i].add_(u, alpha=-lr * scale)

    @staticmethod
    def _momentum(p: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf, momentum = state["momentum_buffer"], group["momentum"]
        buf.lerp_(p.grad, 1 - momentum)
        return p.grad.lerp(buf, momentum) if group["nesterov"] else buf

    @staticmethod
    def _adamw_update(p: torch.Tensor, state: dict, group: dict) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        if not state:
            # a Python int, not a tensor: reading a CUDA tensor back for the bias correction would
            # synchronise with the GPU once per parameter and step
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        (beta1, beta2), grad = group["betas"], p.grad
        state["step"] += 1
        step = state["step"]
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(group["eps"])
        p.mul_(1 - lr * wd)
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**step))
