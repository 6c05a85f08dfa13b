"""One LightningDataModule for every corpus (text, JSONL, Parquet, datasets) and tokenizer (char,
word, BPE, a BPE trained on the corpus): both are config values."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import lightning as L
from omegaconf import OmegaConf
from torch.utils.data import ConcatDataset, DataLoader

from gptlab.data.corpus import Corpus
from gptlab.data.datasets import FixedWindows, Sampler, TrainBatches
from gptlab.data.download import TINY_SHAKESPEARE_SHA256, TINY_SHAKESPEARE_URL, default_data_dir, download
from gptlab.data.mixture import SourceCounts, build_sources, check_sizes
from gptlab.data.prepare import Prepared, ValFraction, check_separator, prepare_corpus
from gptlab.data.tokenizers import TokenizerKind, tokenizer_from_state
from gptlab.data.trained_bpe import check_bpe_training
from gptlab.errors import ConfigError
from gptlab.files import FilesystemError
from gptlab.schema import Positive, Range, Say, check_args

# The settings that data.block_size mirrors: the model's context is chosen in the model group.
_KEY = {"block_size": "model.block_size"}


def _check_settings(s: dict[str, Any]) -> None:
    """ConfigError naming the key for a value the data module cannot use: what its signature declares,
    then the rules between settings."""
    check_args(TokenDataModule, s, prefix="data.", keys=_KEY)

    def bad(name: str, why: str) -> ConfigError:
        return ConfigError(f"data.{name}={s[name]!r}: {why}")

    if s["tokenizer"] == "bpe_train":
        check_bpe_training(s["vocab_size"], s["special_tokens"])
    for name in ("text_field", "hf_split"):
        if not s[name]:
            raise bad(name, "must be a column name")
    check_separator(s["separator"], s["tokenizer"])
    if s["path"] is not None and not s["path"]:
        raise bad("path", "an empty list; name at least one file or directory")
    if s["mix"] is not None and s["sampler"] != "random":
        raise bad("sampler", "a mixture (data.mix) draws random windows; use data.sampler=random")
    if not s["encoding"]:
        raise bad("encoding", "must be the name of a tiktoken encoding, e.g. gpt2")


class TokenDataModule(L.LightningDataModule):
    """Random (or sliding) training windows and a fixed validation set over a prepared corpus, token
    shards, or a weighted mixture of sources (gptlab.data.mixture).

    Args:
        path: a corpus file (.txt: one document; .jsonl, .jsonl.gz, .jsonl.zst, .parquet: one
            document per record), a directory of them (sorted order), a dataset saved with
            `datasets` save_to_disk, or a list of these; None (and no hf_dataset) downloads `url`.
            Or token shards (gptlab.data.shards): .bin files, a glob or a directory of them.
        val_path: the validation shard(s) of token shards, used as they are.
        mix: {name: {path, weight, val_path, text_field}}: a weighted mixture of sources (path unset).
        url, sha256: where the default corpus comes from and its checksum (tiny Shakespeare).
        data_dir: cache for downloads and prepared token files (None: $GPTLAB_DATA_DIR or ~/.cache/gptlab).
        text_field: the record field / column that holds the text.
        hf_dataset, hf_config, hf_split: a Hugging Face hub dataset, streamed (hf_split also picks the
            split of a saved DatasetDict).
        tokenizer: "char", "word", "bpe" (tiktoken `encoding`) or "bpe_train" (a byte-level BPE of
            `vocab_size` tokens with `special_tokens`, trained on the training split).
        separator: the text between documents for char/word (default: a newline / <|endoftext|>).
        block_size: tokens per window (the model's context).
        batch_size: windows per batch on each device.
        val_fraction: share held out for validation: of the documents (drawn with `split_seed`), or
            of the characters (the end of the text) for a single document.
        val_windows: number of fixed validation windows (spread evenly over the validation split).
        sampler: "random" windows or "sliding" windows with `stride`.
        seed: seeds the training windows (with the rank and the batch index).
        num_workers: dataloader worker processes.
        prepare_workers: processes encoding the corpus (None: one per CPU, at most 8).
        verify: check the checksums of a cached preparation before using it.
    """

    def __init__(
        self, path: str | os.PathLike | list[str] | None = None, val_path: str | list[str] | None = None,
        mix: dict[str, Any] | None = None, url: str | None = TINY_SHAKESPEARE_URL,
        sha256: str | None = TINY_SHAKESPEARE_SHA256, data_dir: str | None = None, text_field: str = "text",
        hf_dataset: str | None = None, hf_config: str | None = None, hf_split: str = "train",
        tokenizer: TokenizerKind = "char", encoding: str = "gpt2", vocab_size: int = 8192,
        special_tokens: list[str] | None = None, separator: str | None = None,
        block_size: Annotated[int, Range(1), Say("a positive integer")] = 64,  # reported as model.block_size
        batch_size: Positive = 12, val_fraction: ValFraction = 0.1, split_seed: int = 0, val_windows: Positive = 240,
        sampler: Sampler = "random", stride: Positive | None = None,  # None: one block_size
        seed: int = 1337,
        num_workers: Annotated[int, Range(0)] = 0,  # 0: load batches in the training process
        prepare_workers: Positive | None = None,  # None: one per CPU, at most 8
        verify: bool = True, pin_memory: bool | None = None,
    ):
        super().__init__()
        if path is not None and not isinstance(path, (str, os.PathLike)):
            path = [str(p) for p in path]  # a list (Hydra passes a ListConfig)
        if val_path is not None and not isinstance(val_path, (str, os.PathLike)):
            val_path = [str(p) for p in val_path]
        if mix is not None and not isinstance(mix, dict):
            mix = OmegaConf.to_container(mix, resolve=True)
        if special_tokens is not None and not isinstance(special_tokens, str):
            special_tokens = [str(t) for t in special_tokens]
        _check_settings(locals())
        # Resolve paths now, against the directory the user launched from (Hydra does not chdir).
        paths = [path] if isinstance(path, (str, os.PathLike)) else path or []
        self.raw_path, self.val_path, self.mix = path, val_path, mix
        self.paths = [Path(p).expanduser().resolve() for p in paths]
        self.text_field = text_field
        self.hf_dataset = hf_dataset
        self.hf_config = hf_config
        self.hf_split = hf_split
        self.separator = separator
        self.split_seed = split_seed
        self.url = url
        self.sha256 = sha256
        self.data_dir = Path(data_dir).expanduser().resolve() if data_dir else default_data_dir()
        self.tokenizer_spec: dict[str, Any] = {"kind": tokenizer}
        if tokenizer == "bpe":
            self.tokenizer_spec["encoding"] = encoding
        elif tokenizer == "bpe_train":
            specials = check_bpe_training(vocab_size, special_tokens)  # <|endoftext|> first
            self.tokenizer_spec.update(vocab_size=vocab_size, special_tokens=specials)
        self.block_size = block_size
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.val_windows = val_windows
        self.sampler = sampler
        self.stride = stride
        self.seed = seed
        self.num_workers = num_workers
        self.prepare_workers = prepare_workers
        self.verify = verify
        self.pin_memory = pin_memory
        self.prepared: Prepared | None = None  # the corpus's cache (one corpus, no shards or mixture)
        self.sources: list | None = None  # gptlab.data.mixture.Source of each source
        self.counts: SourceCounts | None = None  # tokens drawn from each source of a mixture
        self._sampler: TrainBatches | None = None
        self._tokenizer = None
        self.next_train_batch = 0  # index of the next training batch: the sampler's whole state

    # -- preparation ------------------------------------------------------------------------------
    def corpus(self) -> Corpus:
        if self.paths or self.hf_dataset:
            return Corpus(self.paths, text_field=self.text_field, hf_split=self.hf_split,
                          hf_dataset=self.hf_dataset, hf_config=self.hf_config)
        if not self.url:
            raise ConfigError("no corpus: set data.path (a file, a directory or a list), data.hf_dataset or data.url")
        name = Path(self.url.split("?")[0]).name or "corpus.txt"
        if name == "input.txt" and self.sha256 == TINY_SHAKESPEARE_SHA256:
            name = "tinyshakespeare.txt"
        return Corpus([download(self.url, self.data_dir / "corpora" / name, self.sha256)])

    def prepare(self, corpus: Corpus | None = None) -> Prepared:
        """`corpus` (default: data.path's, or the download) tokenized and cached (or found in the cache)."""
        try:
            return prepare_corpus(corpus if corpus is not None else self.corpus(), self.tokenizer_spec,
                                  self.data_dir / "prepared", val_fraction=self.val_fraction, workers=self.prepare_workers,
                                  verify=self.verify, separator=self.separator, split_seed=self.split_seed)
        except FilesystemError as e:
            if str(self.data_dir) not in str(e):
                raise
            raise FilesystemError(f"{e} (data.data_dir, default $GPTLAB_DATA_DIR, chooses it)") from None

    def prepare_data(self) -> None:
        if self.sources is None:
            sources = build_sources(self)
            check_sizes(sources, self.block_size)
            if self.mix is None:
                self.prepared = sources[0].prepared  # a corpus's cache (its tokenizer travels in meta.json)
            self.sources = sources
            if self.mix is not None and self.counts is None:
                self.counts = SourceCounts(sources)

    @property
    def tokenizer(self):
        self.prepare_data()
        if self.prepared is not None:
            return self.prepared.tokenizer()
        if self._tokenizer is None:  # shards and mixtures: a fixed vocabulary
            self._tokenizer = tokenizer_from_state(self.tokenizer_spec)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def val_names(self) -> list[str] | None:
        """The sources validated one by one (val/loss/<name>): a mixture's."""
        return [s.name for s in self.sources] if self.mix is not None and self.sources else None

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()
        self.train_tokens = self.sources[0].train
        val = self.sources[0].val
        self.val_tokens = val.tokens(0) if hasattr(val, "shards") else val  # an array: the start of validation

    # -- loaders ----------------------------------------------------------------------------------
    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        # the data-parallel rank: under tensor parallelism the ranks of one group read the same windows
        kwargs = getattr(getattr(trainer, "strategy", None), "distributed_sampler_kwargs", None) or {}
        return kwargs.get("rank", trainer.global_rank), kwargs.get("num_replicas", trainer.world_size)

    def train_dataset(self) -> TrainBatches:
        rank, world_size = self._rank()
        mixture = len(self.sources) > 1
        return TrainBatches(
            [s.train for s in self.sources] if mixture else self.train_tokens,
            self.block_size,
            self.batch_size,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            start=self.next_train_batch,
            sampler=self.sampler,
            stride=self.stride,
            weights=[s.weight for s in self.sources] if mixture else None,
        )

    def _pin(self) -> bool:
        """data.pin_memory, or null: pin when training on a CUDA device (non_blocking copies then overlap)."""
        if self.pin_memory is not None:
            return self.pin_memory
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"

    def train_dataloader(self) -> DataLoader:
        self._sampler = self.train_dataset()
        return DataLoader(
            self._sampler,
            batch_size=None,  # the dataset yields whole batches
            num_workers=self.num_workers,
            pin_memory=self._pin(),
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        if self.val_names is None:
            windows = FixedWindows(self.sources[0].val, self.block_size, self.val_windows)
        else:  # every source's windows, each labelled with its source
            windows = ConcatDataset([FixedWindows(s.val, self.block_size, self.val_windows, source=i)
                                     for i, s in enumerate(self.sources)])
        return DataLoader(
            windows,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=0,
            pin_memory=self._pin(),
        )

    # -- sampler state (exact resume) -------------------------------------------------------------
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training and len(batch) == 3:
            x, y, k = batch
            self.next_train_batch = int(k) + 1
            if self.counts is not None and self._sampler is not None:
                self.counts.add(self._sampler, int(k))
            return x, y
        return batch

    def state_dict(self) -> dict[str, Any]:
        state = {"next_train_batch": self.next_train_batch}
        if self.counts is not None:
            state["source_tokens"] = dict(zip(self.counts.names, self.counts.tokens.tolist()))
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.next_train_batch = int(state_dict.get("next_train_batch", 0))
        drawn = state_dict.get("source_tokens") or {}
        if self.counts is not None:
            self.counts.tokens[:] = [int(drawn.get(name, 0)) for name in self.counts.names]
