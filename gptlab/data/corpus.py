"""Finding a corpus and reading it as documents: its sources, its checksum, and its text in pieces
that are safe to tokenize separately (record formats are read by gptlab.data.records).

Reading streams: files are read in blocks of READ_BYTES and decoded incrementally, and the text is
handed out in pieces of about CHUNK_CHARS characters, cut where no BPE pre-token can straddle the
cut, so that encoding the pieces one by one gives the same tokens as encoding the whole text.
"""

from __future__ import annotations

import codecs
import hashlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptlab.data.records import (
    count_parquet,
    hub_revision,
    is_saved_dataset,
    parquet_group_bytes,
    read_hub,
    read_jsonl,
    read_parquet,
    read_saved_dataset,
    record_format,
)
from gptlab.errors import ConfigError, DataError
from gptlab.files import fs_error

READ_BYTES = 1 << 20  # bytes read from disk at a time
CHUNK_CHARS = 1 << 20  # characters handed to the tokenizer at a time (about 1 MB of text)
BOM = "\ufeff"  # a byte-order mark opening a file is an encoding signature, not text
# Where a cut leaves the tokenization of the whole text unchanged (GPT-2, cl100k and o200k patterns
# alike): right after a lone newline between two non-space characters, or right before a lone space
# between two non-space characters (the space belongs to the next word).
_NEWLINE_CUT = re.compile(r"(?<=\S)\n(?=\S)")
_SPACE_CUT = re.compile(r"(?<=\S) (?=\S)")


@dataclass(frozen=True)
class Source:
    """One thing to read: a text file (one document), a JSONL or Parquet file, a saved dataset
    directory (one document per record), or a hub dataset (`name`, no path)."""

    kind: str  # "txt" | "jsonl" | "parquet" | "saved" | "hub"
    path: Path | None = None
    name: str | None = None


