"""FSDP2 and tensor parallelism through Lightning's ModelParallelStrategy, on a 2-D device mesh
(data_parallel x tensor_parallel):

- tensor parallel (TP) over `tensor_parallel`: in every Block the query, key and value projections and
  the MLP's first linears are split column-wise (each rank computes its own heads, its own share of
  the hidden units), the two output projections row-wise (their partial sums are all-reduced), so each
  rank holds n_head / tp query heads and n_kv_head / tp key/value heads; QK-norm's gains see the local
  heads as a DTensor sharded on the head dimension. Embeddings, the final norm and the head stay whole.
- FSDP2 (`fully_shard`) over `data_parallel`: each Block its own unit (all-gathered before its forward,
  freed after it unless `reshard_after_forward=false`), the rest one root unit; mixed precision by
  FSDP2's MixedPrecisionPolicy, optionally parameters offloaded to the CPU between uses.

`trainer=fsdp2` is the mesh (all, 1), `trainer=tp` (1, all), a 2-D run sets both sizes. The fused
query/key/value matrix `c_attn` becomes three linears (`c_attn.q/k/v`) in every model-parallel run, so
that heads split cleanly; sharded checkpoints hold those, `python -m gptlab.sharded consolidate`
fuses them back into gptlab's single-file layout (gptlab.sharded).
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from lightning.pytorch.strategies import ModelParallelStrategy

from gptlab.errors import ConfigError
from gptlab.models.gpt import GPT

TARGET = "gptlab.training.parallel.ModelParallel"
QKV_PARTS = ("q", "k", "v")


def mesh_sizes(data_parallel: int | str, tensor_parallel: int | str, world: int, per_node: int) -> tuple[int, int]:
    """(data parallel, tensor parallel) sizes whose product is the world size: "auto" is the world size
    over the other; both "auto": tensor parallel within a node, data parallel across nodes."""
    dp, tp = data_parallel, tensor_parallel
    for key, value in (("data_parallel_size", dp), ("tensor_parallel_size", tp)):
        if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"trainer.strategy.{key}={value!r}: a positive integer or auto")
    if tp == "auto":
        tp = world // dp if dp != "auto" else per_node
    if dp == "auto":
        dp = world // tp
    if dp * tp != world:
        raise ConfigError(
            f"trainer.strategy.data_parallel_size={data_parallel} x tensor_parallel_size={tensor_parallel} must "
            f"multiply to the number of processes, {world} (trainer.devices x trainer.num_nodes)"
        )
    return dp, tp


def check_plan(trainer_cfg: dict[str, Any], model_cfg: dict[str, Any]) -> None:
    """Refuse, before any process starts, a mesh that does not fit the processes or a tensor-parallel
    size that does not split the model's heads."""
    strategy = trainer_cfg.get("strategy")
    if not isinstance(strategy, dict) or strategy.get("_target_") != TARGET:
        return
    devices, nodes = trainer_cfg.get("devices"), trainer_cfg.get("num_nodes") or 1
    if isinstance(devices, int) and devices > 0:
        per_node = devices
    elif trainer_cfg.get("accelerator") in ("gpu", "cuda") and torch.cuda.is_available():
        per_node = torch.cuda.device_count()
    else:
        return  # Lightning reports devices it cannot find
    _, tp = mesh_sizes(strategy.get("data_parallel_size", "auto"), strategy.get("tensor_parallel_size", 1),
                       per_node * nodes, per_node)
    if tp == 1:
        return
    if model_cfg.get("arch", "gpt") != "gpt":
        raise ConfigError(f"tensor parallelism (tensor_parallel_size={tp}) splits attention heads; "
                          f"model.arch={model_cfg.get('arch')} has none: use trainer=fsdp2 or trainer=ddp")
    heads = model_cfg.get("n_head")
    kv_heads = model_cfg.get("n_kv_head") or heads
    for key, value in (("n_head", heads), ("n_kv_head", kv_heads)):
        if value % tp:
            raise ConfigError(f"model.{key}={value} is not divisible by tensor_parallel_size={tp}: each rank "
                              f"computes {key} / {tp} heads")


