"""One LightningDataModule for char, word and BPE corpora: the tokenizer is a config value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from gptlab.data.datasets import FixedWindows, TrainBatches
from gptlab.data.download import TINY_SHAKESPEARE_SHA256, TINY_SHAKESPEARE_URL, default_data_dir, download
from gptlab.data.prepare import Prepared, corpus_files, prepare_corpus
from gptlab.errors import ConfigError, DataError


class TokenDataModule(L.LightningDataModule):
    """Random (or sliding) training windows and a fixed validation set over a prepared corpus.

    Args:
        path: a UTF-8 text file or a directory of `*.txt` files; None downloads `url`.
        url, sha256: where the default corpus comes from and its checksum (tiny Shakespeare).
        data_dir: cache for downloads and prepared token files (None: $GPTLAB_DATA_DIR or ~/.cache/gptlab).
        tokenizer: "char", "word" or "bpe"; encoding: the tiktoken encoding for "bpe".
        block_size: tokens per window (the model's context).
        batch_size: windows per batch on each device.
        val_fraction: share of the characters held out for validation (the end of the text).
        val_windows: number of fixed validation windows (spread evenly over the validation split).
        sampler: "random" windows or "sliding" windows with `stride`.
        seed: seeds the training windows (with the rank and the batch index).
        num_workers: dataloader worker processes.
        verify: check the checksums of a cached preparation before using it.
    """

    def __init__(
        self,
        path: str | None = None,
        url: str | None = TINY_SHAKESPEARE_URL,
        sha256: str | None = TINY_SHAKESPEARE_SHA256,
        data_dir: str | None = None,
        tokenizer: str = "char",
        encoding: str = "gpt2",
        block_size: int = 64,
        batch_size: int = 12,
        val_fraction: float = 0.1,
        val_windows: int = 240,
        sampler: str = "random",
        stride: int | None = None,
        seed: int = 1337,
        num_workers: int = 0,
        prepare_workers: int | None = None,
        verify: bool = True,
        pin_memory: bool = False,
    ):
        super().__init__()
        if tokenizer not in ("char", "word", "bpe"):
            raise ConfigError(f"data.tokenizer={tokenizer!r} is unknown; choose one of ['bpe', 'char', 'word']")
        if sampler not in ("random", "sliding"):
            raise ConfigError(f"data.sampler={sampler!r} is unknown; choose 'random' or 'sliding'")
        for name, value in (("block_size", block_size), ("batch_size", batch_size), ("val_windows", val_windows)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"data.{name}={value!r}: must be a positive integer")
        # Resolve paths now, against the directory the user launched from (Hydra does not chdir).
        self.path = Path(path).expanduser().resolve() if path else None
        self.url = url
        self.sha256 = sha256
        self.data_dir = Path(data_dir).expanduser().resolve() if data_dir else default_data_dir()
        self.tokenizer_spec: dict[str, Any] = {"kind": tokenizer}
        if tokenizer == "bpe":
            self.tokenizer_spec["encoding"] = encoding
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
        self.prepared: Prepared | None = None
        self.next_train_batch = 0  # index of the next training batch: the sampler's whole state

    # -- preparation ------------------------------------------------------------------------------
    def corpus(self) -> tuple[list[Path], Path]:
        if self.path is not None:
            return corpus_files(self.path), self.path
        if not self.url:
            raise ConfigError("no corpus: set data.path to a text file or directory, or data.url")
        name = Path(self.url.split("?")[0]).name or "corpus.txt"
        if name == "input.txt" and self.sha256 == TINY_SHAKESPEARE_SHA256:
            name = "tinyshakespeare.txt"
        dest = download(self.url, self.data_dir / "corpora" / name, self.sha256)
        return [dest], dest

    def prepare_data(self) -> None:
        if self.prepared is None:
            files, root = self.corpus()
            self.prepared = prepare_corpus(
                files,
                self.tokenizer_spec,
                self.data_dir / "prepared",
                val_fraction=self.val_fraction,
                workers=self.prepare_workers,
                verify=self.verify,
                corpus_root=root,
            )
            for split, name in (("train", "training"), ("val", "validation")):
                n = self.prepared.meta["tokens"][split]
                if n <= self.block_size:
                    raise DataError(
                        f"block_size={self.block_size} is larger than the {name} split ({n} tokens); "
                        f"lower model.block_size or use a bigger corpus / data.val_fraction"
                    )

    @property
    def tokenizer(self):
        self.prepare_data()
        return self.prepared.tokenizer()

    @property
    def vocab_size(self) -> int:
        self.prepare_data()
        return self.prepared.meta["vocab_size"]

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()
        self.train_tokens = self.prepared.tokens("train")
        self.val_tokens = self.prepared.tokens("val")

    # -- loaders ----------------------------------------------------------------------------------
    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataset(self) -> TrainBatches:
        rank, world_size = self._rank()
        return TrainBatches(
            self.train_tokens,
            self.block_size,
            self.batch_size,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            start=self.next_train_batch,
            sampler=self.sampler,
            stride=self.stride,
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_dataset(),
            batch_size=None,  # the dataset yields whole batches
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            FixedWindows(self.val_tokens, self.block_size, self.val_windows),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=0,
            pin_memory=self.pin_memory,
        )

    # -- sampler state (exact resume) -------------------------------------------------------------
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training and len(batch) == 3:
            x, y, k = batch
            self.next_train_batch = int(k) + 1
            return x, y
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"next_train_batch": self.next_train_batch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.next_train_batch = int(state_dict.get("next_train_batch", 0))
