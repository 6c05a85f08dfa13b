"""The prepared-cache layout: one directory per (corpus, tokenizer, split) holding

    train.bin, val.bin   token ids, native byte order, of meta["dtype"] (uint16 or uint32)
    meta.json            what the files hold (schema below), written last

    {"format": 2, "tokenizer": {"kind": ..., ...}, "vocab_size": int, "dtype": "uint16" | "uint32",
     "val_fraction": float,
     "corpus": {"sha256": str, "files": int, "bytes": int | None, "chars": int, "documents": int},
     "split": {"by": "document" | "text", "seed": int, "documents": {"train": int, "val": int}},
     "settings": {...},  # the reading settings in the cache key (text_field, separator, ...)
     "tokens": {"train": int, "val": int}, "sha256": {"train": str, "val": str}}

A cache is built in a private temporary directory (`CacheWriter`) and renamed into place, so
readers see a whole cache or none, and concurrent builders of the same cache both end with one
valid copy. `check_prepared` says whether a directory holds a usable cache; anything else about it
(a file cut short, a flipped byte, a meta.json that is not this schema) makes it "damaged", and the
caller rebuilds it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gptlab.data.tokenizers import tokenizer_from_state
from gptlab.errors import ConfigError, DataError
from gptlab.files import fs_error, remove_stale, temp_name, write_json

FORMAT_VERSION = 2
SPLITS = ("train", "val")
DTYPES = ("uint16", "uint32")


@dataclass
class Prepared:
    """A prepared corpus on disk: token files and their (validated) metadata."""

    directory: Path
    meta: dict[str, Any]
    _tokenizer: Any = field(default=None, repr=False, compare=False)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    def tokens(self, split: str) -> np.memmap:
        return np.memmap(self.directory / f"{split}.bin", dtype=self.dtype, mode="r")

    def tokenizer(self):
        if self._tokenizer is None:  # built once: a trained BPE parses its JSON
            self._tokenizer = tokenizer_from_state(self.meta["tokenizer"])
        return self._tokenizer


def cache_dir(root: Path, corpus_sha256: str, tokenizer_key: str, val_fraction: float,
              settings: dict[str, Any] | None = None) -> Path:
    """`<corpus>-<tokenizer>-val<fraction>[-<settings>]`: a hash of the settings, if there are any."""
    name = f"{corpus_sha256[:16]}-{tokenizer_key}-val{val_fraction:g}"
    if settings:
        name += "-" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return Path(root) / name


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


# -- reading --------------------------------------------------------------------------------------
def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_meta(meta: Any) -> str | None:
    """None if `meta` is a meta.json of this format, else what is wrong with it (the one check of the
    schema: every reader of meta.json relies on it)."""
    if not isinstance(meta, dict):
        return f"meta.json holds a {type(meta).__name__}, not an object"
    if meta.get("format") != FORMAT_VERSION:
        return f"format {meta.get('format')!r} != {FORMAT_VERSION} (written by another gptlab version)"
    expected = {"tokenizer": dict, "vocab_size": int, "dtype": str, "val_fraction": (int, float),
                "corpus": dict, "split": dict, "settings": dict, "tokens": dict, "sha256": dict}
    for key, kind in expected.items():
        if key not in meta:
            return f"meta.json has no {key!r}"
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            return f"meta.json {key!r} is {meta[key]!r}, not a {getattr(kind, '__name__', 'number')}"
    if meta["dtype"] not in DTYPES:
        return f"meta.json dtype {meta['dtype']!r} is not one of {list(DTYPES)}"
    for split in SPLITS:
        if not _is_int(meta["tokens"].get(split)) or meta["tokens"][split] < 0:
            return f"meta.json tokens.{split} is {meta['tokens'].get(split)!r}, not a count"
        if not isinstance(meta["sha256"].get(split), str):
            return f"meta.json sha256.{split} is {meta['sha256'].get(split)!r}, not a checksum"
    split = meta["split"]
    if split.get("by") not in ("document", "text") or not isinstance(split.get("documents"), dict):
        return f"meta.json split is {split!r}, not a split description"
    if not all(_is_int(split["documents"].get(s)) for s in SPLITS):
        return f"meta.json split.documents is {split['documents']!r}, not counts"
    try:
        tok = tokenizer_from_state(meta["tokenizer"])
    except ConfigError as e:
        return f"meta.json tokenizer: {e}"
    if tok.vocab_size != meta["vocab_size"]:
        return f"meta.json vocab_size {meta['vocab_size']} != the tokenizer's {tok.vocab_size}"
    if np.dtype(meta["dtype"]) != token_dtype(tok.vocab_size):
        return f"meta.json dtype {meta['dtype']} does not fit a vocabulary of {tok.vocab_size}"
    return None


def check_prepared(directory: Path, verify: bool = True) -> str | None:
    """None if `directory` holds a complete prepared corpus, else what is wrong with it.

    Always: meta.json is valid and the file sizes match it. With `verify`, the files are read in
    full: their checksums must match and no token id may be outside the vocabulary."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError) as e:
        return f"meta.json unreadable: {e}"
    problem = validate_meta(meta)
    if problem is not None:
        return problem
    dtype = np.dtype(meta["dtype"])
    for split in SPLITS:
        path = directory / f"{split}.bin"
        expected = meta["tokens"][split] * dtype.itemsize
        size = path.stat().st_size if path.exists() else -1
        if size != expected:
            return f"{split}.bin has {size} bytes, meta.json says {expected}"
        if verify:
            h, top = hashlib.sha256(), -1
            try:
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 22):  # a multiple of every itemsize
                        h.update(chunk)
                        top = max(top, int(np.frombuffer(chunk, dtype=dtype).max()))
            except OSError as e:
                return f"{split}.bin unreadable: {e}"
            if h.hexdigest() != meta["sha256"][split]:
                return f"{split}.bin checksum differs from meta.json"
            if top >= meta["vocab_size"]:
                return f"{split}.bin holds token id {top}, outside the vocabulary of {meta['vocab_size']}"
    return None


