"""Tokenizers: character-level, word-level (the book's, with <|unk|> and <|endoftext|>), BPE (tiktoken)
and byte-level BPE trained on the corpus (gptlab.data.trained_bpe).

Each one round-trips through `state_dict()` / `tokenizer_from_state()`: a small dict of plain
containers that travels in `meta.json` and in checkpoints, so a checkpoint alone can sample.

`token_bytes()` gives, for every token id, the number of UTF-8 bytes of text it stands for, so that
a loss in nats per token converts to bits per byte, a figure comparable across tokenizers:
bpb = sum(loss) / ln 2 / sum(token_bytes[targets]). Special tokens (<|endoftext|>, ...) stand for
no text and count 0 bytes: leave targets with 0 bytes out of both sums.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np

from gptlab.errors import ConfigError, GptlabError

ENDOFTEXT = "<|endoftext|>"
UNK = "<|unk|>"


class UnknownCharacterError(GptlabError):
    pass


class CharTokenizer:
    """Vocabulary = the sorted unique characters of the corpus (65 on tiny Shakespeare)."""

    kind = "char"

    def __init__(self, chars: Iterable[str]):
        self.chars = sorted(set(chars))
        if not self.chars:
            raise ConfigError("a char tokenizer needs at least one character")
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def eot_id(self) -> int | None:
        return None

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            unknown = sorted({c for c in text if c not in self.stoi})
            raise UnknownCharacterError(
                f"the text has {len(unknown)} character(s) outside this model's vocabulary of "
                f"{self.vocab_size}: {''.join(unknown)!r}; use only characters the model was trained on"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def token_bytes(self) -> np.ndarray:
        """The UTF-8 length of each character."""
        return np.array([len(c.encode("utf-8")) for c in self.chars], dtype=np.int64)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "chars": "".join(self.chars)}


class WordTokenizer:
    """The word-level tokenizer of *Build a Large Language Model (From Scratch)*, chapter 2."""

    kind = "word"
    SPLIT = re.compile(r'([,.:;?_!"()\']|--|\s)')
    # decode: drop the space the join put before punctuation
    _DETACH = re.compile(r'\s+([,.:;?!"()\'])')

    def __init__(self, words: Iterable[str]):
        vocab = sorted(set(words) - {ENDOFTEXT, UNK})
        vocab += [ENDOFTEXT, UNK]
        self.itos = vocab
        self.stoi = {w: i for i, w in enumerate(vocab)}

    @classmethod
    def split(cls, text: str) -> list[str]:
        return [piece.strip() for piece in cls.SPLIT.split(text) if piece.strip()]

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    @property
    def eot_id(self) -> int | None:
        return self.stoi[ENDOFTEXT]

    def encode(self, text: str) -> list[int]:
        unk = self.stoi[UNK]
        return [self.stoi.get(w, unk) for w in self.split(text)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._DETACH.sub(r"\1", " ".join(self.itos[i] for i in ids))

    def token_bytes(self) -> np.ndarray:
        """The bytes each word adds to `decode`'s text: its UTF-8 length plus the space decode puts
        before it (none before the punctuation decode attaches to the previous word); 0 for
        <|endoftext|>. (A sequence's first word is counted with its space: one byte too many.)"""
        sizes = [len(w.encode("utf-8")) + (0 if self._DETACH.fullmatch(" " + w) else 1) for w in self.itos]
        sizes[self.stoi[ENDOFTEXT]] = 0
        return np.array(sizes, dtype=np.int64)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "words": list(self.itos[:-2])}


class BPETokenizer:
    """tiktoken byte-pair encoding by name: gpt2 (default), r50k_base, cl100k_base, o200k_base, ..."""

    kind = "bpe"

    def __init__(self, encoding: str = "gpt2"):
        import tiktoken

        try:
            self.enc = tiktoken.get_encoding(encoding)
        except ValueError:
            raise ConfigError(
                f"unknown BPE encoding {encoding!r}; choose one of {tiktoken.list_encoding_names()}"
            ) from None
        except Exception as e:  # tiktoken downloads the vocabulary on first use
            raise GptlabError(
                f"could not load the BPE vocabulary {encoding!r} ({type(e).__name__}: {e}). Offline, point "
                f"TIKTOKEN_CACHE_DIR at a directory that holds tiktoken's cached files"
            ) from None
        self.encoding = encoding

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    @property
    def eot_id(self) -> int | None:
        return self.enc.eot_token

    def encode(self, text: str) -> list[int]:
        # The end-of-text marker is a document separator in corpora and prompts; other special
        # tokens are encoded as plain text.
        return self.enc.encode(text, allowed_special={ENDOFTEXT} & self.enc.special_tokens_set)

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(list(ids))

    def token_bytes(self) -> np.ndarray:
        """The length of each token's bytes; 0 for special tokens and for ids the encoding leaves unused."""
        sizes = np.zeros(self.vocab_size, dtype=np.int64)
        special = {self.enc.encode_single_token(t) for t in self.enc.special_tokens_set}
        for i in range(self.vocab_size):
            if i not in special:
                try:
                    sizes[i] = len(self.enc.decode_single_token_bytes(i))
                except KeyError:
                    pass  # a gap in the vocabulary (cl100k_base has some)
        return sizes

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "encoding": self.encoding}


TokenizerKind = Literal["bpe", "bpe_train", "char", "word"]
KINDS = typing.get_args(TokenizerKind)


# what tokenizer_from_state returns (gptlab.data.trained_bpe.TrainedBPETokenizer has the same methods)
Tokenizer = CharTokenizer | WordTokenizer | BPETokenizer


def tokenizer_from_state(state: dict[str, Any]) -> Tokenizer:
    """The tokenizer a `state_dict()` describes; ConfigError (naming what is wrong) for anything else."""
    if not isinstance(state, dict):
        raise ConfigError(f"a tokenizer state is a dict, not {type(state).__name__}")
    kind = state.get("kind")
    if kind == "char":
        chars = state.get("chars")
        if not isinstance(chars, str) or not chars:
            raise ConfigError(f"char tokenizer state: 'chars' is {chars!r}, not a non-empty string")
        return CharTokenizer(chars)
    if kind == "word":
        words = state.get("words")
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise ConfigError("word tokenizer state: 'words' is not a list of strings")
        return WordTokenizer(words)
    if kind == "bpe":
        encoding = state.get("encoding", "gpt2")
        if not isinstance(encoding, str):
            raise ConfigError(f"bpe tokenizer state: 'encoding' is {encoding!r}, not a name")
        return BPETokenizer(encoding)
    if kind == "bpe_train":
        from gptlab.data.trained_bpe import TrainedBPETokenizer  # imports Hugging Face tokenizers

        if not isinstance(state.get("json"), str):
            raise ConfigError("bpe_train tokenizer state: 'json' is not a tokenizers JSON string")
        return TrainedBPETokenizer(state["json"])
    raise ConfigError(f"unknown tokenizer {kind!r}; choose one of {list(KINDS)}")
