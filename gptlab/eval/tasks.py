"""Evaluation tasks: the built-in ones, the file formats a task may come in, and reading a file into items.

A task file is JSON Lines, one item a line, in one of these formats (told apart by their keys):

    hellaswag  {"ctx_a", "ctx_b", "ctx", "activity_label", "endings": [4 strings], "label"}   (official file)
    choice     {"context": str, "choices": [str, ...], "label": int}                         (bring your own)
    lambada    {"text": str}: the last space-separated word is the target                    (official file)
    cloze      {"context": str, "target": str}

`hellaswag` and `choice` are multiple choice (metrics acc, acc_norm); `lambada` and `cloze` are
last-word cloze (acc, perplexity). Continuations are scored as the harness scores them: the context,
then `target_delimiter` (" ") and the choice. The built-in `hellaswag` prepares its items as the
harness's hellaswag task (activity label, ctx_a + capitalised ctx_b, its bracket clean-up);
`hellaswag_style=nanogpt` takes build-nanogpt's completion style instead (the raw `ctx`, each ending
tokenized on its own, acc_norm divided by the ending's token count). Built-in files are downloaded
once into $GPTLAB_DATA_DIR/eval/ (gptlab.data.download) and checked against their sha256.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptlab.data.download import default_data_dir, download
from gptlab.errors import ConfigError, DataError
from gptlab.files import sha256_file

CHOICE, CLOZE = "choice", "cloze"  # the two kinds of task
STYLES = ("harness", "nanogpt")


@dataclass(frozen=True)
class Source:
    """A built-in task's official file."""

    url: str
    file: str
    format: str
    sha256: str


BUILTIN = {
    "hellaswag": Source("https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
                        "hellaswag_val.jsonl", "hellaswag",
                        "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"),
    "lambada": Source("https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl",
                      "lambada_test.jsonl", "lambada",
                      "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226"),
}


@dataclass
class Item:
    """One item: a context and its candidate continuations (a cloze item has one, the target)."""

    context: str
    choices: list[str]  # without the delimiter
    label: int = 0


@dataclass
class Task:
    name: str
    kind: str  # CHOICE or CLOZE
    items: list[Item]
    style: str = "harness"  # harness: whole-string encoding, acc_norm per character; nanogpt: see above
    delimiter: str = " "

    def continuation(self, choice: str) -> str:
        return self.delimiter + choice