def load_prepared(directory: Path) -> Prepared:
    """A cache that `check_prepared` accepted (its meta.json is checked again, not trusted)."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"prepared cache {directory} is unreadable ({e}); delete it to rebuild it") from None
    problem = validate_meta(meta)
    if problem is not None:
        raise DataError(f"prepared cache {directory} is damaged ({problem}); delete it to rebuild it")
    return Prepared(directory, meta)


# -- writing --------------------------------------------------------------------------------------
class CacheWriter:
    """Builds the cache `final` in a private temporary directory; `publish` renames it into place.

    Token ids go to train.bin or val.bin as they come (`write`); leaving the `with` block without
    publishing removes the temporary directory. Filesystem faults become one FilesystemError line
    naming the cache. Temporaries of dead builders (SIGKILL, power loss) are removed on entry.
    """

    def __init__(self, final: Path, dtype: np.dtype):
        self.final = Path(final)
        self.dtype = np.dtype(dtype)
        self.tmp = temp_name(self.final, directory=True)
        self.counts = {s: 0 for s in SPLITS}
        self.hashes = {s: hashlib.sha256() for s in SPLITS}
        self.files: dict[str, Any] = {}

    def __enter__(self) -> CacheWriter:
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            remove_stale(self.final.parent)
            self.tmp.mkdir()
            self.files = {s: open(self.tmp / f"{s}.bin", "wb") for s in SPLITS}
        except OSError as e:
            self._discard()
            raise fs_error(e, self.final) from None
        return self

    def __exit__(self, *exc) -> None:
        self._discard()

    def _discard(self) -> None:
        for f in self.files.values():
            f.close()
        self.files = {}
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)

    def write(self, split: str, ids) -> None:
        data = np.asarray(ids, dtype=self.dtype).tobytes()
        try:
            self.files[split].write(data)
        except OSError as e:
            raise fs_error(e, self.final) from None
        self.hashes[split].update(data)
        self.counts[split] += len(data) // self.dtype.itemsize

    def publish(self, tokenizer: dict[str, Any], vocab_size: int, val_fraction: float,
                corpus: dict[str, Any], split: dict[str, Any], settings: dict[str, Any],
                verify: bool = True) -> Prepared:
        """Write meta.json and move the finished cache into place."""
        meta = {
            "format": FORMAT_VERSION,
            "tokenizer": tokenizer,
            "vocab_size": vocab_size,
            "dtype": self.dtype.name,
            "val_fraction": val_fraction,
            "corpus": corpus,
            "split": split,
            "settings": settings,
            "tokens": dict(self.counts),
            "sha256": {s: h.hexdigest() for s, h in self.hashes.items()},
        }
        try:
            for f in self.files.values():
                f.flush()
                os.fsync(f.fileno())
                f.close()
            self.files = {}
        except OSError as e:
            raise fs_error(e, self.final) from None
        write_json(self.tmp / "meta.json", meta)
        self._rename_into_place(verify)
        return Prepared(self.final, meta)

    def _rename_into_place(self, verify: bool) -> None:
        """If another process got there first with a valid cache, keep theirs; if what is there is
        damaged, move it aside first."""
        try:
            os.rename(self.tmp, self.final)
            return
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise fs_error(e, self.final) from None
        if check_prepared(self.final, verify=verify) is None:
            return  # a concurrent preparation won the race with identical content
        aside = temp_name(self.final, directory=True)
        try:
            os.rename(self.final, aside)
        except OSError:
            pass  # someone else moved it
        shutil.rmtree(aside, ignore_errors=True)
        try:
            os.rename(self.tmp, self.final)
        except OSError as e:
            if check_prepared(self.final, verify=verify) is not None:
                raise fs_error(e, self.final) from None
