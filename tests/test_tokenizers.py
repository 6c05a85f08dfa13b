from gptlab.data.tokenizers import (
    BPETokenizer,
    CharTokenizer,
    UnknownCharacterError,
    WordTokenizer,
    tokenizer_from_state,
)
from gptlab.errors import ConfigError
import pytest

from conftest import SHAKESPEARE

TEXT = SHAKESPEARE.read_text(encoding="utf-8")


def test_char_tokenizer_on_tiny_shakespeare():
    tok = CharTokenizer(TEXT)
    assert tok.vocab_size == 65
    assert tok.encode("hii there") == [46, 47, 47, 1, 58, 46, 43, 56, 43]
    assert tok.decode(tok.encode("hii there")) == "hii there"
    again = tokenizer_from_state(tok.state_dict())
    assert again.chars == tok.chars
    with pytest.raises(UnknownCharacterError, match="'é'"):
        tok.encode("café")


def test_word_tokenizer_like_the_book():
    sentence = '"It\'s the last he painted, you know," Mrs. Gisburn said with pardonable pride.'
    tok = WordTokenizer(WordTokenizer.split(sentence))
    words = tok.itos
    assert words[-2:] == ["<|endoftext|>", "<|unk|>"]
    assert words[:-2] == sorted(words[:-2])
    text = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of the palace."
    ids = tok.encode(text)
    unk = tok.stoi["<|unk|>"]
    # known from the fitted sentence: "," "you" "the" "." ; everything else is <|unk|>
    assert ids.count(unk) == 10
    assert tok.decode(ids) == (
        "<|unk|>, <|unk|> you <|unk|> <|unk|> <|unk|> <|endoftext|> <|unk|> the <|unk|> <|unk|> <|unk|> the <|unk|>."
    )
    assert tok.encode("<|endoftext|>") == [tok.eot_id]
    decoded = tok.decode(tok.encode('It\'s the last, you know.'))
    assert decoded == "It' s the last, you know."
    assert tokenizer_from_state(tok.state_dict()).itos == tok.itos


def test_word_tokenizer_split_rule():
    assert WordTokenizer.split('Hello, world-- is this-- a test?') == [
        "Hello", ",", "world", "--", "is", "this", "--", "a", "test", "?"
    ]


def test_bpe_gpt2_offline():
    tok = BPETokenizer("gpt2")
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    text = "Hello, do you like tea? <|endoftext|> In the sunlit terraces"
    ids = tok.encode(text)
    assert ids == [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114]
    assert tok.decode(ids) == text
    assert tokenizer_from_state(tok.state_dict()).encoding == "gpt2"
    assert BPETokenizer("r50k_base").encode("Hello, do you") == [15496, 11, 466, 345]


def test_unknown_tokenizer_and_encoding():
    with pytest.raises(ConfigError, match="nope"):
        tokenizer_from_state({"kind": "nope"})
    with pytest.raises(ConfigError, match="not_an_encoding"):
        BPETokenizer("not_an_encoding")


def test_token_bytes_count_the_utf8_text_of_each_token():
    import numpy as np

    text = "Héllo, wörld — naïve café. <|endoftext|> Ünïcode ✓"
    char = CharTokenizer(text)
    sizes = char.token_bytes()
    assert sizes.dtype.kind == "i" and len(sizes) == char.vocab_size
    assert sizes[char.encode(text)].sum() == len(text.encode())

    bpe = BPETokenizer("gpt2")
    sizes = bpe.token_bytes()
    assert len(sizes) == bpe.vocab_size and sizes[bpe.eot_id] == 0
    ids = bpe.encode(text)  # <|endoftext|> is one special token here: no text
    assert sizes[ids].sum() == len(text.replace("<|endoftext|>", "").encode())

    words = "It's the last he painted, you know, Mrs. Gisburn said."
    word = WordTokenizer(WordTokenizer.split(words))
    sizes = word.token_bytes()
    ids = word.encode(words)
    # the decoded text and its bytes, plus one for the first word's (absent) leading space
    assert sizes[ids].sum() == len(word.decode(ids).encode()) + 1
    assert sizes[word.eot_id] == 0 and sizes[word.stoi[","]] == 1 and sizes[word.stoi["painted"]] == 8
