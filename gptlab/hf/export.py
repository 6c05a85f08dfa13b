"""Writing a Hugging Face model directory, all or nothing (what goes in it: gptlab.hf.convert).

Every file is written into a hidden staging directory first (`.tmp-<name>-<host>-<pid>-...`, beside a
new directory or inside an existing one), fsynced, and only then moved into place: a new directory
is one rename, an existing one gets each file by `os.replace`. A full disk, a read-only filesystem
or a crash while writing leaves the target as it was (and `gptlab.files.remove_stale` clears a
dead writer's staging directory).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from gptlab.errors import ConfigError
from gptlab.files import fs_error, remove_stale, temp_name
from gptlab.hf.tokenizer import HF_TOKENIZER_FILES, TOKENIZER_FILE

WEIGHTS_FILE = "model.safetensors"
# files an export owns: written now, or removed when an earlier export into the same directory wrote them
EXPORT_FILES = ("config.json", "generation_config.json", WEIGHTS_FILE, TOKENIZER_FILE, *HF_TOKENIZER_FILES)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _made_parents(directory: Path) -> list[Path]:
    """Create the missing parents of `directory`; returns them, deepest first (to undo)."""
    missing = [p for p in directory.parents if not p.exists()]
    directory.parent.mkdir(parents=True, exist_ok=True)
    return missing


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A staging directory whose files land in `out` when the block succeeds.

    An OSError anywhere becomes one FilesystemError line naming the file under `out`; on any
    failure the staging directory and the parents this call created are removed."""
    made: list[Path] = []
    # inside an existing directory (the same filesystem as its files, even if it is a mount point), else beside it
    stage = temp_name(out / "export", directory=True) if out.is_dir() else temp_name(out, directory=True)

    def final(e: OSError) -> Path:
        name = Path(str(e.filename)) if e.filename else None
        if name is not None and stage in (name, *name.parents):
            return out / name.relative_to(stage)
        return out

    try:
        made = _made_parents(out)
        remove_stale(stage.parent)
        stage.mkdir()
        yield stage
        for file in stage.iterdir():
            _fsync(file)
        if stage.parent == out:
            written = sorted(p.name for p in stage.iterdir())
            for name in written:
                os.replace(stage / name, out / name)
            for name in set(EXPORT_FILES) - set(written):  # an earlier export's files that this one lacks
                with contextlib.suppress(FileNotFoundError):
                    (out / name).unlink()
            stage.rmdir()
        else:
            os.rename(stage, out)
        with contextlib.suppress(OSError):
            _fsync(out.parent)
    except OSError as e:
        raise fs_error(e, final(e), "write") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        for parent in made:
            with contextlib.suppress(OSError):
                parent.rmdir()  # only if still empty, i.e. the export failed


def _write(path: Path, data: str | bytes) -> None:
    try:
        with open(path, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
    except OSError as e:  # a failed write() names no file; the message should
        raise OSError(e.errno, e.strerror, str(path)) from None


def write_directory(
    out_dir: str | os.PathLike, files: dict[str, str | bytes], more: Callable[[Path], None] | None = None
) -> tuple[Path, list[str]]:
    """Write `files` (name -> text or bytes), and what `more(staging_dir)` writes, into `out_dir`,
    all or nothing. Returns (directory, the names of its files)."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory; give the directory to export into")
    with staged(out) as stage:
        for name, data in files.items():
            _write(stage / name, data)
        if more is not None:
            more(stage)
        names = sorted(p.name for p in stage.iterdir())
    return out, names
