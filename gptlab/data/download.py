"""Corpus download: URL -> cache directory, verified by sha256 before use, written atomically.

`python -m gptlab.data.download NAME` fetches a standard pretraining corpus (gptlab.data.catalog)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
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


def download(
    url: str, dest: Path, sha256: str | None = None, timeout: float = 30.0, offline_hint: str | None = None,
    progress: bool = False,
) -> Path:
    """Fetch `url` to `dest` unless a verified copy is there already.

    `offline_hint`: what the error of an unreachable URL tells the user to do instead (default: the
    corpus's data.path); `progress`: show a progress bar while fetching.

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
            raise _unreachable(url, e, dest, offline_hint) from None
        with response, _bar(progress, dest.name, response.headers.get("Content-Length")) as advance:
            while True:
                try:
                    chunk = response.read(1 << 20)
                except (OSError, ValueError) as e:
                    raise _unreachable(url, e, dest, offline_hint) from None
                if not chunk:
                    break
                h.update(chunk)
                out.write(chunk)
                advance(len(chunk))
        digest = h.hexdigest()
        if sha256 is not None and digest != sha256:
            raise DataError(
                f"checksum mismatch for {url}: expected sha256 {sha256}, got {digest}; the file was not saved"
            )
    return dest


@contextlib.contextmanager
def _bar(show: bool, name: str, total: str | None) -> Iterator[Callable[[int], None]]:
    """A rich progress bar for a download (`advance(n_bytes)`), or nothing when `show` is false."""
    if not show:
        yield lambda n: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    columns = (TextColumn(name), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(name, total=int(total) if total and total.isdigit() else None)
        yield lambda n: bar.advance(task, n)


def _unreachable(url: str, e: Exception, dest: Path, hint: str | None = None) -> DataError:
    reason = getattr(e, "reason", e)
    hint = hint or (f"put the text file somewhere and pass data.path=/path/to/file.txt, or place it at {dest} "
                    f"(the cache directory is $GPTLAB_DATA_DIR, now {default_data_dir()})")
    return DataError(f"could not download {url} ({reason}). If this machine is offline, {hint}")


if __name__ == "__main__":
    from gptlab.data.catalog import main

    main()
