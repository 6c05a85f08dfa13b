"""A callback for tests that run train.py in subprocesses: every rank records what it trained on.

Add it with `+callbacks.probe._target_=rank_probe.RankProbe` and PYTHONPATH=tests; each rank writes
<run dir>/probe_rank<r>.json with its rank, world size, intra-op threads, learning rates and the input
windows of every training micro-batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch


class RankProbe(L.Callback):
    def __init__(self) -> None:
        self.batches: list[list[list[int]]] = []
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(batch[0].tolist())
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_end(self, trainer, pl_module) -> None:
        record = {
            "global_rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "threads": torch.get_num_threads(),
            "initial_lr": trainer.optimizers[0].param_groups[0]["initial_lr"],
            "global_step": trainer.global_step,
            "batches": self.batches,
            "lrs": self.lrs,
        }
        out = Path(trainer.default_root_dir) / f"probe_rank{trainer.global_rank}.json"
        out.write_text(json.dumps(record))
