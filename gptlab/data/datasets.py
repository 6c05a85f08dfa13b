"""Training and validation windows over a memory-mapped token array.

Training data is an endless stream of batches in which batch number k is a pure function of
(seed, rank, k). That one property gives everything step-based training wants:
- reproducible under a seed, and different on every rank (the rank is part of the seed);
- different across dataloader workers: worker w of W produces batches k = w, w + W, ... and the
  DataLoader interleaves them back into the order 0, 1, 2, ... whatever the number of workers;
- exact resume: the only state is the index of the next batch, which travels in the checkpoint.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from gptlab.schema import check


def _windows(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    # One gather for the batch: rows of block_size + 1 tokens, inputs and targets shifted by one.
    rows = tokens[starts[:, None] + np.arange(block_size + 1)].astype(np.int64)
    rows = torch.from_numpy(rows)
    return rows[:, :-1], rows[:, 1:]


Sampler = Literal["random", "sliding"]


class TrainBatches(IterableDataset):
    """Endless batches of windows: `random` start offsets (nanoGPT) or a `sliding` window with `stride`
    (the book's GPTDatasetV1), the latter visited in a fresh permutation every pass over the data."""

    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        sampler: Sampler = "random",
        stride: int | None = None,
    ):
        check("data.sampler", sampler, Sampler)
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = start
        self.sampler = sampler
        self.n_starts = len(tokens) - block_size  # valid start offsets: [0, n_starts)
        self.stride = stride or block_size
        if self.n_starts < 1:
            raise ValueError(f"{len(tokens)} training tokens cannot fill one window of {block_size} + 1")

    def starts(self, k: int) -> np.ndarray:
        """Start offsets of batch k on this rank."""
        if self.sampler == "random":
            rng = np.random.default_rng([self.seed, self.rank, k])
            return rng.integers(0, self.n_starts, size=self.batch_size)
        # sliding: every pass ("epoch") over the windows is a permutation shared by all ranks, each
        # rank taking its own interleaved share of every global batch
        offsets = np.arange(0, self.n_starts, self.stride)
        global_batch = self.batch_size * self.world_size
        per_epoch = max(1, len(offsets) // global_batch)
        epoch, j = divmod(k, per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(offsets))
        picks = order[(j * global_batch + self.rank + np.arange(self.batch_size) * self.world_size) % len(offsets)]
        return offsets[picks]

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        x, y = _windows(self.tokens, self.starts(k), self.block_size)
        return x, y, k

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        k = self.start + worker
        while True:
            yield self.batch(k)
            k += workers


class FixedWindows(Dataset):
    """`n` windows at evenly spaced offsets: the same validation set for every run of a sweep."""

    def __init__(self, tokens: np.ndarray, block_size: int, n: int):
        last = len(tokens) - block_size - 1
        if last < 0:
            raise ValueError(f"{len(tokens)} tokens cannot fill one window of {block_size} + 1")
        self.tokens = tokens
        self.block_size = block_size
        self.offsets = np.unique(np.linspace(0, last, num=n).astype(np.int64))

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = _windows(self.tokens, self.offsets[i : i + 1], self.block_size)
        return x[0], y[0]
