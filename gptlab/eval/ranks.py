"""Scoring under DDP: each rank scores every world_size-th item and the scores are gathered into item
order (`shard`), and every rank takes the same decision when one of them fails (`agree`), so that none
waits at a collective for a rank that left. Used by gptlab.eval.callback; imports no Lightning."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from gptlab import errors
from gptlab.errors import one_line, user_error
from gptlab.eval.metrics import Scores


def launched() -> bool:
    """Whether this process is one rank of a multi-process launch (torchrun, SLURM, or a rank Lightning
    started): there an error must wait for the others (`agree`); elsewhere it stops the run at once."""
    return int(os.environ.get("WORLD_SIZE") or 1) > 1 or int(os.environ.get("SLURM_NTASKS") or 1) > 1


def agree(error: BaseException | None, world: int) -> None:
    """The ranks' common verdict on one step: if any rank had an `error`, every rank raises, its own or
    one naming the rank that failed (as the same kind of gptlab error, so the job still ends in one line)."""
    if world > 1:
        failure = None if error is None else (type(user_error(error) or error).__name__, one_line(error))
        verdicts: list[Any] = [None] * world
        torch.distributed.all_gather_object(verdicts, failure)  # strings only: every rank can unpickle them
        failed = [(rank, v) for rank, v in enumerate(verdicts) if v is not None]
    else:
        failed = []
    if error is not None:
        raise error
    if failed:
        rank, (kind, text) = failed[0]
        cls = getattr(errors, kind, None)
        cls = cls if isinstance(cls, type) and issubclass(cls, errors.GptlabError) else RuntimeError
        raise cls(f"callbacks=eval failed on rank {rank}: {text}")


def shard(rank: int, world: int) -> Callable[[int, Callable[[list[int]], Scores]], Scores] | None:
    """The DDP split of a task's items: `gather(n, score)` scores this rank's share (`score(indices)`)
    and joins every rank's scores into item order; a share that raised stops every rank (`agree`)."""
    if world <= 1:
        return None

    def gather(n: int, score: Callable[[list[int]], Scores]) -> Scores:
        error, local = None, None
        try:
            local = score(list(range(rank, n, world)))
        except Exception as e:
            error = e
        agree(error, world)
        parts: list[Any] = [None] * world
        torch.distributed.all_gather_object(parts, local)
        out: list[Any] = [None] * n
        for r, part in enumerate(parts):
            for i, scores in zip(range(r, n, world), part):
                out[i] = scores
        return out

    return gather
