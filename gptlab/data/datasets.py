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


class ArrayWindows:
    """A token array (a memmap of a prepared split) as a source of windows; gptlab.data.shards.TokenShards
    is the other kind, with the same two methods."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def n_starts(self, block_size: int) -> int:
        return len(self.tokens) - block_size

    def gather(self, starts: np.ndarray, block_size: int) -> np.ndarray:
        return self.tokens[starts[:, None] + np.arange(block_size + 1)].astype(np.int64)


def as_windows(tokens):
    return tokens if hasattr(tokens, "gather") else ArrayWindows(tokens)


def _split(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    # rows of block_size + 1 tokens: inputs and targets shifted by one
    rows = torch.from_numpy(rows)
    return rows[:, :-1], rows[:, 1:]


Sampler = Literal["random", "sliding"]


class TrainBatches(IterableDataset):
    """Endless batches of windows: `random` start offsets (nanoGPT) or a `sliding` window with `stride`
    (the book's GPTDatasetV1), the latter visited in a fresh permutation every pass over the data.

    `tokens` is one source of windows (a token array or TokenShards) or a list of them with `weights`
    (a mixture): each window of batch k then picks its source by weight and its start within it, both
    drawn from (seed, rank, k)."""

    def __init__(
        self,
        tokens,
        block_size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        sampler: Sampler = "random",
        stride: int | None = None,
        weights: list[float] | None = None,
    ):
        check("data.sampler", sampler, Sampler)
        self.sources = [as_windows(t) for t in (tokens if isinstance(tokens, list) else [tokens])]
        if len(self.sources) > 1 and sampler != "random":
            raise ValueError("a mixture of sources draws random windows: data.sampler=random")
        w = np.asarray(weights if weights is not None else [1.0] * len(self.sources), dtype=np.float64)
        self.weights = w / w.sum()
        self.cumulative = np.cumsum(self.weights)
        self.cumulative[-1] = 1.0  # a uniform draw in [0, 1) always lands on a source
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = start
        self.sampler = sampler
        self.sizes = np.array([s.n_starts(block_size) for s in self.sources], dtype=np.int64)
        self.n_starts = int(self.sizes[0])  # valid start offsets of the (first) source: [0, n_starts)
        self.stride = stride or block_size
        if self.sizes.min() < 1:
            raise ValueError(f"{len(self.sources[int(self.sizes.argmin())])} training tokens cannot fill one "
                             f"window of {block_size} + 1")

    def draw(self, k: int, rank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(source, start offset) of each window of batch k on `rank` (default: this one)."""
        rank = self.rank if rank is None else rank
        if self.sampler == "random":
            rng = np.random.default_rng([self.seed, rank, k])
            if len(self.sources) == 1:
                return np.zeros(self.batch_size, np.int64), rng.integers(0, self.n_starts, size=self.batch_size)
            src = self._pick(rng)
            return src, rng.integers(0, self.sizes[src])
        # sliding: every pass ("epoch") over the windows is a permutation shared by all ranks, each
        # rank taking its own interleaved share of every global batch
        offsets = np.arange(0, self.n_starts, self.stride)
        global_batch = self.batch_size * self.world_size
        per_epoch = max(1, len(offsets) // global_batch)
        epoch, j = divmod(k, per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(offsets))
        picks = order[(j * global_batch + rank + np.arange(self.batch_size) * self.world_size) % len(offsets)]
        return np.zeros(self.batch_size, np.int64), offsets[picks]

    def _pick(self, rng: np.random.Generator) -> np.ndarray:
        return np.searchsorted(self.cumulative, rng.random(self.batch_size), side="right")

    def picks(self, k: int, rank: int) -> np.ndarray:
        """The source of each window of batch k on `rank` (what `draw` gives, without the starts)."""
        if len(self.sources) == 1:
            return np.zeros(self.batch_size, np.int64)
        return self._pick(np.random.default_rng([self.seed, rank, k]))

    def starts(self, k: int) -> np.ndarray:
        """Start offsets of batch k on this rank."""
        return self.draw(k)[1]

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        src, starts = self.draw(k)
        if len(self.sources) == 1:
            rows = self.sources[0].gather(starts, self.block_size)
        else:
            rows = np.empty((self.batch_size, self.block_size + 1), dtype=np.int64)
            for i in np.unique(src):
                rows[src == i] = self.sources[i].gather(starts[src == i], self.block_size)
        x, y = _split(rows)
        return x, y, k

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        k = self.start + worker
        while True:
            yield self.batch(k)
            k += workers


class FixedWindows(Dataset):
    """`n` windows at evenly spaced offsets: the same validation set for every run of a sweep. With
    `source` (a mixture's source index) each item carries it as a third element."""

    def __init__(self, tokens, block_size: int, n: int, source: int | None = None):
        self.tokens = as_windows(tokens)
        last = self.tokens.n_starts(block_size) - 1
        if last < 0:
            raise ValueError(f"{len(self.tokens)} tokens cannot fill one window of {block_size} + 1")
        self.block_size = block_size
        self.source = source
        self.offsets = np.unique(np.linspace(0, last, num=n).astype(np.int64))

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int):
        x, y = _split(self.tokens.gather(self.offsets[i : i + 1], self.block_size))
        return (x[0], y[0]) if self.source is None else (x[0], y[0], torch.tensor(self.source))
