"""Finding a corpus on disk and reading it as text: its files, its checksum, and its text in pieces
that are safe to tokenize separately.

Reading streams: files are read in blocks of READ_BYTES and decoded incrementally, and the text is
handed out in pieces of about CHUNK_CHARS characters, cut where no BPE pre-token can straddle the
cut, so that encoding the pieces one by one gives the same tokens as encoding the whole text.
"""

from __future__ import annotations

import codecs
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

from gptlab.errors import DataError
from gptlab.files import fs_error

READ_BYTES = 1 << 20  # bytes read from disk at a time
CHUNK_CHARS = 1 << 20  # characters handed to the tokenizer at a time (about 1 MB of text)
BOM = "\ufeff"  # a byte-order mark opening a file is an encoding signature, not text
# Where a cut leaves the tokenization of the whole text unchanged (GPT-2, cl100k and o200k patterns
# alike): right after a lone newline between two non-space characters, or right before a lone space
# between two non-space characters (the space belongs to the next word).
_NEWLINE_CUT = re.compile(r"(?<=\S)\n(?=\S)")
_SPACE_CUT = re.compile(r"(?<=\S) (?=\S)")


def corpus_files(path: Path, pattern: str = "**/*.txt") -> list[Path]:
    """One file, or the sorted text files of a directory (each one document)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"corpus not found: {path}; point data.path at a UTF-8 text file or a directory of them")
    if path.is_dir():
        files = sorted(p for p in path.glob(pattern) if p.is_file())
        if not files:
            raise DataError(f"corpus directory {path} holds no files matching {pattern!r}")
        return files
    return [path]


def corpus_sha256(files: list[Path], root: Path | None = None) -> str:
    """sha256 of a single file's bytes (the published checksum), or of a directory's names and bytes."""
    h = hashlib.sha256()
    for f in files:
        if len(files) > 1 or root is not None and root.is_dir():
            h.update(str(f.relative_to(root) if root else f.name).encode() + b"\0")
        try:
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    h.update(chunk)
        except OSError as e:
            raise fs_error(e, f, "read") from None
    return h.hexdigest()


def corpus_bytes(files: list[Path]) -> int:
    try:
        return sum(f.stat().st_size for f in files)
    except OSError as e:
        raise fs_error(e, e.filename or files[0], "read") from None


def iter_text(files: list[Path], separator: str | None) -> Iterator[tuple[str, int]]:
    """Yield (text, bytes_read) pieces of about CHUNK_CHARS characters, cut at tokenization-safe places.

    Between documents (files) the separator is yielded as its own piece (the same str object each
    time, so callers can tell it from text by identity), if there is one.
    Raises DataError for binary or non-UTF-8 input, naming the file and byte offset.
    """
    for n, path in enumerate(files):
        if n and separator is not None:
            yield separator, 0
        try:
            yield from _file_text(path)
        except OSError as e:
            raise fs_error(e, path, "read") from None


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
