"""Encoding a corpus into token-id arrays, in this process or in a pool of workers.

`corpus_encoder` gives the fast function of a tokenizer from a batch of text pieces to one numpy
array of ids; `Encoder` runs it over a stream of batches, in parallel, and hands the results back in
input order with a bounded number of batches in flight, so memory stays flat however long the stream.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np

from gptlab.data.records import read_parquet
from gptlab.data.tokenizers import BPETokenizer, CharTokenizer, WordTokenizer
from gptlab.data.trained_bpe import TrainedBPETokenizer
from gptlab.errors import DataError

Items = list  # a batch of text pieces (str) and ready token ids (np.ndarray), encoded as one array
EncodeFn = Callable[[Items], np.ndarray]
Tag = TypeVar("Tag")


def corpus_encoder(tok, dtype: np.dtype) -> EncodeFn:
    """A batch of items -> their token ids (of `dtype`), concatenated, as they go into the token files."""
    if isinstance(tok, TrainedBPETokenizer):
        return partial(_encode_hf, tok.corpus_hf, dtype)
    if isinstance(tok, BPETokenizer):
        return partial(_encode_bpe_items, tok.enc, tok.eot_id, dtype)
    elif isinstance(tok, CharTokenizer):
        one = partial(_encode_char, tok, _char_table(tok), dtype)
    else:
        one = partial(_encode_word, tok, dtype)
    return partial(_encode_items, one, dtype)


def _encode_items(one: Callable[[str], np.ndarray], dtype: np.dtype, items: Items) -> np.ndarray:
    parts = [item if isinstance(item, np.ndarray) else one(item) for item in items]
    return (parts[0] if len(parts) == 1 else np.concatenate(parts)).astype(dtype, copy=False)


def _encode_hf(hf, dtype: np.dtype, items: Items) -> np.ndarray:
    # encode_batch runs on all cores inside the tokenizers library; special-token text in the corpus
    # is plain text here (TrainedBPETokenizer.corpus_hf), as in tiktoken's encoding below
    texts = [item for item in items if isinstance(item, str)]
    ids = iter([e.ids for e in hf.encode_batch(texts, add_special_tokens=False)])
    return _encode_items(lambda _: np.asarray(next(ids), dtype=dtype), dtype, items)


def _encode_bpe_items(enc, eot: int, dtype: np.dtype, items: Items) -> np.ndarray:
    # A batch of many documents is encoded in one tiktoken call: the documents joined by the
    # end-of-text text, with that special token allowed. tiktoken encodes the text between two
    # special tokens exactly as if it stood alone (the ordinary pattern runs on that slice only), so the
    # ids equal each document's own encoding with the end-of-text id between, at one call per batch
    # instead of one per document. A document holding the special token's text itself, which must stay
    # plain text, takes the path of one call per piece.
    special = enc.decode_single_token_bytes(eot).decode()
    pieces = []
    for item in items:
        if isinstance(item, str):
            if special in item:
                break
            pieces.append(item)
        elif item.size == 1 and item[0] == eot:
            pieces.append(special)
        else:
            break
    else:
        return enc.encode_to_numpy("".join(pieces), allowed_special={special}, disallowed_special=()).astype(
            dtype, copy=False)
    return _encode_items(partial(_encode_bpe, enc, dtype), dtype, items)


def _encode_bpe(enc, dtype: np.dtype, text: str) -> np.ndarray:
    # Straight into a numpy buffer: ~20% faster than encode_ordinary's Python list. With nothing
    # allowed or disallowed, special-token text such as "<|endoftext|>" is encoded as plain text,
    # exactly as encode_ordinary does.
    return enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=()).astype(dtype, copy=False)


def _char_table(tok: CharTokenizer) -> np.ndarray:
    """Token id by code point (-1: not in the vocabulary)."""
    table = np.full(max(ord(c) for c in tok.chars) + 1, -1, dtype=np.int64)
    for i, c in enumerate(tok.chars):
        table[ord(c)] = i
    return table


def _encode_char(tok: CharTokenizer, table: np.ndarray, dtype: np.dtype, text: str) -> np.ndarray:
    # vectorised lookup by code point: ~50x faster than a Python loop over characters
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    if cps.size and cps.max() >= table.size or (table[cps] < 0).any():
        tok.encode(text)  # raises with the offending characters named
    return table[cps].astype(dtype)


def _encode_word(tok: WordTokenizer, dtype: np.dtype, text: str) -> np.ndarray:
    return np.asarray(tok.encode(text), dtype=dtype)


@dataclass(frozen=True)
class RecordGroup:
    """A task an encoding worker reads itself: the documents of one Parquet row group, split. Reading
    in the workers keeps the driver, which would otherwise compete with them for the cores, idle."""

    path: Path
    field: str
    group: int
    val: np.ndarray  # one bool per document of the group: True for validation
    started: tuple[bool, bool]  # whether train / val already hold a document: a separator goes first
    separator: str | np.ndarray


def encode_task(encode: EncodeFn, task: Items | RecordGroup) -> np.ndarray | dict[str, np.ndarray]:
    """`encode(items)`, or the {split: ids} of a RecordGroup."""
    if not isinstance(task, RecordGroup):
        return encode(task)
    items: dict[str, Items] = {"train": [], "val": []}
    started = dict(zip(items, task.started))
    n = 0
    for n, doc in enumerate(read_parquet(task.path, task.field, lambda _: None, [task.group]), 1):
        split = "val" if n <= len(task.val) and task.val[n - 1] else "train"
        if started[split]:
            items[split].append(task.separator)
        started[split] = True
        items[split].append(doc)
    if n != len(task.val):
        raise DataError(f"{task.path} changed while it was being prepared (row group {task.group} held "
                        f"{len(task.val)} documents, now {n}); prepare it again")
    return {split: encode(part) for split, part in items.items() if part}


# -- the worker pool ------------------------------------------------------------------------------
# A forked worker process receives its encode function once, through the pool's initializer (fork
# hands the initializer's arguments over in memory: nothing is pickled), and keeps it here. This
# name is only ever set inside worker processes.
_worker_encode: EncodeFn | None = None


def _install(encode: EncodeFn) -> None:  # runs in each new worker process
    global _worker_encode
    _worker_encode = encode


def _encode_in_worker(task: Items | RecordGroup) -> np.ndarray | dict[str, np.ndarray]:
    return encode_task(_worker_encode, task)


class Encoder:
    """Encodes a stream of text pieces with `encode`, in `workers` workers (1: in this process).

    Processes, not threads: tiktoken holds the GIL for part of each call, so threads scale worse than
    processes (bench/prepare.py measures the speedup of workers). Workers are forked
    so that they inherit the loaded tokenizer: there is no import and no vocabulary load per worker.
    Without fork (macOS, Windows) threads are used instead.
    """

    def __init__(self, encode: EncodeFn, workers: int):
        self.encode = encode
        self.workers = max(1, workers)
        self._pool: Executor | None = None
        self._submit: Callable[[str], Future] | None = None

    def __enter__(self) -> Encoder:
        if self.workers > 1:
            if "fork" in multiprocessing.get_all_start_methods():
                self._pool = ProcessPoolExecutor(
                    max_workers=self.workers, mp_context=multiprocessing.get_context("fork"),
                    initializer=_install, initargs=(self.encode,),
                )
                self._submit = partial(self._pool.submit, _encode_in_worker)
            else:
                self._pool = ThreadPoolExecutor(max_workers=self.workers)
                self._submit = partial(self._pool.submit, encode_task, self.encode)
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = self._submit = None

    def ordered(self, batches: Iterable[tuple[Tag, Items]]) -> Iterator[tuple[Tag, np.ndarray]]:
        """(tag, items) -> (tag, ids) in input order."""
        in_flight: deque[tuple[Tag, Future]] = deque()
        for tag, items in batches:
            if self._submit is None:
                yield tag, encode_task(self.encode, items)
                continue
            in_flight.append((tag, self._submit(items)))
            # read ahead while the workers encode, but keep at most 2 batches per worker in flight
            while len(in_flight) > 2 * self.workers:
                tag_, future = in_flight.popleft()
                yield tag_, future.result()
        while in_flight:
            tag_, future = in_flight.popleft()
            yield tag_, future.result()