def _bracket_clean(text: str) -> str:
    """The harness's hellaswag clean-up (WikiHow's bracketed markers are artefacts of the data)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _label(value: Any, n: int, where: str) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise DataError(f"{where}: label {value!r} is not an integer")
    if not 0 <= value < n:
        raise DataError(f"{where}: label {value} is out of range for {n} choices (0..{n - 1})")
    return value


def _strings(row: dict, key: str, where: str, least: int = 1) -> list[str]:
    value = row.get(key)
    if not isinstance(value, list) or len(value) < least or not all(isinstance(v, str) and v for v in value):
        raise DataError(f"{where}: '{key}' must be a list of at least {least} non-empty strings")
    return value


def _string(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' must be a string")
    return value


def hellaswag_item(row: dict, where: str, style: str = "harness") -> Item:
    endings = _strings(row, "endings", where, 2)
    label = _label(row.get("label"), len(endings), where)
    if style == "nanogpt":  # build-nanogpt: the raw context and endings
        return Item(_string(row, "ctx", where), endings, label)
    ctx = _string(row, "ctx_a", where) + " " + _string(row, "ctx_b", where).capitalize()
    query = _bracket_clean(_string(row, "activity_label", where) + ": " + ctx)
    return Item(query, [_bracket_clean(e) for e in endings], label)


def lambada_item(row: dict, where: str) -> Item:
    words = _string(row, "text", where).split(" ")
    if len(words) < 2 or not words[-1]:
        raise DataError(f"{where}: 'text' needs at least two space-separated words, the last one the target")
    return Item(" ".join(words[:-1]), [words[-1]])


def choice_item(row: dict, where: str) -> Item:
    choices = _strings(row, "choices", where, 2)
    return Item(_string(row, "context", where), choices, _label(row.get("label"), len(choices), where))


def cloze_item(row: dict, where: str) -> Item:
    target = _string(row, "target", where)
    if not target.strip():
        raise DataError(f"{where}: 'target' is empty")
    return Item(_string(row, "context", where), [target])


# format -> (the keys that identify it, the kind of task)
FORMATS = {
    "hellaswag": (("ctx_a", "ctx_b", "endings", "label"), CHOICE),
    "choice": (("context", "choices", "label"), CHOICE),
    "lambada": (("text",), CLOZE),
    "cloze": (("context", "target"), CLOZE),
}


def detect(row: dict, where: str) -> str:
    for name, (keys, _) in FORMATS.items():
        if all(k in row for k in keys):
            return name
    formats = "; ".join(f"{name}: {', '.join(keys)}" for name, (keys, _) in FORMATS.items())
    raise DataError(f"{where}: not a task item (keys {sorted(row)}); a line needs the keys of one format ({formats})")


def read_items(path: Path, fmt: str | None = None, style: str = "harness", limit: int | None = None
               ) -> tuple[str, list[Item]]:
    """(format, items) of the JSONL task file `path`: its first `limit` items (all for None)."""
    items: list[Item] = []
    try:
        lines = path.open(encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read the task file {path}: {e.strerror}") from None
    with lines:
        for number, line in enumerate(lines, 1):
            if limit is not None and len(items) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(f"{where}: not JSON ({e})") from None
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text (byte {e.start})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: a JSON {type(row).__name__}, not an object")
            fmt = fmt or detect(row, where)
            if not all(k in row for k in FORMATS[fmt][0]):
                raise DataError(f"{where}: lacks key(s) {[k for k in FORMATS[fmt][0] if k not in row]} of the "
                                f"{fmt} format of the file's first item")
            if fmt == "hellaswag":
                items.append(hellaswag_item(row, where, style))
            else:
                items.append({"choice": choice_item, "lambada": lambada_item, "cloze": cloze_item}[fmt](row, where))
    if not items:
        raise DataError(f"the task file {path} holds no items")
    return fmt, items


def task_file(name: str, fetch: bool = True, data_dir: str | Path | None = None) -> Path:
    """The local copy of built-in task `name`'s official file, downloaded on first use."""
    source = BUILTIN[name]
    dest = Path(data_dir or default_data_dir()).expanduser() / "eval" / source.file
    hint = f"download {source.url} and put it at {dest}"
    if not fetch:
        if not dest.is_file():
            raise DataError(f"the {name} task file is missing and download=false: {hint}")
        if sha256_file(dest) != source.sha256:
            raise DataError(f"{dest} is not the official {name} file (sha256 differs); delete it, or {hint}")
        return dest
    return download(source.url, dest, source.sha256, offline_hint=hint, progress=True)


def load_task(spec: str, limit: int | None = None, style: str = "harness", fetch: bool = True,
              data_dir: str | Path | None = None) -> Task:
    """A task by name (a built-in) or by the path of a JSONL file in one of the formats above."""
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0):
        raise ConfigError(f"limit={limit!r}: must be a positive number of items, or null for all")
    if style not in STYLES:
        raise ConfigError(f"hellaswag_style={style!r}: choose one of {', '.join(STYLES)}")
    spec = str(spec)
    if spec in BUILTIN:
        path, fmt, name = task_file(spec, fetch, data_dir), BUILTIN[spec].format, spec
    elif spec.endswith((".jsonl", ".json")) or "/" in spec:
        path, fmt, name = Path(spec).expanduser(), None, Path(spec).stem
        if not path.is_file():
            raise DataError(f"task file not found: {path}")
    else:
        raise ConfigError(f"unknown task {spec!r}; known tasks: {', '.join(BUILTIN)}, or the path of a .jsonl "
                          f"task file (formats: {', '.join(FORMATS)})")
    fmt, items = read_items(path, fmt, style, limit)
    task_style = style if fmt == "hellaswag" else "harness"
    return Task(name, FORMATS[fmt][1], items, task_style)
