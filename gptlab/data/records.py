"""Corpora of records, one document per record: JSON Lines (plain, .gz, .zst), Parquet, and Hugging
Face datasets (saved with `save_to_disk`, or streamed from the hub).

Every reader streams (a line, a record batch at a time), yields each record's text field as one
document, skips empty ones, and turns bad input into one DataError line that says where it is.
`advance(n)` is told how many bytes of the source were consumed (documents, for a hub dataset),
for a progress bar.
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from gptlab.errors import DataError
from gptlab.files import json_object

Advance = Callable[[int], None]
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
BATCH_ROWS = 1024  # records per Parquet / Arrow batch


def record_format(path: Path) -> str | None:
    """The format of a file this module reads ("jsonl" or "parquet"), else None."""
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return None


def is_saved_dataset(path: Path) -> bool:
    """A directory written by `datasets.Dataset.save_to_disk` (or DatasetDict.save_to_disk)."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def _text(value: Any, where: str, field: str) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    raise DataError(f"{where}: field {field!r} holds {type(value).__name__}, not text; set data.text_field")


# -- JSON Lines -----------------------------------------------------------------------------------
def _decompressed(raw: io.BufferedReader, path: Path) -> io.BufferedIOBase:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{path}: reading .zst needs the zstandard package (pip install zstandard)") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=False))
    return raw


def _compression_errors() -> tuple[type[Exception], ...]:
    errors: list[type[Exception]] = [EOFError, gzip.BadGzipFile, zlib.error]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def read_jsonl(path: Path, field: str, advance: Advance) -> Iterator[str]:
    with open(path, "rb") as raw:
        done = 0
        try:
            for lineno, line in enumerate(_decompressed(raw, path), 1):
                if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
                    line = line[3:]  # a byte-order mark, not JSON
                if line.strip():
                    text = _record_text(line, path, lineno, field)
                    if text:
                        yield text
                if lineno % 256 == 0:
                    advance(raw.tell() - done)
                    done = raw.tell()
        except _compression_errors() as e:
            raise DataError(f"{path} is not a valid {path.suffix} file ({type(e).__name__}: {e})") from None
        advance(raw.tell() - done)


try:  # 3-5x faster than the standard library's parser, which is most of a JSONL file's reading time
    from orjson import loads as _fast_loads
except ImportError:
    _fast_loads = None


def _record_text(line: bytes, path: Path, lineno: int, field: str) -> str:
    record = None
    if _fast_loads is not None:
        try:
            record = _fast_loads(line)
        except ValueError:
            pass  # the standard parser below says exactly what is wrong
    if isinstance(record, dict) and isinstance(record.get(field), str):
        return record[field]
    where = f"{path} line {lineno}"
    record = json_object(line, where, DataError, f"an object with a {field!r} field")
    if field not in record:
        raise DataError(f"{where} has no field {field!r} (its fields: {sorted(record)}); set data.text_field")
    return _text(record[field], where, field)


# -- Parquet --------------------------------------------------------------------------------------
def _parquet_file(path: Path, field: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path} is not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise DataError(f"{path} has no column {field!r} (its columns: {names}); set data.text_field")
    kind = pf.schema_arrow.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{path}: column {field!r} is {kind}, not text; set data.text_field")
    return pf


def parquet_group_bytes(path: Path, field: str) -> list[int]:
    """The uncompressed bytes of column `field` in each row group of a Parquet file."""
    pf = _parquet_file(path, field)
    at = pf.schema_arrow.names.index(field)
    meta = pf.metadata
    return [meta.row_group(g).column(at).total_uncompressed_size for g in range(meta.num_row_groups)]


