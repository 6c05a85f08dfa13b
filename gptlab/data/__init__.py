from gptlab.data.datamodule import TokenDataModule
from gptlab.data.tokenizers import BPETokenizer, CharTokenizer, WordTokenizer, tokenizer_from_state

__all__ = ["TokenDataModule", "CharTokenizer", "WordTokenizer", "BPETokenizer", "tokenizer_from_state"]