def corpus_files(path: str | Path) -> list[Path]:
    """One file, or the corpus files of a directory (.txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet;
    hidden names skipped) in sorted order; a saved dataset directory is returned as itself."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"corpus not found: {path}; point data.path at a text, JSONL or Parquet file, "
                        f"a directory of them, or a dataset saved with save_to_disk")
    if not path.is_dir() or is_saved_dataset(path):
        return [path]
    files = sorted(
        p for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        and (p.suffix.lower() == ".txt" or record_format(p))
    )
    if not files:
        raise DataError(f"corpus directory {path} holds no .txt, .jsonl(.gz/.zst) or .parquet files")
    return files


class Corpus:
    """What data.path (a path or a list of them) or data.hf_dataset names, read as documents.

    A text file is one document; JSONL, Parquet and dataset records are one document each, their
    text in the column `text_field`; `hf_split` picks the split of a saved DatasetDict or of a hub
    dataset. Paths are resolved now, and a directory's files listed in sorted order.
    """

    def __init__(self, paths: list[str | Path] | str | Path | None = None, text_field: str = "text",
                 hf_split: str = "train", hf_dataset: str | None = None, hf_config: str | None = None):
        if isinstance(paths, (str, Path)):
            paths = [paths]
        self.text_field = text_field
        self.hf_split = hf_split
        self.hf_config = hf_config
        self.roots = [Path(p).expanduser().resolve() for p in paths or []]
        self.sources: list[Source] = []
        self._listed: dict[Path, list[Path]] = {}
        for root in self.roots:
            self._listed[root] = corpus_files(root)
            for f in self._listed[root]:
                kind = "saved" if f.is_dir() else record_format(f) or "txt"
                self.sources.append(Source(kind, f))
        self._group_documents: dict[Path, list[int]] = {}  # a Parquet file's documents by row group
        self.revision = None
        if hf_dataset:
            self.revision = hub_revision(hf_dataset)
            self.sources.append(Source("hub", name=hf_dataset))
        if not self.sources:
            raise ConfigError("no corpus: set data.path (a file, a directory or a list of them) or data.hf_dataset")

    def __str__(self) -> str:
        names = [str(r) for r in self.roots] + [f"hub:{s.name}" for s in self.sources if s.kind == "hub"]
        return names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} more)"

    @property
    def kinds(self) -> set[str]:
        return {s.kind for s in self.sources}

    def settings(self) -> dict[str, Any]:
        """The settings that change what is read from these sources (part of the cache key)."""
        out: dict[str, Any] = {}
        if self.kinds - {"txt"}:
            out["text_field"] = self.text_field
        if self.kinds & {"saved", "hub"}:
            out["hf_split"] = self.hf_split
        if "hub" in self.kinds:
            out["hf_config"] = self.hf_config
        return out

    def _files_of(self, root: Path) -> list[Path]:
        if root.is_file():
            return [root]
        if is_saved_dataset(root):
            return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
        return self._listed[root]

    def files(self) -> list[Path]:
        """Every file read, those of saved datasets included."""
        return [f for root in self.roots for f in self._files_of(root)]

    def sha256(self) -> str:
        """sha256 of a single file's bytes (the published checksum), else of the names and bytes of
        every file (relative to the data.path entry that found it) and of the hub revision."""
        h = hashlib.sha256()
        single = len(self.sources) == 1 and self.roots and self.roots[0].is_file()
        for root in self.roots:
            for f in self._files_of(root):
                if not single:
                    h.update(str(f.relative_to(root) if root.is_dir() else f.name).encode() + b"\0")
                try:
                    with open(f, "rb") as fh:
                        while chunk := fh.read(1 << 22):
                            h.update(chunk)
                except OSError as e:
                    raise fs_error(e, f, "read") from None
        for s in self.sources:
            if s.kind == "hub":
                h.update(f"hub:{s.name}:{self.hf_config}:{self.hf_split}:{self.revision}".encode())
        return h.hexdigest()

    def size(self) -> tuple[int | None, str]:
        """(total, unit) for a progress bar: bytes of the files, or documents of a hub dataset."""
        if "hub" in self.kinds:
            return None, "documents"
        try:
            return sum(f.stat().st_size for f in self.files()), "bytes"
        except OSError as e:
            raise fs_error(e, e.filename or str(self), "read") from None

    def pieces(self, advance: Callable[[int], None] = lambda n: None) -> Iterator[tuple[bool, str]]:
        """(starts_a_document, text) pieces of about CHUNK_CHARS characters at most, cut at
        tokenization-safe places; empty documents are skipped. Bad input raises one DataError line."""
        for s in self.sources:
            yield from self._pieces(s, advance)

    def count(self, advance: Callable[[int], None] = lambda n: None, workers: int = 1) -> tuple[int, int]:
        """(documents, characters) of what `pieces` yields, the same checks made; a Parquet column is
        counted by Arrow without making a Python string of every record, in `workers` processes."""
        docs = chars = 0
        for s in self.sources:
            if s.kind == "parquet":
                groups, c = count_parquet(s.path, self.text_field, advance, workers)
                self._group_documents[s.path] = groups
                docs, chars = docs + sum(groups), chars + c
                continue
            for starts, text in self._pieces(s, advance):
                docs += starts
                chars += len(text)
        return docs, chars

    def record_groups(self, max_bytes: int) -> list[tuple[Path, int, int]] | None:
        """(file, row group, documents) for every row group of the corpus, when it is all Parquet files
        already counted (`count`) whose row groups hold at most `max_bytes` of text each; else None.
        An encoding worker can then read a row group itself."""
        if self.kinds != {"parquet"} or any(s.path not in self._group_documents for s in self.sources):
            return None
        out = []
        for s in self.sources:
            if max(parquet_group_bytes(s.path, self.text_field), default=0) > max_bytes:
                return None
            out += [(s.path, g, n) for g, n in enumerate(self._group_documents[s.path])]
        return out

    def _pieces(self, s: Source, advance) -> Iterator[tuple[bool, str]]:
        try:
            if s.kind == "txt":
                first = True
                for text, nbytes in _file_text(s.path):
                    yield first, text
                    first = False
                    advance(nbytes)
                return
            for doc in self._records(s, advance):
                for i, text in enumerate(cut(doc)):
                    yield i == 0, text
        except OSError as e:
            raise fs_error(e, s.path or s.name, "read") from None

    def _records(self, s: Source, advance) -> Iterator[str]:
        if s.kind == "jsonl":
            return read_jsonl(s.path, self.text_field, advance)
        if s.kind == "parquet":
            return read_parquet(s.path, self.text_field, advance)
        if s.kind == "saved":
            return read_saved_dataset(s.path, self.text_field, self.hf_split, advance)
        return read_hub(s.name, self.hf_config, self.hf_split, self.revision, self.text_field, advance)


def cut(text: str) -> Iterator[str]:
    """`text` in pieces of at most 2 * CHUNK_CHARS characters, cut at tokenization-safe places."""
    while len(text) >= 2 * CHUNK_CHARS:
        k = _safe_cut(text)
        yield text[:k]
        text = text[k:]
    if text:
        yield text


def _file_text(path: Path) -> Iterator[tuple[str, int]]:
    decoder = codecs.getincrementaldecoder("utf-8")()
    buf, offset, pending, at_start = "", 0, 0, True
    with open(path, "rb") as fh:
        while True:
            raw = fh.read(READ_BYTES)
            if raw and b"\0" in raw:
                at = offset + raw.index(b"\0")
                raise DataError(f"{path} looks binary (NUL byte at offset {at}); the corpus must be UTF-8 text")
            try:
                buf += decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path} is not valid UTF-8 (byte offset {offset + e.start}); convert it, e.g. "
                    f"`iconv -f latin1 -t utf-8`"
                ) from None
            if at_start and buf:
                at_start = False
                if buf.startswith(BOM):
                    buf = buf[1:]
            offset += len(raw)
            pending += len(raw)
            while len(buf) >= 2 * CHUNK_CHARS or (not raw and buf):
                cut = len(buf) if not raw and len(buf) < 2 * CHUNK_CHARS else _safe_cut(buf)
                yield buf[:cut], pending
                buf, pending = buf[cut:], 0
            if not raw:
                break


def _safe_cut(buf: str) -> int:
    """An index near CHUNK_CHARS where the text may be cut without changing its BPE tokenization."""
    window = buf[CHUNK_CHARS : 2 * CHUNK_CHARS]
    m = _NEWLINE_CUT.search(window)
    if m:
        return CHUNK_CHARS + m.end()
    m = _SPACE_CUT.search(window)
    if m:
        return CHUNK_CHARS + m.start()
    return 2 * CHUNK_CHARS  # no whitespace in a megabyte: cut anyway
