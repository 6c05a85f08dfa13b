"""The tokenizer of a Hugging Face directory: which files an export writes, and which tokenizer an
import or sample.py takes from a directory. gptlab never guesses a vocabulary:

1. `gptlab_tokenizer.json` (written by every export: the tokenizer's `state_dict()`) decides;
2. else Hugging Face tokenizer files (`tokenizer.json`, or `vocab.json` + `merges.txt`) are used
   only if they are exactly GPT-2's byte-level BPE (50257 tokens, the same merges), which is
   tiktoken's `gpt2` encoding token for token;
3. else the caller must name the tokenizer (`--tokenizer gpt2`, sample.py `tokenizer=gpt2`, or the
   path of a gptlab_tokenizer.json), or the import stops with one line saying so.

An export of a GPT-2 BPE model also writes GPT-2's Hugging Face files, derived from tiktoken
(vocab.json and merges.txt byte for byte OpenAI's, as the `gpt2` hub repo has them, plus
tokenizer.json), so `AutoTokenizer.from_pretrained(dir)` works; a tokenizer that has a
`to_hf_files(directory)` method writes its own files instead.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from gptlab.data.tokenizers import ENDOFTEXT, Tokenizer, tokenizer_from_state
from gptlab.errors import CheckpointError, GptlabError

TOKENIZER_FILE = "gptlab_tokenizer.json"
HF_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
GPT2_ENCODINGS = ("gpt2", "r50k_base")  # tiktoken's names of GPT-2's byte-level BPE
GPT2_VOCAB_SIZE = 50257
OVERRIDE_HINT = (
    "gptlab does not guess a vocabulary, so name the model's tokenizer: python -m gptlab.hf import ... "
    "--tokenizer gpt2 (sample.py: tokenizer=gpt2), or the path of a gptlab_tokenizer.json instead of gpt2"
)


def is_gpt2(state: dict[str, Any] | None) -> bool:
    return bool(state) and state.get("kind") == "bpe" and state.get("encoding", "gpt2") in GPT2_ENCODINGS


def describe(state: dict[str, Any] | None) -> str:
    if not state:
        return "no tokenizer"
    return f"bpe {state.get('encoding', 'gpt2')}" if state.get("kind") == "bpe" else str(state.get("kind"))


def build(state: dict[str, Any], vocab_size: int, source: str) -> Tokenizer:
    """The tokenizer of `state`; an error if it has more tokens than the model's embedding rows."""
    try:
        tokenizer = tokenizer_from_state(state)
    except GptlabError as e:
        raise CheckpointError(f"{source}: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{source} is not a gptlab tokenizer state ({type(e).__name__}: {e})") from None
    check_fits(tokenizer, vocab_size, source)
    return tokenizer


def check_fits(tokenizer: Tokenizer, vocab_size: int, source: str) -> None:
    """A tokenizer may have fewer tokens than the model's embedding rows (a padded vocabulary), never more."""
    if tokenizer.vocab_size > vocab_size:
        raise CheckpointError(
            f"{source}: the {describe(tokenizer.state_dict())} tokenizer has {tokenizer.vocab_size} tokens but "
            f"the model's vocab_size is {vocab_size}; they do not belong together"
        )


# ----------------------------------------------------------------------------------------------
# GPT-2's Hugging Face files, from tiktoken


