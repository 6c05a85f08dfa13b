"""A byte-level BPE tokenizer trained on the corpus with Hugging Face `tokenizers` (data.tokenizer=bpe_train)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from gptlab.data.tokenizers import ENDOFTEXT
from gptlab.errors import ConfigError
from gptlab.files import atomic_write, write_json


def check_bpe_training(vocab_size: Any, special_tokens: list[str] | None) -> list[str]:
    """The special tokens of a BPE to train (<|endoftext|> first unless listed); ConfigError for a
    vocabulary too small for the 256 bytes and the special tokens."""
    specials = list(special_tokens or [ENDOFTEXT])
    if not all(isinstance(t, str) and t for t in specials) or len(set(specials)) < len(specials):
        raise ConfigError(f"data.special_tokens={specials!r}: must be distinct non-empty strings")
    if ENDOFTEXT not in specials:
        specials.insert(0, ENDOFTEXT)
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 256 + len(specials):
        raise ConfigError(
            f"data.vocab_size={vocab_size!r}: a byte-level BPE needs at least {256 + len(specials)} tokens "
            f"(256 bytes and the special tokens {specials})"
        )
    return specials


class TrainedBPETokenizer:
    """A byte-level BPE trained on the corpus's training split with Hugging Face `tokenizers`: GPT-2's
    pre-tokenizer and 256-byte alphabet, so any text encodes and decodes back exactly. Its JSON
    travels in the state dict, so a checkpoint carries the whole tokenizer."""

    kind = "bpe_train"

    def __init__(self, json_text: str):
        from tokenizers import Tokenizer

        try:
            self.hf = Tokenizer.from_str(json_text)
        except Exception as e:  # tokenizers raises its own Exception type for a bad JSON
            raise ConfigError(f"bpe_train tokenizer state: not a tokenizers JSON ({e})") from None
        self.json = json_text
        self.special_tokens = [t.content for t in self.hf.get_added_tokens_decoder().values() if t.special]
        if ENDOFTEXT not in self.special_tokens:
            raise ConfigError(f"bpe_train tokenizer state: no {ENDOFTEXT} special token")
        # For prompts (`encode`), special-token text is the special token, as in Hugging Face; the
        # corpus is encoded with `corpus_hf`, where it is plain text (as tiktoken's encode_ordinary).
        self.corpus_hf = Tokenizer.from_str(json_text)
        self.corpus_hf.encode_special_tokens = True

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, special_tokens: list[str] | None = None,
              batch_chars: int = 1 << 22) -> TrainedBPETokenizer:
        """Train on the stream `texts`, consumed once in groups of about `batch_chars` characters
        (pieces of a corpus are up to a megabyte each: a group counted in texts could hold gigabytes)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        specials = check_bpe_training(vocab_size, special_tokens)
        hf = Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

        def batches():
            group, size = [], 0
            for text in texts:
                group.append(text)
                size += len(text)
                if size >= batch_chars:
                    yield group
                    group, size = [], 0
            if group:
                yield group

        hf.train_from_iterator(batches(), trainer=trainer)
        return cls(hf.to_str())

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int | None:
        return self.hf.token_to_id(ENDOFTEXT)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray:
        """Byte-level tokens spell one byte per character: a token's length is its byte count; 0 for
        the special tokens."""
        special = set(self.special_tokens)
        tokens = [self.hf.id_to_token(i) for i in range(self.vocab_size)]
        return np.array([0 if t is None or t in special else len(t) for t in tokens], dtype=np.int64)

    def to_hf_files(self, directory: str | os.PathLike) -> Path:
        """tokenizer.json + tokenizer_config.json in `directory`, for
        `transformers.AutoTokenizer.from_pretrained(directory)`, which then encodes and decodes as
        this tokenizer does."""
        directory = Path(directory)
        with atomic_write(directory / "tokenizer.json", "w") as f:
            f.write(self.json)
        write_json(directory / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": ENDOFTEXT,
            "eos_token": ENDOFTEXT,
            "additional_special_tokens": [t for t in self.special_tokens if t != ENDOFTEXT],
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
        })
        return directory

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "json": self.json}