class QKV(nn.Module):
    """The query, key and value projections as three linears (rows of the fused `c_attn`), so that
    column-wise sharding gives each rank whole heads of each; their outputs concatenated as `c_attn`'s."""

    def __init__(self, fused: nn.Linear, sizes: tuple[int, int, int]):
        super().__init__()
        weights = fused.weight.detach().split(sizes)
        biases = fused.bias.detach().split(sizes) if fused.bias is not None else (None,) * 3
        for name, w, b in zip(QKV_PARTS, weights, biases):
            linear = nn.Linear(w.size(1), w.size(0), bias=b is not None, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                linear.weight.copy_(w)
                if b is not None:
                    linear.bias.copy_(b)
            setattr(self, name, linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def split_qkv(model: GPT) -> None:
    for block in model.transformer.h:
        attn = block.attn
        kv = attn.n_kv_head * attn.head_dim
        attn.c_attn = QKV(attn.c_attn, (attn.n_head * attn.head_dim, kv, kv))


def qkv_rows(names: list[str]) -> list[list[int]]:
    """Indices (into `names`) of the q, k and v weights that are rows of one `c_attn` matrix."""
    index = {n: i for i, n in enumerate(names)}
    groups = []
    for n in names:
        if n.endswith(".c_attn.q.weight"):
            stem = n[: -len("q.weight")]
            groups.append([index[stem + f"{part}.weight"] for part in QKV_PARTS])
    return groups


def tensor_parallel(model: GPT, mesh) -> None:
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel, SequenceParallel,
                                                   parallelize_module)

    tp = mesh.size()
    for block in model.transformer.h:
        plan = {f"attn.c_attn.{part}": ColwiseParallel() for part in QKV_PARTS}
        plan.update({"attn.c_proj": RowwiseParallel(), "mlp.c_fc": ColwiseParallel(), "mlp.c_proj": RowwiseParallel()})
        if hasattr(block.mlp, "c_gate"):
            plan["mlp.c_gate"] = ColwiseParallel()
        if block.attn.qk_norm:  # (B, heads, T, head_dim): the gains see the local heads, their grads summed
            plan.update({f"attn.{n}": SequenceParallel(sequence_dim=1, use_local_output=True) for n in ("q_norm", "k_norm")})
        parallelize_module(block, mesh, plan)
        block.attn.n_head //= tp
        block.attn.n_kv_head //= tp


def parallelize(model: nn.Module, mesh, reshard_after_forward: bool = True, cpu_offload: bool = False,
                param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype | None = None,
                compile_backend: str | None = None) -> None:
    """The plan above, in place, on a mesh with dimensions "data_parallel" and "tensor_parallel"."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    blocks = list(model.transformer.h) if isinstance(model, GPT) else []
    if isinstance(model, GPT):
        split_qkv(model)
        if mesh["tensor_parallel"].size() > 1:
            tensor_parallel(model, mesh["tensor_parallel"])
    for block in blocks if compile_backend else ():
        block.compile(backend=compile_backend)  # per Block: FSDP2's hooks stay between compiled graphs
    shard = dict(mesh=mesh["data_parallel"], mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
                 offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **shard)
    fully_shard(model, **shard)
    if isinstance(model, GPT) and model.config.tie_weights:  # one sharded matrix for both again
        model.lm_head.weight = model.transformer.wte.weight


class ModelParallel(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy with gptlab's plan (`parallelize`, called from the
    LightningModule's configure_model), sizes resolved against the world size, and sharded checkpoints
    written into a temporary directory renamed into place (gptlab.sharded).

    Args:
        data_parallel_size, tensor_parallel_size: the mesh; "auto" is the world size over the other.
        reshard_after_forward: free each Block's gathered parameters after its forward (gathered again
            for backward: less memory, more communication); false keeps them until backward (ZeRO-2-like).
        cpu_offload: keep the parameter shards, gradients and optimizer step on the CPU.
        param_dtype: FSDP2 mixed precision, e.g. bfloat16: the gathered parameters and the compute in
            that dtype, the sharded master weights and optimizer state in float32.
        reduce_dtype: the dtype of gradient reduction under param_dtype (float32: exact sums).
    """

    def __init__(self, data_parallel_size: int | str = "auto", tensor_parallel_size: int | str = 1,
                 reshard_after_forward: bool = True, cpu_offload: bool = False, param_dtype: str | None = None,
                 reduce_dtype: str | None = "float32", process_group_backend: str | None = None,
                 timeout_minutes: float | None = None):
        kwargs = {"timeout": timedelta(minutes=timeout_minutes)} if timeout_minutes is not None else {}
        super().__init__(data_parallel_size, tensor_parallel_size, save_distributed_checkpoint=True,
                         process_group_backend=process_group_backend, **kwargs)
        self._requested = (data_parallel_size, tensor_parallel_size)
        self.reshard_after_forward, self.cpu_offload = reshard_after_forward, cpu_offload
        self.param_dtype = getattr(torch, param_dtype) if param_dtype else None
        self.reduce_dtype = getattr(torch, reduce_dtype) if reduce_dtype and param_dtype else None

    def setup_environment(self) -> None:
        self._data_parallel_size, self._tensor_parallel_size = mesh_sizes(
            *self._requested, self.num_nodes * self.num_processes, self.num_processes)
        super().setup_environment()

    def parallelize(self, model: nn.Module, compile_backend: str | None = None) -> None:
        parallelize(model, self.device_mesh, reshard_after_forward=self.reshard_after_forward,
                    cpu_offload=self.cpu_offload, param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype,
                    compile_backend=compile_backend)

    @property
    def data_parallel(self) -> tuple[int, int]:
        """(rank, size) along the data-parallel dimension: ranks of one TP group read the same batches."""
        kwargs = self.distributed_sampler_kwargs
        return kwargs["rank"], kwargs["num_replicas"]

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        from gptlab.sharded import save_sharded

        save_sharded(self, checkpoint, filepath)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        return super().load_checkpoint(checkpoint_path, weights_only=True)


def shard_copies(t: torch.Tensor) -> int:
    """How many ranks hold the same values as this rank's part of `t`: for a DTensor (FSDP2 x TP, any
    mesh) the ranks outside its mesh and along its replicated dimensions; a plain tensor is on every rank.
    A sum over all ranks of (this rank's part) / copies counts every value once."""
    from torch.distributed.tensor import DTensor

    world = dist.get_world_size()
    if not isinstance(t, DTensor):
        return world
    copies = world // t.device_mesh.size()  # ranks outside the mesh hold the same shards
    return copies * math.prod(t.device_mesh.size(i) for i, p in enumerate(t.placements) if p.is_replicate())


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def global_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of gradients that are DTensors on different meshes (FSDP2 x TP): the squared norm of
    each local shard, divided by the number of ranks holding the same shard, summed in one all-reduce."""
    total = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else "cpu")
    for g in grads:
        total += local_part(g).float().square().sum() / shard_copies(g)
    dist.all_reduce(total)
    return total.sqrt()


def clip_grads_with_norm(grads: list[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
    """torch's clip_grads_with_norm_ for DTensor gradients on different meshes."""
    from torch.distributed.tensor import DTensor

    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        (g.to_local() if isinstance(g, DTensor) else g).mul_(coef.to(g.dtype))
