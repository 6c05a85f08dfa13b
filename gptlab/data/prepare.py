"""Tokenize a corpus once into memory-mapped `train.bin` / `val.bin` plus `meta.json`, and cache it.

The cache directory is keyed by the corpus's content, the tokenizer, the split and the settings that
change what is read, so the next run (or another job of a sweep) reuses it. Preparation streams
(gptlab.data.corpus reads documents in tokenization-safe pieces, gptlab.data.encode encodes them in
parallel workers, gptlab.data.cache appends them to the token files), so memory stays flat however
large the corpus, and a crash or a full disk leaves nothing half-written.

The passes over the corpus: (1) count documents and characters and, for char/word, learn the
vocabulary; (2, bpe_train only) train the BPE tokenizer on the training documents; (3) encode.

The split: a corpus of many documents is split by document: round(n * val_fraction) documents,
drawn with `split_seed`, are validation, the rest training. A single document (or too few for one
validation document) is split by characters: the last val_fraction of the text is validation.
Documents of a split are separated by <|endoftext|> (BPE) or `separator` (char: a newline, word:
<|endoftext|>).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import numpy as np

from gptlab.data import corpus as _corpus
from gptlab.data.cache import CacheWriter, Prepared, cache_dir, check_prepared, load_prepared, token_dtype
from gptlab.data.corpus import Corpus, corpus_files
from gptlab.data.encode import Encoder, RecordGroup, corpus_encoder
from gptlab.data.tokenizers import ENDOFTEXT, BPETokenizer, CharTokenizer, TokenizerKind, WordTokenizer
from gptlab.data.trained_bpe import TrainedBPETokenizer
from gptlab.errors import ConfigError, DataError
from gptlab.schema import Range, check

__all__ = ["prepare_corpus", "corpus_files", "check_prepared", "load_prepared", "Prepared", "tokenizer_key"]
SEPARATORS = {"char": "\n", "word": f" {ENDOFTEXT} "}  # the defaults; BPE kinds use the special token
BPE_KINDS = ("bpe", "bpe_train")
# the share held out for validation
ValFraction = Annotated[float, Range(0.0, 1.0, low_open=True)]
# A Parquet corpus whose row groups hold at most this much text each is read by the encoding workers,
# a row group per task (a few row groups per worker in flight); larger row groups are read here
GROUP_BYTES = 16 << 20


def check_separator(separator: str | None, kind: str) -> None:
    if separator is not None and kind not in SEPARATORS:
        raise ConfigError(f"data.separator={separator!r}: applies to the char and word tokenizers; BPE separates "
                          f"documents by {ENDOFTEXT}")


def tokenizer_key(spec: dict[str, Any]) -> str:
    kind = spec.get("kind")
    if kind == "bpe":
        return f"bpe-{spec.get('encoding', 'gpt2')}"
    if kind == "bpe_train":
        specials = spec.get("special_tokens") or [ENDOFTEXT]
        extra = "" if specials == [ENDOFTEXT] else "-" + hashlib.sha256(json.dumps(specials).encode()).hexdigest()[:8]
        return f"bpe_train{spec.get('vocab_size')}{extra}"
    check("data.tokenizer", kind, TokenizerKind)
    return kind


def _progress(total: int | None, unit: str, description: str):
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    counts = (DownloadColumn(), TransferSpeedColumn()) if unit == "bytes" else (MofNCompleteColumn(),)
    progress = Progress("[progress.description]{task.description}", BarColumn(), *counts, TimeRemainingColumn(),
                        transient=True, disable=not sys.stderr.isatty())
    return progress, progress.add_task(description, total=total)


class _Plan:
    """Which split each piece of text goes to, and the separators between documents."""

    def __init__(self, n_docs: int, n_chars: int, val_fraction: float, seed: int, separator: str | np.ndarray):
        self.separator = separator  # text (char, word) or the end-of-text id (BPE)
        k = round(n_docs * val_fraction)
        self.by_document = 0 < k < n_docs
        if self.by_document:
            self.val = np.zeros(n_docs, dtype=bool)
            self.val[np.random.default_rng(seed).choice(n_docs, size=k, replace=False)] = True
        else:
            self.split_at = int(n_chars * (1.0 - val_fraction))
        self.documents = {"train": 0, "val": 0}

    def items(self, pieces) -> Iterator[tuple[str, str | np.ndarray]]:
        """(split, text or token ids) for the corpus's (starts_a_document, text) pieces."""
        if self.by_document:
            doc, split = -1, "train"
            for starts, text in pieces:
                if starts:
                    doc += 1
                    split = "val" if self.val[doc] else "train"
                    if self.documents[split]:
                        yield split, self.separator
                    self.documents[split] += 1
                yield split, text
            return
        chars, doc, counted = 0, -1, {"train": -1, "val": -1}
        for starts, text in pieces:
            if starts:
                doc += 1
                if doc and isinstance(self.separator, np.ndarray):  # one token, as long as its text
                    yield ("train" if chars < self.split_at else "val"), self.separator
                    chars += len(ENDOFTEXT)
                elif doc:
                    yield from self._at(chars, self.separator)
                    chars += len(self.separator)
            for split, part in self._at(chars, text):
                if counted[split] != doc:  # documents with text in each split (one may be in both)
                    counted[split] = doc
                    self.documents[split] += 1
                yield split, part
            chars += len(text)

    def groups(self, groups: list[tuple[Path, int, int]], field: str, advance) -> Iterator[tuple[str, RecordGroup]]:
        """("groups", task) for the (file, row group, documents) of a corpus split by document, in order:
        each task carries its documents' splits, and an encoding worker reads it itself."""
        doc, done = 0, 0
        total = sum(n for _, _, n in groups) or 1
        size = sum(f.stat().st_size for f in dict.fromkeys(f for f, _, _ in groups))
        for path, group, n in groups:
            val = self.val[doc:doc + n]
            k = int(val.sum())
            yield "groups", RecordGroup(path, field, group, val, (self.documents["train"] > 0, self.documents["val"] > 0),
                                        self.separator)
            self.documents["train"] += n - k
            self.documents["val"] += k
            doc += n
            advance(size * doc // total - done)
            done = size * doc // total

    def _at(self, start: int, text: str) -> list[tuple[str, str]]:
        """`text`, starting at character `start`, cut at the train/val boundary."""
        end = start + len(text)
        if end <= self.split_at:
            return [("train", text)]
        if start >= self.split_at:
            return [("val", text)]
        k = self.split_at - start
        return [("train", text[:k]), ("val", text[k:])]


def _batches(items, limit: int) -> Iterator[tuple[str, list]]:
    """Items grouped into batches of about `limit` characters per split (one task for an encoding
    worker: many small documents travel together). Each split fills its own batch, so a document split,
    which interleaves the splits document by document, still makes few large tasks; the order within
    a split, all its token file depends on, is kept."""
    pending: dict[str, tuple[list, int]] = {}
    for split, item in items:
        batch, size = pending.get(split, ([], 0))
        batch.append(item)
        size += len(item)
        if size >= limit:
            yield split, batch
            batch, size = [], 0
        pending[split] = (batch, size)
    for split, (batch, _) in pending.items():
        if batch:
            yield split, batch


def prepare_corpus(
    corpus: Corpus | list[Path],
    tokenizer: dict[str, Any],
    out_root: Path,
    val_fraction: ValFraction = 0.1,
    workers: int | None = None,
    verify: bool = True,
    log=print,
    separator: str | None = None,
    split_seed: int = 0,
) -> Prepared:
    """Tokenize `corpus` (or a list of corpus files) with the tokenizer `tokenizer` ({"kind": ..., ...})
    into a cached directory under `out_root`.

    `workers` encoding processes run in parallel (default: the number of CPUs, at most 8; 1 encodes
    in this process)."""
    corpus = corpus if isinstance(corpus, Corpus) else Corpus(list(corpus))
    check("data.val_fraction", val_fraction, ValFraction)
    kind = tokenizer.get("kind")
    tok_key = tokenizer_key(tokenizer)
    check_separator(separator, kind)
    settings = dict(corpus.settings())
    if separator is not None:
        settings["separator"] = separator
    if len(corpus.sources) > 1 or corpus.kinds != {"txt"}:  # more than one document is possible
        settings["split_seed"] = split_seed
    sha = corpus.sha256()
    final = cache_dir(out_root, sha, tok_key, val_fraction, settings)
    if final.exists():
        problem = check_prepared(final, verify=verify)
        if problem is None:
            return load_prepared(final)
        log(f"[gptlab] prepared cache {final} is damaged ({problem}); rebuilding it")

    t0 = time.perf_counter()
    total, unit = corpus.size()
    if total == 0:
        raise DataError(f"the corpus {corpus} is empty")
    sep_text = separator if separator is not None else SEPARATORS.get(kind, ENDOFTEXT)
    workers = workers or min(8, os.cpu_count() or 1)
    if unit == "bytes" and total <= 2 * _corpus.CHUNK_CHARS:
        workers = 1  # one chunk: nothing to overlap

    # Pass 1: count documents and characters and, for char/word, learn the vocabulary.
    n_docs, n_chars, chars, words = 0, 0, set(), set()
    progress, task = _progress(total, unit, "reading corpus")
    with progress:
        advance = lambda n: progress.advance(task, n)  # noqa: E731
        if kind in SEPARATORS:  # char and word learn their vocabulary from the text
            for starts, text in corpus.pieces(advance):
                n_docs += starts
                n_chars += len(text)
                if kind == "char":
                    chars.update(text)
                else:
                    words.update(WordTokenizer.split(text))
        else:  # BPE learns nothing in this pass: the counts will do
            n_docs, n_chars = corpus.count(advance, workers)
    if n_docs == 0:
        raise DataError(f"the corpus {corpus} has no text (every document is empty)")
    if n_docs > 1:  # the separators are text too
        n_chars += (n_docs - 1) * len(sep_text)
        chars.update(sep_text)
        words.update(WordTokenizer.split(sep_text))
    plan_args = (n_docs, n_chars, val_fraction, split_seed)

    if kind == "char":
        tok = CharTokenizer(chars)
    elif kind == "word":
        tok = WordTokenizer(words)
        if tok.vocab_size <= 2:
            raise DataError(f"the corpus {corpus} has no words")
    elif kind == "bpe":
        tok = BPETokenizer(tokenizer.get("encoding", "gpt2"))
    else:  # Pass 2: train the tokenizer on the training documents
        plan = _Plan(*plan_args, separator=np.zeros(1, np.int64))  # separators: not training text
        progress, task = _progress(total, unit, f"training BPE ({tokenizer.get('vocab_size')} tokens)")
        with progress:
            items = plan.items(corpus.pieces(lambda n: progress.advance(task, n)))
            texts = (t for split, t in items if split == "train" and isinstance(t, str))
            tok = TrainedBPETokenizer.train(texts, tokenizer.get("vocab_size"), tokenizer.get("special_tokens"))
    dtype = token_dtype(tok.vocab_size)
    plan = _Plan(*plan_args, separator=np.array([tok.eot_id], dtype=dtype) if kind in BPE_KINDS else sep_text)

    # Pass 3: encode into a private temporary directory, then publish it.
    if kind == "bpe_train":
        workers = 1  # HF tokenizers parallelize inside Rust
    progress, task = _progress(total, unit, f"tokenizing ({tok_key})")
    with CacheWriter(final, dtype) as writer, Encoder(corpus_encoder(tok, dtype), workers) as encoder, progress:
        advance = lambda n: progress.advance(task, n)  # noqa: E731
        groups = corpus.record_groups(GROUP_BYTES) if plan.by_document else None
        if groups is not None:  # Parquet row groups, which the workers read themselves
            stream = plan.groups(groups, corpus.text_field, advance)
        else:
            stream = _batches(plan.items(corpus.pieces(advance)), _corpus.CHUNK_CHARS)
        for name, ids in encoder.ordered(stream):
            for split, part in ids.items() if name == "groups" else [(name, ids)]:
                writer.write(split, part)
        if min(writer.counts.values()) == 0:
            raise DataError(
                f"the corpus is too small to split: {writer.counts['train']} train and "
                f"{writer.counts['val']} validation tokens; use more text or change data.val_fraction"
            )
        info = {"sha256": sha, "files": len(corpus.files()), "bytes": total if unit == "bytes" else None,
                "chars": n_chars, "documents": n_docs}
        prepared = writer.publish(
            tok.state_dict(), tok.vocab_size, val_fraction, info, verify=verify,
            split={"by": "document" if plan.by_document else "text", "seed": split_seed,
                   "documents": plan.documents},
            settings=settings,
        )
    log(
        f"[gptlab] prepared {corpus} ({n_docs:,} documents, {n_chars / 1e6:.1f}M characters) -> "
        f"{prepared.meta['tokens']['train']:,} train / {prepared.meta['tokens']['val']:,} val tokens "
        f"({tok_key}, split by {prepared.meta['split']['by']}) in {time.perf_counter() - t0:.1f}s at {final}"
    )
    return load_prepared(final)
