"""Corpus download: URL -> cache directory, verified by sha256 before use, written atomically.

`python -m gptlab.data.download NAME` fetches a standard pretraining corpus (gptlab.data.catalog)."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from gptlab.errors import DataError
from gptlab.files import atomic_write, fs_error, remove_stale, sha256_file

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def default_data_dir() -> Path:
    """Where corpora and prepared token files live: $GPTLAB_DATA_DIR, else ~/.cache/gptlab."""
    return Path(os.environ.get("GPTLAB_DATA_DIR") or Path.home() / ".cache" / "gptlab").expanduser()


def download(url: str, dest: Path, sha256: str | None = None, timeout: float = 30.0) -> Path:
    """Fetch `url` to `dest` unless a verified copy is there already.

    The bytes go to a temporary file beside `dest` (gptlab.files.atomic_write) and are renamed into
    place only after the checksum matched, so an interrupted or corrupted download never leaves a file
    that looks good; the temporaries of killed downloads are removed by the next one.
    """
    dest = Path(dest)
    if dest.exists():
        if sha256 is None or sha256_file(dest) == sha256:
            return dest
        try:
            dest.unlink()  # a stale or damaged copy: fetch it again
        except OSError as e:
            raise fs_error(e, dest, "replace") from None
    remove_stale(dest.parent)
    h = hashlib.sha256()
    with atomic_write(dest, "wb", what="save the download to") as out:
        # Network faults are DataErrors raised here; a fault writing `out` (disk full, read-only) is
        # an OSError that atomic_write reports as a FilesystemError naming `dest`.
        try:
            response = urllib.request.urlopen(url, timeout=timeout)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise _unreachable(url, e, dest) from None
        with response:
            while True:
                try:
                    chunk = response.read(1 << 20)
                except (OSError, ValueError) as e:
                    raise _unreachable(url, e, dest) from None
                if not chunk:
                    break
                h.update(chunk)
                out.write(chunk)
        digest = h.hexdigest()
        if sha256 is not None and digest != sha256:
            raise DataError(
                f"checksum mismatch for {url}: expected sha256 {sha256}, got {digest}; the file was not saved"
            )
    return dest


def _unreachable(url: str, e: Exception, dest: Path) -> DataError:
    reason = getattr(e, "reason", e)
    return DataError(
        f"could not download {url} ({reason}). If this machine is offline, put the text file "
        f"somewhere and pass data.path=/path/to/file.txt, or place it at {dest} "
        f"(the cache directory is $GPTLAB_DATA_DIR, now {default_data_dir()})"
    )


if __name__ == "__main__":
    from gptlab.data.catalog import main

    main()
