"""Sharded checkpoints (torch.distributed.checkpoint), as the model-parallel trainers (trainer=fsdp2,
trainer=tp) write them, and their consolidation into gptlab's single-file format.

A sharded checkpoint is a directory named like a checkpoint file (`last.ckpt/`):

    .metadata, __<rank>_0.distcp   torch.distributed.checkpoint's index and each rank's shards of
                                   {"state_dict": model, "optimizer_0": optimizer state}
    meta.pt                        everything else of the Lightning checkpoint (hyper_parameters, gptlab,
                                   global_step, loops, callbacks, ...), a plain torch.save'd dict

Every rank writes its shards into a temporary sibling directory, rank 0 adds meta.pt, and the
directory is renamed into place only when all of it is on disk: a killed run leaves the previous
checkpoint whole. (Replacing an existing directory takes two renames; between them the previous one
waits as `.old-<name>-...`.) Its model keys are the model-parallel model's: `c_attn` as `c_attn.q/k/v`
(gptlab.training.parallel), which `consolidate` fuses back.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from gptlab import checkpoint
from gptlab.errors import CheckpointError
from gptlab.files import owner_tag, remove_stale, temp_name

# what a consolidated file keeps: enough to sample, evaluate, export and start from, not to resume
KEPT = ("hyper_parameters", "gptlab", "global_step", "epoch", "pytorch-lightning_version")


def _replace_dir(tmp: Path, path: Path) -> None:
    old = None
    if path.exists() or path.is_symlink():
        old = path.parent / f".old-{path.name}-{owner_tag()}"
        os.rename(path, old)
    os.rename(tmp, path)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


def save_sharded(strategy, ckpt: dict[str, Any], filepath: str | os.PathLike) -> None:
    """Every rank's shards of the model and optimizer state, rank 0's metadata, renamed into place at once."""
    from torch.distributed.checkpoint import save

    path = Path(strategy.broadcast(str(filepath)))
    tmp = Path(strategy.broadcast(str(temp_name(path, directory=True))))  # rank 0 names it for all
    if strategy.is_global_zero:
        remove_stale(path.parent, (".tmp-*",))
        tmp.mkdir(parents=True)
    strategy.barrier()
    state = {"state_dict": ckpt.pop("state_dict")}
    state.update({f"optimizer_{i}": s for i, s in enumerate(ckpt.pop("optimizer_states", []))})
    save(state, checkpoint_id=tmp)
    if strategy.is_global_zero:
        checkpoint.save(ckpt, tmp / checkpoint.SHARDED_META)
    strategy.barrier()
    if strategy.is_global_zero:
        _replace_dir(tmp, path)
    strategy.barrier()


def fuse_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`...c_attn.q/k/v.{weight,bias}` -> `...c_attn.{weight,bias}` (rows q, then k, then v)."""
    out = {}
    for key, value in state.items():
        stem, sep, rest = key.rpartition(".c_attn.")
        if not sep or rest[:2] not in ("q.", "k.", "v."):
            out[key] = value
        elif rest.startswith("q."):
            kind = rest[2:]
            out[f"{stem}.c_attn.{kind}"] = torch.cat([state[f"{stem}.c_attn.{p}.{kind}"] for p in "qkv"])
    return out


def consolidate(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """One gptlab checkpoint file (weights and run metadata, no optimizer state) from a sharded one,
    without a process group (`python -m gptlab.sharded consolidate <dir> <file>`): sample.py, the Hugging Face export, evaluation (`train=false`) and
    `model.init_from` read it; a run resumes from the sharded directory itself."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    src = Path(src).expanduser()
    if not checkpoint.is_sharded(src):
        raise CheckpointError(f"{src} is not a sharded checkpoint (a directory with {checkpoint.SHARDED_META}, "
                              f"written by trainer=fsdp2/tp)")
    meta = checkpoint.sharded_metadata(src)
    loaded: dict[str, Any] = {}
    _load_state_dict(loaded, storage_reader=FileSystemReader(src), planner=_EmptyStateDictLoadPlanner(keys={"state_dict"}),
                     no_dist=True)
    weights = fuse_qkv({k: v for k, v in loaded["state_dict"].items() if isinstance(v, torch.Tensor)})
    model_cfg = (meta.get("hyper_parameters") or {}).get("model") or {}
    head, wte = checkpoint.MODULE_PREFIX + "lm_head.weight", checkpoint.MODULE_PREFIX + "transformer.wte.weight"
    if model_cfg.get("tie_weights", True) and head not in weights and wte in weights:
        weights[head] = weights[wte]  # one tensor for both, as the model holds it
    out = {k: meta[k] for k in KEPT if k in meta}
    out["state_dict"] = weights
    out.setdefault("gptlab", {})["consolidated_from"] = str(src.resolve())
    model, _ = checkpoint.model_from_checkpoint(out, src)  # refuse a file that would not load
    del model
    return checkpoint.save(out, dst)


def main(argv: list[str] | None = None) -> None:
    """`python -m gptlab.sharded consolidate <sharded dir> <file>`: one checkpoint file from a sharded one."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m gptlab.sharded")
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("consolidate", help="a sharded checkpoint (trainer=fsdp2/tp) -> one checkpoint file")
    cmd.add_argument("src", help="the sharded checkpoint, e.g. <run>/checkpoints/last.ckpt (a directory)")
    cmd.add_argument("dst", help="the checkpoint file to write")
    args = parser.parse_args(argv)
    try:
        out = consolidate(args.src, args.dst)
    except CheckpointError as e:
        raise SystemExit(f"Error: {e}") from None
    print(f"[gptlab] wrote {out}: sample.py, python -m gptlab.hf export and train=false read it")


if __name__ == "__main__":
    main()
