"""Tokenize a corpus once into memory-mapped `train.bin` / `val.bin` plus `meta.json`, and cache it.

The cache directory is keyed by the corpus's sha256, the tokenizer and the split, so the next run
(or another job of a sweep) reuses it. Preparation streams (gptlab.data.corpus reads the text in
tokenization-safe pieces, gptlab.data.encode encodes them in parallel workers, gptlab.data.cache
appends them to the token files), so memory stays flat however large the corpus, and a crash or a
full disk leaves nothing half-written.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from gptlab.data import corpus as _corpus
from gptlab.data.cache import CacheWriter, Prepared, cache_dir, check_prepared, load_prepared, token_dtype
from gptlab.data.corpus import corpus_bytes, corpus_files, corpus_sha256, iter_text
from gptlab.data.encode import Encoder, corpus_encoder
from gptlab.data.tokenizers import ENDOFTEXT, BPETokenizer, CharTokenizer, WordTokenizer
from gptlab.errors import ConfigError, DataError

__all__ = ["prepare_corpus", "corpus_files", "check_prepared", "load_prepared", "Prepared", "tokenizer_key"]


def tokenizer_key(spec: dict[str, Any]) -> str:
    kind = spec.get("kind")
    if kind == "bpe":
        return f"bpe-{spec.get('encoding', 'gpt2')}"
    if kind in ("char", "word"):
        return kind
    raise ConfigError(f"data.tokenizer={kind!r} is unknown; choose one of ['bpe', 'char', 'word']")


def _progress(total: int, description: str):
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    progress = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        transient=True,
        disable=not sys.stderr.isatty(),
    )
    return progress, progress.add_task(description, total=total)


class _Split:
    """Assigns text to train until `split_at` characters went by, then to val."""

    def __init__(self, split_at: int):
        self.split_at = split_at
        self.chars = 0

    def pieces(self, text: str) -> list[tuple[str, str]]:
        """Split `text` at the train/val boundary: [(split, text), ...]."""
        start, self.chars = self.chars, self.chars + len(text)
        if self.chars <= self.split_at:
            return [("train", text)]
        if start >= self.split_at:
            return [("val", text)]
        k = self.split_at - start
        return [("train", text[:k]), ("val", text[k:])]


def prepare_corpus(
    files: list[Path],
    tokenizer: dict[str, Any],
    out_root: Path,
    val_fraction: float = 0.1,
    workers: int | None = None,
    verify: bool = True,
    corpus_root: Path | None = None,
    log=print,
) -> Prepared:
    """Tokenize `files` with the tokenizer `tokenizer` ({"kind": ..., ...}) into a cached directory.

    `workers` encoding processes run in parallel (default: the number of CPUs, at most 8; 1 encodes
    in this process)."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={val_fraction}: must be between 0 and 1 (exclusive)")
    tok_key = tokenizer_key(tokenizer)
    sha = corpus_sha256(files, corpus_root)
    final = cache_dir(out_root, sha, tok_key, val_fraction)
    if final.exists():
        problem = check_prepared(final, verify=verify)
        if problem is None:
            return load_prepared(final)
        log(f"[gptlab] prepared cache {final} is damaged ({problem}); rebuilding it")

    t0 = time.perf_counter()
    total_bytes = corpus_bytes(files)
    if total_bytes == 0:
        raise DataError(f"the corpus {corpus_root or files[0]} is empty")
    kind = tokenizer["kind"]
    separator = {"bpe": ENDOFTEXT, "word": f" {ENDOFTEXT} ", "char": "\n"}[kind]

    # Pass 1: count characters (the split is by characters) and, for char/word, learn the vocabulary.
    n_chars, chars, words = 0, set(), set()
    progress, task = _progress(total_bytes, "reading corpus")
    with progress:
        for text, nbytes in iter_text(files, separator):
            n_chars += len(text)
            if kind == "char":
                chars.update(text)
            elif kind == "word":
                words.update(WordTokenizer.split(text))
            progress.advance(task, nbytes)
    if kind == "char":
        tok = CharTokenizer(chars) if chars else None
    elif kind == "word":
        tok = WordTokenizer(words)
    else:
        tok = BPETokenizer(tokenizer.get("encoding", "gpt2"))
    if n_chars == 0 or tok is None or (kind == "word" and tok.vocab_size <= 2):
        raise DataError(f"the corpus {corpus_root or files[0]} has no text")
    dtype = token_dtype(tok.vocab_size)

    # Pass 2: encode into a private temporary directory, then publish it.
    split = _Split(split_at=int(n_chars * (1.0 - val_fraction)))
    eot = np.array([tok.eot_id if tok.eot_id is not None else 0], dtype=dtype)

    def pieces():
        for text, nbytes in iter_text(files, separator):
            if kind == "bpe" and text is separator:  # one special token, not text to encode
                yield split.pieces(text)[0][0], eot
            else:
                yield from split.pieces(text)
            progress.advance(task, nbytes)

    workers = workers or min(8, os.cpu_count() or 1)
    if total_bytes <= 2 * _corpus.CHUNK_CHARS:  # one chunk: nothing to overlap
        workers = 1
    progress, task = _progress(total_bytes, f"tokenizing ({tok_key})")
    with CacheWriter(final, dtype) as writer, Encoder(corpus_encoder(tok, dtype), workers) as encoder, progress:
        for name, ids in encoder.ordered(pieces()):
            writer.write(name, ids)
        if min(writer.counts.values()) == 0:
            raise DataError(
                f"the corpus is too small to split: {writer.counts['train']} train and "
                f"{writer.counts['val']} validation tokens; use more text or change data.val_fraction"
            )
        corpus = {"sha256": sha, "files": len(files), "bytes": total_bytes, "chars": n_chars}
        prepared = writer.publish(tok.state_dict(), tok.vocab_size, val_fraction, corpus, verify=verify)
    log(
        f"[gptlab] prepared {total_bytes / 1e6:.1f} MB -> {prepared.meta['tokens']['train']:,} train / "
        f"{prepared.meta['tokens']['val']:,} val tokens ({tok_key}) in {time.perf_counter() - t0:.1f}s at {final}"
    )
    return load_prepared(final)
