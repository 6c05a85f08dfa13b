"""Memory of FSDP2 against DDP, and of activation checkpointing, measured on CPU processes.

1. Training state per rank (parameters + gradients + optimizer state), 2 processes with gloo: one
   AdamW step of the same GPT wrapped in DistributedDataParallel and in gptlab's FSDP2 plan
   (gptlab.training.parallel.parallelize, each Block a unit), then the bytes each rank holds in the
   three, counted from the tensors themselves (DTensor shards: their local part). Goal: FSDP2 <= 0.6x DDP.
   The peak RSS of each rank is reported too (it also holds Python, torch and the activations).
2. Activations: the bytes autograd keeps for backward (saved-tensor hooks) in one forward pass of a deep
   GPT, with `activation_checkpointing` off and on. Goal: at least 2x less with it on.

    python bench/memory.py            # 8 layers x 512 channels (~30M parameters); 24 layers for activations
    python bench/memory.py --tiny     # seconds: checks the code paths

These are memory figures, not timings: load on the machine does not change them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from _common import machine_info, machine_line, table, write_results

SIZES = {"tiny": dict(n_layer=2, n_embd=64, n_head=4, block_size=64, vocab_size=512, batch=2),
         "full": dict(n_layer=8, n_embd=512, n_head=8, block_size=256, vocab_size=8192, batch=4)}
DEEP = {"tiny": dict(n_layer=6, n_embd=64, n_head=4, block_size=64, vocab_size=512, batch=2),
        "full": dict(n_layer=24, n_embd=256, n_head=8, block_size=256, vocab_size=8192, batch=8)}


def local_bytes(tensors) -> int:
    """Bytes of distinct storages behind `tensors` (a DTensor counts its local shard)."""
    from torch.distributed.tensor import DTensor

    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if isinstance(t, DTensor) else t
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def model_of(size: dict[str, Any]):
    from gptlab.models import build_model

    torch.manual_seed(0)
    return build_model({k: v for k, v in size.items() if k != "batch"})


def state_rank(rank: int, world: int, port: int, size: dict, kinds: list[str]) -> dict[str, dict[str, Any]]:
    """{kind: figures} of one rank, for each strategy of `kinds` in turn."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel

    from gptlab.training.parallel import parallelize

    results = {}
    for kind in kinds:
        model = model_of(size)
        if kind == "ddp":
            wrapped = DistributedDataParallel(model, gradient_as_bucket_view=True)
        else:
            mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
            parallelize(model, mesh)
            wrapped = model
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        x = torch.randint(0, size["vocab_size"], (size["batch"], size["block_size"]))
        wrapped(x).float().logsumexp(-1).mean().backward()
        optimizer.step()
        params = list(model.parameters())
        states = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        results[kind] = {"params": local_bytes(params), "grads": local_bytes(p.grad for p in params),
                         "optimizer": local_bytes(states),
                         "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        dist.barrier()
    dist.destroy_process_group()
    return results


def training_state(which: str, world: int = 2) -> dict[str, Any]:
    """The ranks are processes of this script (--rank), their figures back as JSON: {"ranks": {rank:
    {strategy: figures}}}. Each strategy gets fresh processes, so that each peak RSS is its own; --tiny
    runs both in one pair of processes (its peak RSS of fsdp2 is then the larger of the two)."""
    ranks: dict[int, dict[str, Any]] = {r: {} for r in range(world)}
    for kinds in (["ddp,fsdp2"] if which == "tiny" else ["ddp", "fsdp2"]):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with tempfile.TemporaryDirectory() as tmp:
            procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--world", str(world), "--port",
                                       str(port), "--size", which, "--kind", kinds, "--out", f"{tmp}/{r}.json"])
                     for r in range(world)]
            if any(p.wait(timeout=900) for p in procs):
                raise RuntimeError(f"a rank of the {kinds} training-state measurement failed")
            for r in range(world):
                ranks[r].update(json.loads(Path(f"{tmp}/{r}.json").read_text()))
    return {"world": world, "params": model_of(SIZES[which]).num_params(), "ranks": ranks}


def saved_activation_bytes(size: dict[str, Any], checkpointing: bool) -> int:
    model = model_of(size)
    model.activation_checkpointing = checkpointing
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randint(0, size["vocab_size"], (size["batch"], size["block_size"]))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).float().logsumexp(-1).mean()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    loss.backward()  # the recomputation works
    return sum(n for ptr, n in saved.items() if ptr not in params)  # the weights are kept anyway


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small models: checks the code paths in seconds")
    p.add_argument("--out", default=None, help="results JSON (default: bench/results/memory.json)")
    p.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)  # one rank of part 1
    p.add_argument("--world", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--size", default=None, help=argparse.SUPPRESS)
    p.add_argument("--kind", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank is not None:
        result = state_rank(args.rank, args.world, args.port, SIZES[args.size], args.kind.split(","))
        Path(args.out).write_text(json.dumps(result))
        return result
    which = "tiny" if args.tiny else "full"
    info = machine_info()
    print(machine_line(info))

    state = training_state(which)
    rows, totals = [], {}
    for kind in ("ddp", "fsdp2"):
        r0 = state["ranks"][0][kind]  # (rank 1 holds the same amounts)
        totals[kind] = r0["params"] + r0["grads"] + r0["optimizer"]
        rows.append([kind, *(f"{r0[k] / 2**20:.2f}" for k in ("params", "grads", "optimizer")),
                     f"{totals[kind] / 2**20:.2f}", f"{r0['peak_rss_mb']:.0f}"])
    ratio = totals["fsdp2"] / totals["ddp"]
    print(f"\ntraining state per rank, {state['params']:,} parameters, {state['world']} processes (rank 0, MiB)")
    print(table(["strategy", "params", "grads", "optimizer", "total", "peak RSS"], rows))
    print(f"fsdp2 / ddp: {ratio:.2f}x (goal <= 0.6x)")

    off, on = (saved_activation_bytes(DEEP[which], c) for c in (False, True))
    cut = off / max(on, 1)
    print(f"\nactivations kept for backward, {DEEP[which]['n_layer']} layers: {off / 2**20:.1f} MiB without "
          f"checkpointing, {on / 2**20:.1f} MiB with: {cut:.1f}x less (goal >= 2x)")
    result = {"machine": info, "size": which, "state": state, "fsdp2_over_ddp": ratio,
              "activations": {"model": DEEP[which], "off_bytes": off, "on_bytes": on, "cut": cut}}
    path = write_results("memory", result, args.out)
    print(f"\n[bench] results: {path}")
    return result


if __name__ == "__main__":
    main()
