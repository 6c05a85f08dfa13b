"""The ranks of the multi-process tests of tests/test_parallel.py: rank 0 in the test's process, the
others started by torch.multiprocessing (`run_ranks`).

Each rank runs a list of jobs through train.py's `train(cfg)` in this process (LOCAL_RANK & co. in the
environment tell Lightning that the processes exist already, so it launches none); the process group
lives across the jobs. Rank 0 first runs the single-process references, before any group exists. A
LossProbe records every training step's loss, and at the end the logits of a fixed input (every rank
runs that forward: a sharded model needs all of them) or the windows every rank trained on; rank 0
writes them to <out>/results.json.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

import lightning as L
import torch
import torch.multiprocessing as mp

RECORDS: list[dict] = []  # one per finished job, in order
PROBE = "+callbacks.probe._target_=parallel_worker.LossProbe"


class LossProbe(L.Callback):
    """With `logits`, the logits of a fixed input at the end; with `windows`, the first token of every
    training window of every rank (gathered, one list per rank)."""

    def __init__(self, logits: bool = True, windows: bool = False) -> None:
        self.losses: list[float] = []
        self.logits, self.windows = logits, windows
        self.firsts: list[list[int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        if self.windows:
            self.firsts.append(batch[0][:, 0].tolist())

    def on_train_end(self, trainer, pl_module) -> None:
        record = {"losses": self.losses}
        if self.windows:
            ranks = [None] * trainer.world_size
            torch.distributed.all_gather_object(ranks, self.firsts)
            record["windows"] = ranks
        if self.logits:
            torch.manual_seed(0)
            x = torch.randint(0, pl_module.model.config.vocab_size, (2, 16))
            pl_module.model.eval()
            with torch.no_grad():
                logits = pl_module.model(x)
            pl_module.model.train()
            record.update(logits=logits.tolist(), input=x.tolist())
        RECORDS.append(record)


def run_jobs(jobs: list[tuple[str, list[str]]], out: Path) -> dict:
    from inprocess import run_train

    results = {}
    for name, overrides in jobs:
        value = run_train([*overrides, PROBE], out / name)  # a resumed run continues in its checkpoint's directory
        results[name] = {**RECORDS[-1], "val_loss": value}
    return results


def reports(out: Path) -> str:
    """What the spawned ranks left: their Python tracebacks, and the native stacks of those killed by a signal."""
    return "".join(f.read_text() for f in sorted([*out.glob("error*.txt"), *out.glob("fault*.txt")]))


def run_ranks(world: int, port: int, references: list, jobs: list, out: Path) -> None:
    """`worker` on `world` ranks: rank 0 in this process, the others spawned (one fresh Python fewer to
    import torch and Lightning). As Lightning's launcher does, a rank that fails kills this process:
    rank 0 would otherwise wait in a collective until gloo's timeout."""
    from inprocess import kept_environ

    others = [mp.get_context("spawn").Process(target=worker, args=(r, world, port, [], jobs, str(out)), daemon=True)
              for r in range(1, world)]
    for p in others:
        p.start()
    done = threading.Event()

    def watch() -> None:
        while not done.wait(1):
            failed = [p for p in others if p.exitcode not in (None, 0)]
            if failed:
                print(f"rank(s) exited with {[p.exitcode for p in failed]}; killing rank 0 (this process)\n"
                      f"{reports(out)}", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()
    try:
        with kept_environ():
            try:
                worker(0, world, port, references, jobs, str(out))
            except BaseException:
                for p in others:  # a rank that died is most often why rank 0 failed: say how it ended
                    p.join(timeout=5)
                print(f"other ranks' exit codes: {[p.exitcode for p in others]}\n{reports(out)}", file=sys.stderr,
                      flush=True)
                raise
        done.set()  # rank 0 is out of its collectives: a rank failing now fails the test, not this process
        for p in others:
            p.join(timeout=120)
        assert all(p.exitcode == 0 for p in others), [p.exitcode for p in others]
    finally:
        done.set()
        for p in others:
            p.kill()


def worker(rank: int, world: int, port: int, references: list, jobs: list, out: str) -> None:
    out = Path(out)
    if rank:  # a crash of a spawned rank (a signal, no Python traceback) leaves its native stack here
        faulthandler.enable(open(out / f"fault{rank}.txt", "w"))
    threads = torch.get_num_threads()
    # each rank its share of the cores, as Lightning's launcher gives the processes it starts: ranks that
    # each use every core spin against each other at every collective
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world))
    try:
        results = run_jobs(references, out) if rank == 0 else {}
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                          LOCAL_RANK=str(rank), NODE_RANK="0", LOCAL_WORLD_SIZE=str(world))
        results.update(run_jobs(jobs, out))
        if rank == 0:
            (out / "results.json").write_text(json.dumps(results))
    except BaseException:
        (out / f"error{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        torch.set_num_threads(threads)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