def _parquet_columns(pf, path: Path, field: str, advance: Advance, groups: list[int] | None = None) -> Iterator:
    """Column `field` of the open Parquet file `pf` at `path` (or of its row `groups`) as Arrow string
    arrays of up to BATCH_ROWS rows, each checked to be UTF-8; `advance` gets the bytes of the file
    each one stands for."""
    import pyarrow as pa

    meta = pf.metadata
    size, rows = path.stat().st_size, max(1, meta.num_rows)
    # One reader per row group: a single iter_batches over the whole file keeps Arrow memory growing
    # with every batch (pyarrow 25: +0.6 MB per 1024 rows), so peak memory grew with the file
    for group in range(meta.num_row_groups) if groups is None else groups:
        row = 0  # within the group
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[group], columns=[field], use_threads=False):
            column = batch.column(0)
            try:
                column.validate(full=True)  # Arrow does not check a string column's UTF-8 on reading
            except pa.ArrowInvalid as e:
                row += sum(meta.row_group(g).num_rows for g in range(group))  # of the file
                at = str(e).rsplit(" ", 1)[-1]
                where = f"row {row + int(at)}" if at.isdigit() else f"rows {row}-{row + len(column) - 1}"
                raise DataError(f"{path} {where}: column {field!r} is not valid UTF-8 ({e})") from None
            yield column
            row += len(column)
            advance(size * len(column) // rows)


def read_parquet(path: Path, field: str, advance: Advance, groups: list[int] | None = None) -> Iterator[str]:
    """The documents (non-empty texts) of a Parquet file, or of its row `groups`."""
    for column in _parquet_columns(_parquet_file(path, field), path, field, advance, groups):
        for text in column.to_pylist():
            if text:
                yield text


def count_parquet(path: Path, field: str, advance: Advance, workers: int = 1) -> tuple[list[int], int]:
    """(documents in each row group, characters) of what read_parquet yields, counted by Arrow (no
    Python string is made), the row groups shared among `workers` forked processes."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    groups = _parquet_file(path, field).metadata.num_row_groups
    size = path.stat().st_size
    count = partial(_count_group, path, field)
    if workers > 1 and groups > 1 and "fork" in multiprocessing.get_all_start_methods():
        with ProcessPoolExecutor(min(workers, groups), mp_context=multiprocessing.get_context("fork")) as pool:
            counts = []
            for c in pool.map(count, range(groups)):
                counts.append(c)
                advance(size // groups)
    else:
        counts = [count(g) for g in range(groups)]
        advance(size)
    return [d for d, _ in counts], sum(c for _, c in counts)


def _count_group(path: Path, field: str, group: int) -> tuple[int, int]:
    import pyarrow.compute as pc

    docs = chars = 0
    for column in _parquet_columns(_parquet_file(path, field), path, field, lambda _: None, [group]):
        lengths = pc.utf8_length(column)  # code points, as Python's len; null rows stay null
        docs += pc.sum(pc.greater(lengths, 0)).as_py() or 0
        chars += pc.sum(lengths).as_py() or 0
    return docs, chars


# -- Hugging Face datasets ------------------------------------------------------------------------
def dataset_texts(ds, field: str, where: str, advance_rows: Advance) -> Iterator[str]:
    """The texts of column `field` of a `datasets` Dataset or IterableDataset, a batch at a time;
    `advance_rows(n)` after each batch of n rows."""
    columns = ds.column_names  # None for a streamed dataset whose features the hub does not give
    if columns is not None:
        if field not in columns:
            raise DataError(f"{where} has no column {field!r} (its columns: {columns}); set data.text_field")
        ds = ds.select_columns([field])
    for batch in ds.iter(batch_size=BATCH_ROWS):
        if field not in batch:
            raise DataError(f"{where} has no column {field!r} (its columns: {sorted(batch)}); set data.text_field")
        texts = batch[field]
        for text in texts:
            text = _text(text, where, field)
            if text:
                yield text
        advance_rows(len(texts))


def read_saved_dataset(path: Path, field: str, split: str, advance: Advance) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError, ValueError, ... for a broken directory
        raise DataError(f"{path} is not a readable saved dataset ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path} has no split {split!r} (its splits: {sorted(ds)}); set data.hf_split")
        ds = ds[split]
    where = f"{path}" + (f" split {split!r}" if (path / "dataset_dict.json").is_file() else "")
    size = sum(Path(f["filename"]).stat().st_size for f in ds.cache_files)  # the Arrow files, mapped
    rows = max(1, len(ds))
    yield from dataset_texts(ds, field, where, lambda n: advance(size * n // rows))


def hub_revision(name: str) -> str:
    """The commit a hub dataset is at now (part of the cache key: a new revision prepares anew)."""
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(name).sha
    except Exception as e:
        raise DataError(
            f"could not reach the Hugging Face hub for data.hf_dataset={name!r} ({type(e).__name__}: {e}); "
            f"offline, save the dataset with save_to_disk elsewhere and point data.path at it"
        ) from None


def read_hub(name: str, config: str | None, split: str, revision: str, field: str,
             advance: Advance) -> Iterator[str]:
    """A hub dataset streamed (never downloaded whole); `advance` counts documents here."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True, revision=revision)
    except Exception as e:
        raise DataError(
            f"could not open data.hf_dataset={name!r} split {split!r} ({type(e).__name__}: {e})"
        ) from None
    yield from dataset_texts(ds, field, f"hub dataset {name!r} split {split!r}", advance)
