"""`python -m gptlab.data.download NAME [--shards N] [--dir DIR]`: fetch a standard pretraining corpus.

    fineweb10B    FineWeb 10B in GPT-2 tokens as modded-nanogpt publishes them (kjj0/fineweb10B-gpt2):
                  the validation shard and the first N of 103 train shards (~100M tokens, 200 MB each)
    fineweb-edu   FineWeb-Edu's 10B-token sample (HuggingFaceFW/fineweb-edu sample/10BT): the first N
                  of its 14 Parquet files
    openwebtext   OpenWebText (Skylion007/openwebtext, the Hub's Parquet conversion): the first N files
    tinystories   TinyStories V2 (roneneldan/TinyStories): the train and validation text files

Files go to DIR/NAME (DIR: $GPTLAB_DATA_DIR or ~/.cache/gptlab), where conf/data/fineweb10B.yaml looks.
A download goes to NAME.part first and resumes from there (an HTTP Range request) when run again; a
file is renamed into place only once checked: token shards by their header (llm.c's header states the
token count, so a cut file is caught), and by the sha256 the publisher states: the Hugging Face Hub
gives each file it stores in LFS (every file above) as the `X-Linked-Etag` of its redirect to storage.
Offline, one line says which files to fetch and where to put them.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from gptlab.data.download import default_data_dir
from gptlab.data.shards import read_header
from gptlab.errors import DataError, exit_on_user_error
from gptlab.files import fs_error

HF = "https://huggingface.co/datasets"


@dataclass(frozen=True)
class Entry:
    base: str  # URL prefix
    first: tuple[str, ...]  # always fetched
    pattern: str | None  # the numbered files: pattern % i for i in range(start, start + n)
    start: int
    available: int | None  # how many numbered files the publisher has (None: not stated)
    default: int | None  # how many to fetch without --shards (None: all)
    use: str  # how to train on it


CATALOG = {
    "fineweb10B": Entry(f"{HF}/kjj0/fineweb10B-gpt2/resolve/main/", ("fineweb_val_000000.bin",),
                        "fineweb_train_%06d.bin", 1, 103, None, "data=fineweb10B (or experiment=gpt2_124m_fineweb)"),
    "fineweb-edu": Entry(f"{HF}/HuggingFaceFW/fineweb-edu/resolve/main/sample/10BT/", (), "%03d_00000.parquet", 0, 14,
                         1, "data=text data.path={dir}"),
    "openwebtext": Entry(f"{HF}/Skylion007/openwebtext/resolve/refs%2Fconvert%2Fparquet/plain_text/train/", (),
                         "%04d.parquet", 0, None, 1, "data=text data.path={dir}"),
    "tinystories": Entry(f"{HF}/roneneldan/TinyStories/resolve/main/",
                         ("TinyStoriesV2-GPT4-valid.txt", "TinyStoriesV2-GPT4-train.txt"), None, 0, 0, 0,
                         "data=text data.path={dir}/TinyStoriesV2-GPT4-train.txt"),
}


def files_of(entry: Entry, shards: int | None) -> list[str]:
    n = shards if shards is not None else entry.default if entry.default is not None else entry.available
    if entry.pattern is None or not n:
        return list(entry.first)
    if entry.available is not None and n > entry.available:
        raise DataError(f"--shards {n}: the publisher has {entry.available}")
    return [*entry.first, *(entry.pattern % i for i in range(entry.start, entry.start + n))]


def check_file(path: Path, sha256: str | None, shard: bool) -> None:
    """DataError if the finished download `path` is not what it should be."""
    if shard:
        read_header(path)  # the size must match the header's token count
    if sha256 is not None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        if h.hexdigest() != sha256:
            raise DataError(f"{path}: sha256 {h.hexdigest()}, the publisher states {sha256}")


class _StatedChecksum(urllib.request.HTTPRedirectHandler):
    """Follows redirects, keeping the sha256 a Hugging Face Hub redirect states for the file it leads to
    (`X-Linked-Etag: "<sha256>"`, which huggingface_hub reads too; other ETags are not checksums)."""

    sha256: str | None = None

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        stated = (headers.get("X-Linked-Etag") or "").strip('"')
        if re.fullmatch(r"[0-9a-f]{64}", stated):
            self.sha256 = stated
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch(url: str, dest: Path, sha256: str | None = None, timeout: float = 60.0, progress: bool = True) -> Path:
    """`url` to `dest` through `dest`.part, resuming a part left by an interrupted run; the finished file is
    checked (check_file: against `sha256`, else the one the server states) before it is renamed into
    place. A complete `dest` is left alone."""
    if dest.exists():
        return dest
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    stated = _StatedChecksum()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            response = urllib.request.build_opener(stated).open(request, timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code != 416 or not have:  # 416: nothing left after `have` bytes: the part is whole
                raise
            response = None
        if response is not None:
            with response:
                resumed = have and response.status == 206
                size = response.headers.get("Content-Length")
                total = (have if resumed else 0) + int(size) if size else None
                _copy(response, part, "ab" if resumed else "wb", have if resumed else 0, total, dest.name, progress)
    except OSError as e:  # URLError, timeouts, connection resets are OSErrors too
        if isinstance(e, (urllib.error.URLError, TimeoutError, ConnectionError)):
            raise DataError(f"could not download {url} ({getattr(e, 'reason', e)})") from None
        raise fs_error(e, part) from None
    try:
        check_file(part, sha256 or stated.sha256, shard=dest.suffix == ".bin")
    except DataError as e:
        part.unlink(missing_ok=True)  # a damaged whole: start afresh next time
        raise DataError(f"{e}; removed it, run again to fetch it anew") from None
    os.replace(part, dest)
    return dest


def _copy(response, part: Path, mode: str, done: int, total: int | None, name: str, progress: bool) -> None:
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    bar = Progress("{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                   disable=not (progress and sys.stderr.isatty()))
    with bar, open(part, mode) as out:
        task = bar.add_task(name, total=total, completed=done)
        while chunk := response.read(1 << 20):
            out.write(chunk)
            bar.advance(task, len(chunk))


def download_corpus(name: str, shards: int | None = None, root: Path | None = None, progress: bool = True,
                    catalog: dict[str, Entry] = CATALOG) -> Path:
    """Fetch the catalog's corpus `name` into root/name; its directory."""
    if name not in catalog:
        raise DataError(f"unknown corpus {name!r}; choose one of {list(catalog)}")
    entry = catalog[name]
    target = Path(root or default_data_dir()).expanduser() / name
    files = files_of(entry, shards)
    for i, file in enumerate(files):
        if progress:
            print(f"[gptlab] {name}: {file} ({i + 1}/{len(files)})", flush=True)
        try:
            fetch(entry.base + file, target / file, progress=progress)
        except DataError as e:
            if "could not download" not in str(e):
                raise
            missing = [f for f in files if not (target / f).exists()]
            raise DataError(f"{e}. Offline: fetch {entry.base}<file> for {len(missing)} file(s) ({_span(missing)}) "
                            f"on a machine with network access and put them in {target}/") from None
    return target


def _span(files: list[str]) -> str:
    return ", ".join(files) if len(files) <= 3 else f"{files[0]}, {files[1]}, ... {files[-1]}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gptlab.data.download",
                                     description="Fetch a standard pretraining corpus (resumable).",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("name", choices=list(CATALOG))
    parser.add_argument("--shards", type=int, default=None, help="the first N numbered files (default: see below)")
    parser.add_argument("--dir", default=None, help="the data directory (default: $GPTLAB_DATA_DIR or ~/.cache/gptlab)")
    args = parser.parse_args(argv)
    if args.shards is not None and args.shards < 1:
        parser.error("--shards must be at least 1")

    def go() -> None:
        target = download_corpus(args.name, args.shards, Path(args.dir) if args.dir else None)
        print(f"[gptlab] {args.name} is in {target}; train on it with "
              f"{CATALOG[args.name].use.format(dir=target)}")

    exit_on_user_error(go)
