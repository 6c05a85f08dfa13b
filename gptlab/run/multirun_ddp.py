"""Workarounds that let Lightning's DDP launcher run inside a Hydra multirun.

Upstream: Lightning starts ranks 1..N-1 by re-running the script with `sys.argv` plus
`hydra.run.dir=...` (lightning.fabric.strategies.launchers.subprocess_script._hydra_subprocess_cmd);
in a multirun that command line is the whole sweep, so every rank would start a sweep of its own.
See https://github.com/facebookresearch/hydra/issues/2070,
https://github.com/Lightning-AI/pytorch-lightning/issues/11300 and the unmerged fix
https://github.com/Lightning-AI/pytorch-lightning/pull/18175. Remove this module once Lightning starts
multirun ranks on the job's own config.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from gptlab.compat import rank_command, set_rank_command


def install_multirun_ddp_fix(script: Path) -> None:
    """Start each DDP rank of a multirun job on that one job's saved config instead of the sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    original = getattr(rank_command(), "__wrapped__", rank_command())

    def command(local_rank: int):
        hc = HydraConfig.get()
        saved = Path(hc.runtime.output_dir) / str(hc.output_subdir) / "config.yaml"
        if hc.mode != RunMode.MULTIRUN or hc.output_subdir is None or not saved.is_file():
            return original(local_rank)
        cmd = [
            sys.executable,
            str(script),
            "-cp",
            str(saved.parent),
            "-cn",
            "config",
            f'hydra.run.dir="{hc.runtime.output_dir}"',
            "hydra.output_subdir=null",
            f"hydra.job.name={hc.job.name}_rank{local_rank}",
        ]
        return cmd, hc.runtime.cwd

    command.__wrapped__ = original
    set_rank_command(command)


# what Lightning's subprocess launcher sets in the launching process's environment
_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextlib.contextmanager
def distributed_job() -> Iterator[None]:
    """Leave no distributed state behind a job that launched its own DDP ranks.

    A Hydra multirun runs its jobs one after another in one process. Lightning's launcher leaves the
    process group and the rank variables (LOCAL_RANK, MASTER_PORT, ...) of job 1 behind, so job 2
    would take itself for an externally launched rank and wait for peers that have exited. Processes
    started by torchrun or SLURM keep their process group: every rank runs the same jobs and reuses it.
    """
    saved = {k: os.environ.get(k) for k in _DDP_ENV}
    try:
        yield
    finally:
        # the launcher sets LOCAL_RANK in the process that starts the other ranks
        if saved["LOCAL_RANK"] is None and "LOCAL_RANK" in os.environ:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