@cache
def gpt2_vocab_merges() -> tuple[dict[str, int], tuple[str, ...]]:
    """GPT-2's vocab.json and merges.txt entries, derived from tiktoken's `gpt2` ranks.

    Token ids are BPE ranks; the merge that made the token of rank r is the split BPE reaches on
    its bytes with the tokens of rank < r (exactly two pieces). Strings use GPT-2's byte-to-unicode
    alphabet, as Hugging Face's files do."""
    from gptlab.data.tokenizers import BPETokenizer

    enc = BPETokenizer("gpt2").enc
    alphabet = _bytes_to_unicode()
    tokens = [enc.decode_single_token_bytes(i) for i in range(enc.n_vocab - 1)]  # the last one is <|endoftext|>
    ranks = {t: i for i, t in enumerate(tokens)}
    merges = []
    for rank, token in enumerate(tokens):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best = min((ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1))
            parts[best[1]: best[1] + 2] = [parts[best[1]] + parts[best[1] + 1]]
        merges.append(" ".join("".join(alphabet[b] for b in p) for p in parts))
    vocab = {"".join(alphabet[b] for b in t): i for i, t in enumerate(tokens)}
    vocab[ENDOFTEXT] = enc.eot_token
    return vocab, tuple(merges)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of bytes to printable unicode characters (encoder.py in openai/gpt-2)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def gpt2_hf_files(block_size: int) -> dict[str, str]:
    """The text of GPT-2's tokenizer files (what the `gpt2` hub repo holds)."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors

    vocab, merges = gpt2_vocab_merges()
    fast = HFTokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges]))
    fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    fast.decoder = decoders.ByteLevel()
    fast.post_processor = processors.ByteLevel(trim_offsets=False)
    fast.add_special_tokens([AddedToken(ENDOFTEXT, special=True, normalized=True)])
    special = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT}
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": block_size, "add_prefix_space": False,
              "add_bos_token": False, **special}
    return {
        "vocab.json": json.dumps(vocab),  # as the gpt2 hub repo (and OpenAI's encoder.json) has it
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer.json": fast.to_str(),
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2) + "\n",
    }


def tokenizer_files(tokenizer: Tokenizer, block_size: int) -> dict[str, str]:
    """The files an export writes for `tokenizer` (name -> text), beyond what its own `to_hf_files` writes."""
    state = tokenizer.state_dict()
    files = {TOKENIZER_FILE: json.dumps(state, ensure_ascii=False) + "\n"}
    if is_gpt2(state) and not hasattr(tokenizer, "to_hf_files"):
        files.update(gpt2_hf_files(block_size))
    return files


# ----------------------------------------------------------------------------------------------
# reading: which tokenizer a directory holds


def _not_gpt2(directory: Path, file: str, why: str) -> CheckpointError:
    return CheckpointError(
        f"{directory / file} is not GPT-2's byte-level BPE ({why}) and the directory has no {TOKENIZER_FILE}; "
        f"{OVERRIDE_HINT}"
    )


def _merge(m: Any) -> str:
    # tokenizers writes a merge as "a b" (before 0.20) or ["a", "b"]
    return " ".join(m) if isinstance(m, list) and all(isinstance(x, str) for x in m) else str(m)


def _hf_vocab_merges(directory: Path) -> list[tuple[str, dict[str, Any], list[str]]]:
    """(file, vocab, merges) of each Hugging Face tokenizer file set in the directory."""
    from gptlab.hf.weights import read_json

    found = []
    fast = directory / "tokenizer.json"
    if fast.is_file():
        spec = read_json(fast, "a tokenizers JSON object")
        model = spec.get("model") if isinstance(spec.get("model"), dict) else {}
        pre = spec.get("pre_tokenizer") if isinstance(spec.get("pre_tokenizer"), dict) else {}
        if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
            raise _not_gpt2(directory, fast.name, f"model type {model.get('type')!r}, not BPE")
        if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space"):
            raise _not_gpt2(directory, fast.name, f"pre_tokenizer {pre.get('type')!r}, not GPT-2's ByteLevel")
        vocab = dict(model["vocab"])
        vocab.update({t.get("content"): t.get("id") for t in spec.get("added_tokens") or [] if isinstance(t, dict)})
        found.append((fast.name, vocab, [_merge(m) for m in model.get("merges") or []]))
    if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        vocab = read_json(directory / "vocab.json", "a vocabulary")
        try:
            lines = (directory / "merges.txt").read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot read {directory / 'merges.txt'}: {e}") from None
        found.append(("vocab.json", vocab, [line for line in lines if line and not line.startswith("#version")]))
    return found


def directory_state(directory: Path) -> dict[str, Any]:
    """The gptlab tokenizer state of a Hugging Face directory, by the rules at the top."""
    from gptlab.hf.weights import read_json

    own = directory / TOKENIZER_FILE
    if own.is_file():
        return read_json(own, "a gptlab tokenizer state")
    found = _hf_vocab_merges(directory)
    if not found:
        raise CheckpointError(
            f"{directory} has neither {TOKENIZER_FILE} nor Hugging Face tokenizer files (tokenizer.json, "
            f"vocab.json + merges.txt); {OVERRIDE_HINT}"
        )
    for file, vocab, merges in found:  # every file set present must be GPT-2's
        if len(vocab) != GPT2_VOCAB_SIZE:
            raise _not_gpt2(directory, file, f"{len(vocab)} tokens, not {GPT2_VOCAB_SIZE}")
        gpt2_vocab, gpt2_merges = gpt2_vocab_merges()
        if vocab != gpt2_vocab:
            raise _not_gpt2(directory, file, "its token ids differ from GPT-2's")
        if tuple(merges) != gpt2_merges:
            raise _not_gpt2(directory, file, "its merges differ from GPT-2's")
    return {"kind": "bpe", "encoding": "gpt2"}


def override_state(value: str) -> dict[str, Any]:
    """An explicit tokenizer: the path of a gptlab_tokenizer.json, or a tiktoken encoding name (gpt2)."""
    from gptlab.hf.weights import read_json

    text = str(value).strip()
    path = Path(text).expanduser()
    if path.is_file():
        return read_json(path, "a gptlab tokenizer state")
    if text.endswith(".json") or "/" in text:
        raise CheckpointError(f"tokenizer={text}: no such file")
    return {"kind": "bpe", "encoding": text}
