"""Corpora, tokenizers and the Lightning DataModule. The DataModule (and so Lightning) is imported
lazily, so that sampling and tokenizing stay quick to start."""

from gptlab.data.tokenizers import BPETokenizer, CharTokenizer, WordTokenizer, tokenizer_from_state

__all__ = ["TokenDataModule", "CharTokenizer", "WordTokenizer", "BPETokenizer", "tokenizer_from_state"]


def __getattr__(name: str):
    if name == "TokenDataModule":
        from gptlab.data.datamodule import TokenDataModule

        return TokenDataModule
    raise AttributeError(name)
