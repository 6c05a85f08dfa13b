"""Corpus download: URL -> cache directory, verified by sha256 before use, written atomically."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from gptlab.errors import DataError

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def default_data_dir() -> Path:
    """Where corpora and prepared token files live: $GPTLAB_DATA_DIR, else ~/.cache/gptlab."""
    return Path(os.environ.get("GPTLAB_DATA_DIR") or Path.home() / ".cache" / "gptlab").expanduser()


def sha256_file(path: Path, chunk_size: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path, sha256: str | None = None, timeout: float = 30.0) -> Path:
    """Fetch `url` to `dest` unless a verified copy is there already.

    The bytes go to a temporary file beside `dest` and are renamed into place only after the
    checksum matched, so an interrupted or corrupted download never leaves a file that looks good.
    """
    dest = Path(dest)
    if dest.exists():
        if sha256 is None or sha256_file(dest) == sha256:
            return dest
        dest.unlink()  # a stale or damaged copy: fetch it again
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
                while chunk := response.read(1 << 20):
                    h.update(chunk)
                    out.write(chunk)
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise DataError(
                f"could not download {url} ({reason}). If this machine is offline, put the text file "
                f"somewhere and pass data.path=/path/to/file.txt, or place it at {dest} "
                f"(the cache directory is $GPTLAB_DATA_DIR, now {default_data_dir()})"
            ) from None
        digest = h.hexdigest()
        if sha256 is not None and digest != sha256:
            raise DataError(
                f"checksum mismatch for {url}: expected sha256 {sha256}, got {digest}; "
                f"the file was not saved"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest
