"""Pre-tokenized shards, read as they are (no re-tokenization): llm.c / modded-nanogpt `.bin` files and
nanoGPT's raw `train.bin` / `val.bin`.

llm.c's format: a header of 256 little-endian int32 (magic, version, token count, then zeros) and the
tokens right after it, nothing else: magic 20240520 version 1 holds uint16 GPT-2 tokens, magic 20240801
version 7 uint32 LLaMA-3 tokens. nanoGPT's files have no header: uint16 GPT-2 tokens, recognised by
their names `train.bin` / `val.bin`. Headers are untrusted input: a wrong magic or version, or a size
that does not match the header's count, is refused naming the file.

Windows and shard boundaries: a window (block_size + 1 tokens) lies inside one shard and never spans
two, as in llm.c's and modded-nanogpt's loaders. A shard of n tokens offers n - block_size start
offsets; a shard set offers the concatenation of its shards' (a shard of block_size tokens or fewer
offers none), and a start drawn uniformly over all of them is a window drawn uniformly over the set.

Memory stays flat for hundreds of shards: headers are read once, and a shard's tokens are
memory-mapped when a window first needs them, at most `max_open` shards at a time (the least recently
used is closed first). The largest token id of each shard is checked once against the vocabulary and
remembered in a small cache file keyed by the shard's path, size and modification time.
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptlab.errors import DataError
from gptlab.files import write_json

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
# magic -> (version, token dtype, what the tokens are)
KINDS = {20240520: (1, np.dtype("<u2"), "gpt2"), 20240801: (7, np.dtype("<u4"), "llama3")}
RAW_NAMES = ("train.bin", "val.bin")  # nanoGPT's headerless uint16 files
# shards mapped at once: FineWeb 10B's 104 files stay mapped (a map that is closed and reopened per batch
# costs more than the batch); each open map holds one file descriptor, well under the usual limit of 1024
MAX_OPEN = 256


@dataclass(frozen=True)
class Shard:
    path: Path
    kind: str  # "gpt2" | "llama3": whose tokenizer the ids belong to
    dtype: np.dtype
    offset: int  # bytes before the first token
    tokens: int


def read_header(path: str | Path) -> Shard:
    """The shard at `path`, its header checked against its size; DataError naming the file otherwise."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
    except OSError as e:
        raise DataError(f"cannot read token shard {path}: {e.strerror or e}") from None
    if len(head) == HEADER_INTS and int(head[0]) in KINDS:
        version, dtype, kind = KINDS[int(head[0])]
        if int(head[1]) != version:
            raise DataError(f"token shard {path}: version {int(head[1])}, expected {version} for magic {int(head[0])}")
        count = int(head[2])
        expected = HEADER_BYTES + count * dtype.itemsize
        if count < 0 or size != expected:
            raise DataError(f"token shard {path} is truncated or damaged: {size} bytes, its header says "
                            f"{count} tokens ({expected} bytes)")
        return Shard(path, kind, dtype, HEADER_BYTES, count)
    if path.name in RAW_NAMES:
        if size % 2:
            raise DataError(f"token file {path} has an odd size ({size} bytes): not uint16 tokens")
        return Shard(path, "gpt2", np.dtype("<u2"), 0, size // 2)
    found = int(head[0]) if len(head) else None
    raise DataError(f"token shard {path}: magic {found} is not llm.c's ({' or '.join(map(str, KINDS))}); "
                    f"headerless uint16 files must be named {' or '.join(RAW_NAMES)}")


def is_shard_path(spec: str | Path) -> bool:
    """Whether a data path names token shards: a .bin file, a glob of them, or a directory of them."""
    text = str(spec)
    if text.endswith(".bin"):
        return True
    path = Path(text).expanduser()
    return path.is_dir() and any(path.glob("*.bin"))


def shard_files(spec: str | Path | list, key: str = "data.path") -> list[Path]:
    """The files a glob, a directory (its *.bin, sorted) or a file names, or a list of these."""
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    files: list[Path] = []
    for s in specs:
        text = str(Path(str(s)).expanduser())
        if glob.has_magic(text):
            found = sorted(Path(p) for p in glob.glob(text))
            if not found:
                raise DataError(f"{key}={s}: the pattern matches no file (`python -m gptlab.data.download "
                                f"fineweb10B` fetches FineWeb's shards)")
        elif Path(text).is_dir():
            found = sorted(Path(text).glob("*.bin"))
            if not found:
                raise DataError(f"{key}={s}: the directory holds no .bin token shards")
        elif Path(text).is_file():
            found = [Path(text)]
        else:
            raise DataError(f"{key}={s}: no such file or directory")
        files += [p.resolve() for p in found]
    if not files:
        raise DataError(f"{key} names no token shards")
    return files


class TokenShards:
    """Shards seen as one source of windows: `n_starts` and `gather` as gptlab.data.datasets expects."""

    def __init__(self, files: list[Path], max_open: int = MAX_OPEN):
        self.shards = [read_header(f) for f in files]
        kinds = {s.kind for s in self.shards}
        if len(kinds) > 1:
            raise DataError(f"token shards of different kinds ({sorted(kinds)}) in {files[0].parent}")
        self.kind = kinds.pop()
        self.max_open = max_open
        self.counts = np.array([s.tokens for s in self.shards], dtype=np.int64)
        self._open: OrderedDict[int, np.memmap] = OrderedDict()
        self._cum: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return int(self.counts.sum())

    def __getstate__(self):  # dataloader workers map their own files
        return {**self.__dict__, "_open": OrderedDict()}

    def tokens(self, i: int) -> np.memmap:
        """Shard i's tokens, memory-mapped (least recently used maps are closed beyond max_open)."""
        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i]
        s = self.shards[i]
        try:
            arr = np.memmap(s.path, dtype=s.dtype, mode="r", offset=s.offset, shape=(s.tokens,))
        except (OSError, ValueError) as e:
            raise DataError(f"cannot map token shard {s.path}: {e}") from None
        self._open[i] = arr
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)  # the map closes when nothing refers to it
        return arr

    def _starts_per_shard(self, block_size: int) -> np.ndarray:
        if self._cum is None or self._cum[0] != block_size:
            self._cum = (block_size, np.cumsum(np.maximum(self.counts - block_size, 0)))
        return self._cum[1]

    def n_starts(self, block_size: int) -> int:
        cum = self._starts_per_shard(block_size)
        return int(cum[-1]) if len(cum) else 0

    def gather(self, starts: np.ndarray, block_size: int) -> np.ndarray:
        """Rows of block_size + 1 tokens (int64) for global start indices in [0, n_starts)."""
        cum = self._starts_per_shard(block_size)
        which = np.searchsorted(cum, starts, side="right")
        local = starts - np.concatenate(([0], cum))[which]
        rows = np.empty((len(starts), block_size + 1), dtype=np.int64)
        span = np.arange(block_size + 1)
        for i in np.unique(which):
            sel = which == i
            rows[sel] = self.tokens(int(i))[local[sel, None] + span]
        return rows

    def check_vocab(self, vocab_size: int, cache: Path | None) -> None:
        """DataError naming the first shard holding a token id >= vocab_size (each shard's maximum is
        read once, in blocks, and remembered in `cache`)."""
        known = _read_cache(cache)
        changed = False
        for s in self.shards:
            st = s.path.stat()
            key = hashlib.sha256(f"{s.path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]
            if key not in known:
                known[key] = _max_id(s)
                changed = True
            if known[key] >= vocab_size:
                raise DataError(f"token shard {s.path} holds token id {known[key]}, outside the tokenizer's "
                                f"vocabulary of {vocab_size}")
        if changed and cache is not None:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                write_json(cache, known)
            except Exception:
                pass  # a cache that cannot be written only costs a re-read next time


def _max_id(s: Shard) -> int:
    top = -1
    with open(s.path, "rb") as f:
        f.seek(s.offset)
        while chunk := f.read(1 << 24):  # a multiple of every itemsize
            top = max(top, int(np.frombuffer(chunk, dtype=s.dtype).max()))
    return top


def _read_cache(cache: Path | None) -> dict[str, int]:
    try:
        data = json.loads(cache.read_text()) if cache is not None else {}
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, int) and not isinstance(v, bool)}


def write_shard(path: str | Path, tokens, kind: str = "gpt2") -> Path:
    """Write `tokens` as an llm.c shard of `kind` (what llm.c's write_datafile writes)."""
    magic = next(m for m, (_, _, k) in KINDS.items() if k == kind)
    version, dtype, _ = KINDS[magic]
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = magic, version, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens).astype(dtype).tobytes())
    return Path(path)
