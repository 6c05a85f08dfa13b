"""Filesystem rules every gptlab writer follows: atomic writes that respect the umask, one way to
report a filesystem fault, checksums, and cleanup of what a killed process left behind.

Temporary names carry the host and pid of their writer (`.<name>.<host>-<pid>-<rand>.tmp`,
`.tmp-<name>-<host>-<pid>-<rand>`), so the next run can tell debris of a dead process from the work
of a live one, also on a directory shared by several machines.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from gptlab.errors import GptlabError

_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname() or "host")
# <host>-<pid>-<8 hex>, at the end of a temporary name (before its suffix)
_OWNER = re.compile(r"(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[0-9a-f]{8}(?:\.tmp)?$")


class FilesystemError(GptlabError):
    """A file or directory could not be written or read (disk full, read-only, permissions)."""


def fs_error(e: OSError, path: str | os.PathLike, action: str = "write") -> FilesystemError:
    """One line that names the path, what went wrong and what to do about it."""
    reason = {
        errno.ENOSPC: "no space left on the device; free some space or point the run elsewhere",
        errno.EDQUOT: "disk quota exceeded; free some space or point the run elsewhere",
        errno.EROFS: "the filesystem is read-only; choose a writable directory",
        errno.EACCES: "permission denied; choose a directory you can write",
        errno.EPERM: "operation not permitted; choose a directory you can write",
    }.get(e.errno, e.strerror or str(e))
    return FilesystemError(f"cannot {action} {path}: {reason}")


def owner_tag() -> str:
    """`<host>-<pid>-<random>`: the part of a temporary name that identifies its writer."""
    return f"{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def temp_name(final: str | os.PathLike, directory: bool = False) -> Path:
    """A temporary sibling of `final`, hidden and tagged with its owner."""
    final = Path(final)
    if directory:
        return final.parent / f".tmp-{final.name}-{owner_tag()}"
    return final.parent / f".{final.name}.{owner_tag()}.tmp"


def owner_gone(name: str) -> bool:
    """True if `name` carries the owner tag of a process on this host that has exited."""
    m = _OWNER.search(name)
    if m is None or m["host"] != _HOST:
        return False  # not ours to judge: another machine's, or not a tagged name
    pid = int(m["pid"])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def remove_stale(directory: str | os.PathLike, patterns: tuple[str, ...] = (".tmp-*", ".*.tmp")) -> list[Path]:
    """Remove temporary files and directories under `directory` whose writer process has died."""
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for pattern in patterns:
        for p in directory.glob(pattern):
            if owner_gone(p.name):
                with contextlib.suppress(OSError):
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                    removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", what: str = "write") -> Iterator[IO[Any]]:
    """Write `path` through a temporary sibling that is fsynced and renamed into place: readers see
    the old file or the whole new one, never a part. The file gets the umask's mode (as `open` would
    give it), and any OSError becomes one FilesystemError line naming `path`."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise fs_error(e, path, what) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2)


def json_object(raw: bytes | str, where: str, error: type[GptlabError], what: str = "a JSON object") -> dict[str, Any]:
    """`raw` parsed as a JSON object, or one `error` line: `where` is not UTF-8 / not JSON / not an object."""
    try:
        obj = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except UnicodeDecodeError as e:
        raise error(f"{where} is not valid UTF-8 (byte {e.start})") from None
    except ValueError as e:
        raise error(f"{where} is not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise error(f"{where} is a JSON {type(obj).__name__}, not {what}") from None
    return obj


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def check_writable(directory: str | os.PathLike, key: str) -> None:
    """Create `directory` and probe that it can be written; `key` is the setting that chooses it."""
    directory = Path(directory)
    probe = directory / f".gptlab-write-test-{owner_tag()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as e:
        err = fs_error(e, directory)
        raise FilesystemError(f"{err}; set {key}=<writable dir>") from None
