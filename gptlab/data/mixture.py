"""The sources a TokenDataModule trains on: one corpus, token shards, or a weighted mixture of named
sources (`data.mix`), each any format gptlab reads, all in one tokenizer.

    data.mix:
      web:  {path: /data/fineweb/fineweb_train_*.bin, val_path: /data/fineweb/fineweb_val_000000.bin, weight: 0.7}
      code: {path: /data/code.jsonl, weight: 0.3, text_field: content}

A text source is tokenized and cached as a single corpus is (its own validation split, data.val_fraction);
a shard source is read as it is and needs `val_path`. Batch k draws each window's source by weight
and its start within that source from (seed, rank, k) (gptlab.data.datasets.TrainBatches), so ranks
draw different windows and a resume replays the same ones. Validation holds data.val_windows windows
of every source: val/loss is their mean over all sources, val/loss/<name> each source's own. A weight
is one override: `-m data.mix.code.weight=0.1,0.3`; weights need not sum to 1 (they are normalised).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gptlab.data.cache import Prepared
from gptlab.data.corpus import Corpus
from gptlab.data.shards import TokenShards, is_shard_path, shard_files
from gptlab.data.tokenizers import tokenizer_from_state
from gptlab.errors import ConfigError, DataError

SOURCE_KEYS = ("path", "val_path", "weight", "text_field")
SHARD_TOKENIZER = {"gpt2": {"kind": "bpe", "encoding": "gpt2"}}


@dataclass
class Source:
    name: str
    weight: float
    train: Any  # a token memmap or TokenShards
    val: Any
    prepared: Prepared | None = None  # the cache of a corpus source


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def mix_entries(mix: Any) -> list[tuple[str, dict[str, Any]]]:
    """(name, settings) of every source of `data.mix`, checked; ConfigError naming the key otherwise."""
    if not isinstance(mix, dict) or not mix:
        raise ConfigError(f"data.mix={mix!r}: a mapping of source names to {{path: ..., weight: ...}}")
    entries = []
    named = sorted(n for n, e in mix.items() if isinstance(e, dict) and e.get("path") is not None)
    for name, entry in mix.items():
        key = f"data.mix.{name}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{key}={entry!r}: a mapping with path and weight")
        unknown = sorted(set(entry) - set(SOURCE_KEYS))
        if unknown:
            raise ConfigError(f"{key}: unknown key(s) {unknown}; a source takes {list(SOURCE_KEYS)}")
        if entry.get("path") is None:
            raise ConfigError(f"{key} has no path: not one of the mixture's sources {named} (a misspelt name?)")
        entry = {"weight": 1.0, "val_path": None, "text_field": None, **entry}
        if not is_number(entry["weight"]):
            raise ConfigError(f"{key}.weight={entry['weight']!r}: must be a number > 0")
        entries.append((str(name), entry))
    if all(e["weight"] == 0 for _, e in entries):
        raise ConfigError("data.mix: every weight is 0; give at least one source a weight > 0")
    for name, entry in entries:
        if entry["weight"] <= 0:
            raise ConfigError(f"data.mix.{name}.weight={entry['weight']}: must be > 0 (remove the source to leave it out)")
    return entries


def _shard_source(dm, name: str, path: Any, val_path: Any, key: str) -> Source:
    train = TokenShards(shard_files(path, f"{key}.path" if key != "data" else "data.path"))
    if val_path is None:
        raise ConfigError(f"{key}.val_path is not set: token shards need a validation set (e.g. "
                          f"fineweb_val_000000.bin); name its shard(s) there")
    val = TokenShards(shard_files(val_path, f"{key}.val_path"))
    for shards in (train, val):
        wanted = SHARD_TOKENIZER.get(shards.kind)
        if wanted is None:
            raise DataError(f"{shards.shards[0].path} holds {shards.kind} tokens; gptlab has no {shards.kind} "
                            f"tokenizer (GPT-2 shards are read with data.tokenizer=bpe data.encoding=gpt2)")
        if dm.tokenizer_spec != wanted:
            raise ConfigError(f"{shards.shards[0].path} holds {shards.kind} tokens but data.tokenizer is "
                              f"{dm.tokenizer_spec}; set data.tokenizer=bpe data.encoding=gpt2")
    if dm.verify:
        vocab = tokenizer_from_state(dm.tokenizer_spec).vocab_size
        for shards in (train, val):
            shards.check_vocab(vocab, dm.data_dir / "shards" / "max_ids.json")
    return Source(name, 1.0, train, val)


def shard_paths(path: Any) -> bool:
    paths = [path] if isinstance(path, (str, Path)) else list(path or [])
    return bool(paths) and all(is_shard_path(p) for p in paths)


def build_sources(dm) -> list[Source]:
    """The training sources of the data module `dm` (its settings checked; one source unless data.mix)."""
    if dm.mix is None:
        if shard_paths(dm.raw_path):
            return [_shard_source(dm, "data", dm.raw_path, dm.val_path, "data")]
        if dm.val_path is not None:
            raise ConfigError("data.val_path applies to token shards; a corpus is split by data.val_fraction")
        prepared = dm.prepare()
        return [Source("data", 1.0, prepared.tokens("train"), prepared.tokens("val"), prepared)]
    if dm.raw_path is not None or dm.hf_dataset is not None:
        raise ConfigError("data.mix names every source; leave data.path and data.hf_dataset unset (null)")
    if dm.tokenizer_spec.get("kind") != "bpe":
        raise ConfigError(f"data.mix needs one fixed vocabulary for all sources: data.tokenizer=bpe "
                          f"(not {dm.tokenizer_spec.get('kind')}, whose vocabulary depends on the corpus)")
    sources = []
    for name, entry in mix_entries(dm.mix):
        key = f"data.mix.{name}"
        if shard_paths(entry["path"]):
            source = _shard_source(dm, name, entry["path"], entry["val_path"], key)
        else:
            if entry["val_path"] is not None:
                raise ConfigError(f"{key}.val_path applies to token shards; a corpus is split by data.val_fraction")
            paths = entry["path"] if isinstance(entry["path"], list) else [entry["path"]]
            corpus = Corpus([Path(str(p)).expanduser().resolve() for p in paths],
                            text_field=entry["text_field"] or dm.text_field)
            prepared = dm.prepare(corpus)
            source = Source(name, 1.0, prepared.tokens("train"), prepared.tokens("val"), prepared)
        source.weight = float(entry["weight"])
        sources.append(source)
    return sources


def check_sizes(sources: list[Source], block_size: int) -> None:
    """DataError for a source too small for one window of block_size + 1 tokens in either split."""
    for s in sources:
        for split, tokens in (("training", s.train), ("validation", s.val)):
            n = tokens.n_starts(block_size) if hasattr(tokens, "n_starts") else len(tokens) - block_size
            if n < 1:
                where = "" if s.name == "data" else f" of source {s.name!r}"
                raise DataError(
                    f"block_size={block_size} is larger than the {split} split{where} ({len(tokens)} tokens); "
                    f"lower model.block_size or use a bigger corpus / data.val_fraction"
                )


class SourceCounts:
    """Tokens drawn from each source over all ranks: a pure function of the sampler, added up batch by
    batch (every rank adds every rank's draws, so all ranks hold the same counts with no communication)."""

    def __init__(self, sources: list[Source]):
        self.names = [s.name for s in sources]
        self.sizes = np.array([len(s.train) for s in sources], dtype=np.float64)
        self.tokens = np.zeros(len(sources), dtype=np.int64)

    def add(self, sampler, k: int) -> None:
        for rank in range(sampler.world_size):
            self.tokens += np.bincount(sampler.picks(k, rank), minlength=len(self.names)) * sampler.block_size

    def metrics(self) -> dict[str, float]:
        out = {}
        for i, name in enumerate(self.names):
            out[f"train/tokens/{name}"] = float(self.tokens[i])
            out[f"train/epochs/{name}"] = float(self.tokens[i] / self.sizes[i])
        return out
