"""Hugging Face GPT-2 and Llama import/export (gptlab.hf) against transformers' own GPT2LMHeadModel
and LlamaForCausalLM, and `model.init_from` taking the checkpoint's shape.

Everything is offline: the Hugging Face models are small random GPT-2s and Llamas built and saved with
transformers itself, in the layouts found in the wild (safetensors, sharded safetensors,
pytorch_model.bin with and without the `transformer.` prefix, tied and untied heads). GPT-2's
original tokenizer files (encoder.json = vocab.json, vocab.bpe = merges.txt) come from tiktoken's
offline cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.torch import load_file  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from gptlab import checkpoint  # noqa: E402
from gptlab.models import RUN_SWITCHES  # noqa: E402
from gptlab.data.tokenizers import BPETokenizer, CharTokenizer, WordTokenizer  # noqa: E402
from gptlab.errors import CheckpointError, ConfigError  # noqa: E402
from gptlab.files import FilesystemError, temp_name  # noqa: E402
from gptlab.hf import export_checkpoint, import_checkpoint, load_hf_model, load_pretrained_into  # noqa: E402
from gptlab.hf.cli import main as hf_main  # noqa: E402
from gptlab.hf.convert import export_hf  # noqa: E402
from gptlab.hf.gpt2 import copy_into, hf_config_to_model_cfg, to_gptlab_state  # noqa: E402
from gptlab.hf.weights import read_config, read_state, resolve_dir  # noqa: E402
from gptlab.models import build_model  # noqa: E402
from gptlab.sampling import generate  # noqa: E402
from conftest import SHAKESPEARE  # noqa: E402
from inprocess import run_sample, run_train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# where tiktoken keeps its files (conftest points TIKTOKEN_CACHE_DIR at the test data's copy when there is one)
TIKTOKEN_CACHE = Path(os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
                      or Path(tempfile.gettempdir()) / "data-gym-cache")
CHARS = "abcdefgh \n"  # a char tokenizer small enough for every random model here


# ----------------------------------------------------------------------------------------------
# helpers


def make_hf(directory: Path, seed: int = 0, fmt: str = "safetensors", scale: float = 0.2, **kwargs) -> GPT2LMHeadModel:
    """A random GPT2LMHeadModel saved to `directory` in layout `fmt`.

    Every parameter is random (LayerNorm gains around 1, biases non-zero, an untied head different
    from the embedding), so a forgotten transpose or a dropped bias cannot go unnoticed.
    fmt: "safetensors" (save_pretrained), "sharded" (save_pretrained in several files), "bin"
    (pytorch_model.bin, transformers' key names) or
    "openai_bin" (OpenAI's original GPT-2 file: no `transformer.` prefix, attn.bias/masked_bias buffers).
    """
    torch.manual_seed(seed)
    config = GPT2Config(bos_token_id=None, eos_token_id=None, **kwargs)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * scale)
            if ".ln_" in name and name.endswith("weight"):
                p.add_(1.0)
    directory.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        model.save_pretrained(directory)
    elif fmt == "sharded":
        model.save_pretrained(directory, max_shard_size="40KB")
        assert (directory / "model.safetensors.index.json").is_file() and len(list(directory.glob("*.safetensors"))) > 2
    elif fmt == "bin":
        config.save_pretrained(directory)
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    elif fmt == "openai_bin":
        assert config.tie_word_embeddings
        config.save_pretrained(directory)
        state = dict(model.transformer.state_dict())
        n = config.n_positions
        for i in range(config.n_layer):
            state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
            state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        torch.save(state, directory / "pytorch_model.bin")
    else:
        raise ValueError(fmt)
    weights = {"safetensors": "model.safetensors", "sharded": "model.safetensors.index.json"}
    assert (directory / weights.get(fmt, "pytorch_model.bin")).is_file()
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def hf_greedy(model: GPT2LMHeadModel, prompt: torch.Tensor, n: int) -> torch.Tensor:
    out = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n, pad_token_id=0
    )
    assert out.shape == (prompt.size(0), prompt.size(1) + n)
    return out


def read_hf(source) -> tuple[dict, dict]:
    """(gptlab model config, gptlab-layout state dict) of a Hugging Face GPT-2, as an import reads it."""
    directory = resolve_dir(source)
    cfg = hf_config_to_model_cfg(read_config(directory))
    return cfg, to_gptlab_state(cfg, read_state(directory), str(directory))


def char_file(directory: Path, chars: str = CHARS) -> Path:
    """A gptlab_tokenizer.json-style file of a char tokenizer, for models saved without a tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    file = directory / "chars.json"
    file.write_text(json.dumps(CharTokenizer(chars).state_dict()))
    return file


def load_hf_gpt2(directory: Path):
    return load_hf_model(directory, str(char_file(directory.parent / "tok")))[0]


def gptlab_ckpt(path: Path, model_cfg: dict, tokenizer: dict | None, seed: int = 0) -> Path:
    """A gptlab checkpoint of a random model, in the layout training writes."""
    torch.manual_seed(seed)
    model = build_model(model_cfg)
    return checkpoint.save(checkpoint.new_checkpoint(model_cfg, model.state_dict(), tokenizer), path)


def openai_gpt2_files() -> dict[str, bytes]:
    """GPT-2's original vocabulary files (the gpt2 hub repo's vocab.json and merges.txt), from tiktoken's cache."""
    found = {}
    if TIKTOKEN_CACHE.is_dir():
        for file in TIKTOKEN_CACHE.iterdir():
            data = file.read_bytes()
            if data.startswith(b"#version: 0.2"):
                found["merges.txt"] = data
            elif data.startswith(b'{"!": 0'):
                found["vocab.json"] = data
    if len(found) != 2:
        pytest.skip(f"GPT-2's encoder.json / vocab.bpe are not in the offline tiktoken cache {TIKTOKEN_CACHE}")
    return found


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line(text: str) -> bool:
    return text.strip() != "" and "\n" not in text.strip() and "Traceback" not in text


SMALL = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=32)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: a second intra-op thread only adds overhead (a lot of it on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_hf(tmp_path_factory) -> tuple[Path, GPT2LMHeadModel]:
    directory = tmp_path_factory.mktemp("hf") / "small"
    return directory, make_hf(directory, seed=1, **SMALL)


@pytest.fixture(scope="module")
def gpt2_vocab_hf(tmp_path_factory) -> tuple[Path, GPT2LMHeadModel]:
    """A tiny random GPT-2 with GPT-2's vocabulary and the gpt2 hub repo's vocab.json / merges.txt."""
    directory = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    hf = make_hf(directory, seed=7, scale=0.5, n_layer=1, n_head=2, n_embd=16, vocab_size=50257, n_positions=64)
    for name, data in openai_gpt2_files().items():
        (directory / name).write_bytes(data)
    return directory, hf


# ----------------------------------------------------------------------------------------------
# import -> same logits and greedy tokens as transformers; export -> transformers loads it back


@pytest.mark.parametrize(
    "fmt,kwargs",
    [
        pytest.param("safetensors", dict(SMALL, tie_word_embeddings=True), id="2L-2H-32-tied-safetensors"),
        pytest.param(
            "sharded",
            dict(n_layer=3, n_head=4, n_embd=64, vocab_size=257, n_positions=64, tie_word_embeddings=False),
            id="3L-4H-64-untied-sharded-safetensors",
        ),
        pytest.param(
            "bin",
            dict(n_layer=2, n_head=4, n_embd=64, vocab_size=300, n_positions=48, tie_word_embeddings=False,
                 activation_function="gelu_pytorch_tanh"),
            id="2L-4H-64-untied-bin",
        ),
        pytest.param(
            "openai_bin",
            dict(n_layer=3, n_head=2, n_embd=32, vocab_size=150, n_positions=40, layer_norm_epsilon=1e-6),
            id="3L-2H-32-tied-openai-bin",
        ),
    ],
)
def test_import_export_roundtrip(tmp_path, fmt, kwargs):
    hf = make_hf(tmp_path / "hf", seed=len(kwargs), fmt=fmt, **kwargs)
    tied = kwargs.get("tie_word_embeddings", True)

    model = load_hf_gpt2(tmp_path / "hf")
    cfg = model.config
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size, cfg.block_size) == (
        kwargs["n_layer"], kwargs["n_head"], kwargs["n_embd"], kwargs["vocab_size"], kwargs["n_positions"]
    )
    assert cfg.tie_weights is tied and cfg.bias and cfg.qkv_bias and not model.training
    assert (model.lm_head.weight is model.transformer.wte.weight) is tied
    assert cfg.layer_norm_eps == kwargs.get("layer_norm_epsilon", 1e-5)

    torch.manual_seed(123)
    ids = torch.randint(0, kwargs["vocab_size"], (3, kwargs["n_positions"]))
    with torch.no_grad():
        ref = hf(ids).logits
        assert rel_err(model(ids), ref) < 1e-4

    # greedy decoding: the same tokens as transformers' generate, with and without the KV cache
    prompt = ids[:2, :6]
    n_new = 24
    expected = hf_greedy(hf, prompt, n_new)
    for use_cache in (True, False):
        assert torch.equal(generate(model, prompt, n_new, greedy=True, use_cache=use_cache), expected)

    # export back (no tokenizer); transformers loads every weight and computes the same logits
    out, files = export_hf(model, tmp_path / "export")
    assert files == ["config.json", "model.safetensors"] and sorted(os.listdir(out)) == files
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert config["activation_function"] == "gelu_new"
    assert config["n_positions"] == config["n_ctx"] == kwargs["n_positions"]
    assert config["tie_word_embeddings"] is tied
    assert "tokenizer_class" not in config and config["bos_token_id"] is None
    assert ("lm_head.weight" in load_file(out / "model.safetensors")) is not tied
    hf2, info = GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf2.eval()
    with torch.no_grad():
        assert rel_err(hf2(ids).logits, ref) < 1e-4


def test_gpt2_bpe_export_writes_gpt2s_tokenizer_files(tmp_path):
    """A GPT-2 BPE model trained by gptlab (untied, dropout > 0): the export holds GPT-2's tokenizer
    files, byte for byte the hub's, so AutoTokenizer encodes exactly as tiktoken does."""
    original = openai_gpt2_files()
    torch.manual_seed(0)
    model = build_model(
        dict(vocab_size=50257, block_size=24, n_layer=1, n_head=2, n_embd=16, dropout=0.1, tie_weights=False)
    ).eval()
    enc = BPETokenizer("gpt2")
    out, files = export_hf(model, tmp_path / "export", enc)
    assert files == sorted(["config.json", "generation_config.json", "gptlab_tokenizer.json", "merges.txt",
                            "model.safetensors", "special_tokens_map.json", "tokenizer.json",
                            "tokenizer_config.json", "vocab.json"])
    for name, data in original.items():
        assert (out / name).read_bytes() == data, name
    config = json.loads((out / "config.json").read_text())
    assert config["bos_token_id"] == config["eos_token_id"] == 50256 and config["tokenizer_class"] == "GPT2Tokenizer"
    assert config["resid_pdrop"] == 0.1 and config["tie_word_embeddings"] is False
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 50256
    assert json.loads((out / "gptlab_tokenizer.json").read_text()) == {"kind": "bpe", "encoding": "gpt2"}

    auto = transformers.AutoTokenizer.from_pretrained(out)
    text = SHAKESPEARE.read_text(encoding="utf-8")[:5000] + " héllo 😀  x<|endoftext|>y 12345 's 'll\n\n\t z"
    assert auto(text)["input_ids"] == enc.encode(text) and auto.eos_token_id == 50256
    assert auto.decode(enc.encode(text)) == text

    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    ids = torch.randint(0, 50257, (2, 24))
    with torch.no_grad():
        assert rel_err(hf(ids).logits, model(ids)) < 1e-4
    # and back again: the tokenizer comes from gptlab_tokenizer.json, or else from GPT-2's files
    for drop in ([], ["gptlab_tokenizer.json"], ["tokenizer.json"]):
        for name in drop:
            (out / name).unlink()
        again, tok = load_hf_model(out)
        assert isinstance(tok, BPETokenizer) and tok.encoding == "gpt2" and not again.config.tie_weights
        with torch.no_grad():
            assert rel_err(again(ids), model(ids)) < 1e-4


def test_tokenizer_files_are_gpt2s_or_refused(tmp_path, gpt2_vocab_hf):
    """Hugging Face tokenizer files count only if they are exactly GPT-2's; anything else is refused
    with one line that says how to name the tokenizer."""
    directory, _ = gpt2_vocab_hf
    assert load_hf_model(directory)[1].encoding == "gpt2"  # the hub's vocab.json + merges.txt
    # the same files as transformers writes them (tokenizer.json and all)
    saved = tmp_path / "saved"
    shutil.copytree(directory, saved)
    transformers.AutoTokenizer.from_pretrained(directory).save_pretrained(saved)
    (saved / "vocab.json").unlink()
    assert (saved / "tokenizer.json").is_file() and load_hf_model(saved)[1].encoding == "gpt2"

    def tampered(name: str, edit) -> Path:
        copy = tmp_path / f"tampered-{name}-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(directory, copy)
        (copy / name).write_text(edit((copy / name).read_text(encoding="utf-8")), encoding="utf-8")
        return copy

    def swap_merges(text):
        lines = text.split("\n")
        lines[100], lines[101] = lines[101], lines[100]
        return "\n".join(lines)

    def swap_ids(text):
        vocab = json.loads(text)
        vocab["the"], vocab["The"] = vocab["The"], vocab["the"]
        return json.dumps(vocab)

    def drop_token(text):
        vocab = json.loads(text)
        del vocab["the"]
        return json.dumps(vocab)

    cases = [(tampered("merges.txt", swap_merges), "merges differ"),
             (tampered("vocab.json", swap_ids), "token ids differ"),
             (tampered("vocab.json", drop_token), "50256 tokens, not 50257")]
    for copy, why in cases:
        with pytest.raises(CheckpointError, match=why) as e:
            load_hf_model(copy)
        assert one_line(str(e.value)) and "--tokenizer gpt2" in str(e.value)
        assert load_hf_model(copy, "gpt2")[1].encoding == "gpt2"  # named explicitly: fine

    # a byte-level BPE of another vocabulary (trained with tokenizers): not GPT-2's
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    other = Tokenizer(models.BPE())
    other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    other.train_from_iterator([SHAKESPEARE.read_text(encoding="utf-8")[:20000]], trainers.BpeTrainer(vocab_size=300))
    foreign = tmp_path / "foreign"
    make_hf(foreign, **SMALL)
    other.save(str(foreign / "tokenizer.json"))
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is not GPT-2's byte-level BPE \(\d+ tokens"):
        load_hf_model(foreign)
    # no tokenizer at all
    bare = tmp_path / "bare"
    make_hf(bare, **SMALL)
    with pytest.raises(CheckpointError, match="has neither gptlab_tokenizer.json nor Hugging Face tokenizer files"):
        load_hf_model(bare)
    # a named tokenizer larger than the model's vocabulary
    with pytest.raises(CheckpointError, match="50257 tokens but the model's vocab_size is 100"):
        load_hf_model(bare, "gpt2")
    with pytest.raises(CheckpointError, match="unknown BPE encoding 'gpt3'"):
        load_hf_model(bare, "gpt3")


def test_read_hf_layout(small_hf):
    directory, hf = small_hf
    cfg, state = read_hf(directory)
    assert cfg == {
        "arch": "gpt", "vocab_size": 100, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32,
        "bias": True, "qkv_bias": True, "tie_weights": True, "layer_norm_eps": 1e-5,
    }
    assert "lm_head.weight" not in state and not any(k.endswith(".attn.bias") for k in state)
    # Conv1D (in, out) -> nn.Linear (out, in)
    assert state["transformer.h.0.attn.c_attn.weight"].shape == (96, 32)
    assert torch.equal(state["transformer.h.1.mlp.c_fc.weight"], hf.transformer.h[1].mlp.c_fc.weight.t())
    assert torch.equal(state["transformer.h.1.mlp.c_fc.bias"], hf.transformer.h[1].mlp.c_fc.bias)


# ----------------------------------------------------------------------------------------------
# model.init_from: load_pretrained_into


def test_load_pretrained_into_a_configured_model(small_hf, tmp_path):
    directory, hf = small_hf
    # conf/model/*.yaml keys, dropout for finetuning, and a shorter context than the checkpoint's
    # (the first 16 positions are kept)
    base = dict(arch="gpt", vocab_size=100, n_layer=2, n_head=2, n_embd=32, dropout=0.1, bias=True, qkv_bias=None)
    model = build_model(dict(base, block_size=16))
    assert load_pretrained_into(model, directory) is model
    model.eval()
    ids = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        ref = hf(ids).logits
        assert rel_err(model(ids), ref) < 1e-4
        # an untied model takes the tied checkpoint's embedding as its head (a copy, not an alias)
        untied = load_pretrained_into(build_model(dict(base, block_size=32, tie_weights=False)), directory).eval()
        assert untied.lm_head.weight is not untied.transformer.wte.weight
        assert torch.equal(untied.lm_head.weight, untied.transformer.wte.weight)
        assert rel_err(untied(ids), ref) < 1e-4
        # an imported gptlab checkpoint initialises a model just as well
        ckpt = import_checkpoint(directory, tmp_path / "small.ckpt", tokenizer=str(char_file(tmp_path))).path
        from_ckpt = load_pretrained_into(build_model(dict(base, block_size=32)), ckpt).eval()
        assert rel_err(from_ckpt(ids), ref) < 1e-4
        # ... also into a shorter context
        short = load_pretrained_into(build_model(dict(base, block_size=16)), ckpt).eval()
        assert rel_err(short(ids), ref) < 1e-4
    with pytest.raises(ConfigError, match=r"^model\.n_embd=64 but the checkpoint .*small\.ckpt has n_embd=32$"):
        load_pretrained_into(build_model(dict(base, block_size=32, n_embd=64)), ckpt)
    with pytest.raises(ConfigError, match=r"model\.tie_weights=false but the checkpoint .* has tie_weights=true"):
        load_pretrained_into(build_model(dict(base, block_size=32, tie_weights=False)), ckpt)


def test_mismatched_models_name_the_offending_key(small_hf, tmp_path):
    directory, _ = small_hf
    shape = dict(vocab_size=100, block_size=32, n_layer=2, n_head=2, n_embd=32)

    def load(**changes):
        load_pretrained_into(build_model({**shape, **changes}), directory)

    with pytest.raises(CheckpointError, match=r"transformer\.wte\.weight: checkpoint \(100, 32\) vs model \(100, 64\)"):
        load(n_embd=64)
    with pytest.raises(CheckpointError, match=r"transformer\.wte\.weight: checkpoint \(100, 32\) vs model \(128, 32\)"):
        load(vocab_size=128)
    with pytest.raises(CheckpointError, match=r"transformer\.wpe\.weight: checkpoint \(32, 32\) vs model \(64, 32\)"):
        load(block_size=64)
    with pytest.raises(CheckpointError, match=r"transformer\.h\.2\.ln_1\.weight: the model has this parameter but"):
        load(n_layer=3)
    with pytest.raises(CheckpointError, match=r"transformer\.h\.0\.attn\.c_attn\.bias: in the checkpoint .* no such"):
        load(qkv_bias=False)
    with pytest.raises(ConfigError, match=r"model\.n_head=4 but the checkpoint .* n_head=2"):
        load(n_head=4)
    # an untied checkpoint cannot go into a tied model
    untied_dir = tmp_path / "untied"
    make_hf(untied_dir, **SMALL, tie_word_embeddings=False)
    with pytest.raises(CheckpointError, match=r"lm_head\.weight: .* model\.tie_weights=false"):
        load_pretrained_into(build_model(shape), untied_dir)
    # Conv1D weights are reported in the Hugging Face layout (in, out)
    cfg, state = read_hf(directory)
    state["transformer.h.1.attn.c_attn.weight"] = torch.zeros(144, 48)
    message = r"transformer\.h\.1\.attn\.c_attn\.weight: checkpoint \(48, 144\) vs model \(32, 96\)"
    with pytest.raises(CheckpointError, match=message):
        copy_into(build_model(shape), cfg, state, str(directory))


# ----------------------------------------------------------------------------------------------
# bad input: one line naming what is wrong


def test_non_gpt2_checkpoints_are_rejected(tmp_path):
    other = tmp_path / "mistral"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(CheckpointError, match="model_type='mistral' is neither GPT-2 nor Llama; gptlab reads"):
        load_hf_model(other)
    # a Llama config.json states its sizes: LlamaConfig's defaults would make a 7B model
    (other / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(CheckpointError, match=r"mistral/config\.json has no vocab_size; a Llama config\.json states"):
        load_hf_model(other)
    with pytest.raises(CheckpointError, match="BertModel"):
        hf_config_to_model_cfg({"architectures": ["BertModel"]})
    sizes = dict(n_embd=32, n_layer=1, n_head=2, vocab_size=10, n_positions=8)
    with pytest.raises(CheckpointError, match="activation_function='relu'"):
        hf_config_to_model_cfg({"model_type": "gpt2", **sizes, "activation_function": "relu"})
    with pytest.raises(CheckpointError, match="n_inner=100"):
        hf_config_to_model_cfg({"model_type": "gpt2", **sizes, "n_inner": 100})
    with pytest.raises(CheckpointError, match="scale_attn_by_inverse_layer_idx"):
        hf_config_to_model_cfg({"model_type": "gpt2", **sizes, "scale_attn_by_inverse_layer_idx": True})
    # GPT2Config defaults fill the options an old config.json leaves out, never the sizes
    cfg = hf_config_to_model_cfg({"model_type": "gpt2", **sizes})
    assert (cfg["tie_weights"], cfg["layer_norm_eps"]) == (True, 1e-5)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"n_embd": "abc"}, "bad/config.json: n_embd='abc' is not a positive integer"),
        ({"n_layer": -2}, "n_layer=-2 is not a positive integer"),
        ({"n_head": 0}, "n_head=0 is not a positive integer"),
        ({"vocab_size": 100.5}, "vocab_size=100.5 is not a positive integer"),
        ({"n_positions": True}, "n_positions=True is not a positive integer"),
        ({"n_embd": None}, "n_embd=None is not a positive integer"),
        ({"n_head": 3}, "n_embd=32 is not a multiple of n_head=3"),
        ({"layer_norm_epsilon": "1e-5"}, "layer_norm_epsilon='1e-5' is not a number"),
        ({"layer_norm_epsilon": -1}, "layer_norm_epsilon=-1 is not a number"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings='yes' is not true or false"),
        ({"architectures": "GPT2LMHeadModel"}, "architectures='GPT2LMHeadModel' is not a list"),
        ({"n_layer": ...}, "config.json has no n_layer"),
        ({"n_positions": ...}, "config.json has no n_positions"),
    ],
)
def test_bad_config_json_is_one_line(small_hf, tmp_path, capsys, change, message):
    directory, _ = small_hf
    bad = tmp_path / "bad"
    shutil.copytree(directory, bad)
    config = json.loads((bad / "config.json").read_text())
    for key, value in change.items():
        if value is ...:
            del config[key]
        else:
            config[key] = value
    (bad / "config.json").write_text(json.dumps(config))
    assert hf_main(["import", str(bad), str(tmp_path / "bad.ckpt"), "--tokenizer", str(char_file(tmp_path))]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and one_line(captured.err) and message in captured.err, captured.err
    assert not (tmp_path / "bad.ckpt").exists()


class _NotATensor:
    pass


def test_unreadable_sources_give_clear_errors(tmp_path, small_hf):
    with pytest.raises(CheckpointError, match="directory not found"):
        read_hf(tmp_path / "no" / "such" / "dir")
    with pytest.raises(CheckpointError, match="network"):
        read_hf("gptlab-tests/no-such-model-0")  # offline: no hub; online: no such repo
    directory, _ = small_hf
    with pytest.raises(CheckpointError, match="is a file"):
        read_hf(directory / "config.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        read_hf(empty)
    (empty / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="is a JSON list, not a JSON object"):
        read_hf(empty)
    (empty / "config.json").write_text(json.dumps({"model_type": "gpt2", **dict(SMALL)}))
    with pytest.raises(CheckpointError, match="no model.safetensors or pytorch_model.bin"):
        read_hf(empty)
    index = {"weight_map": {"wte.weight": "model-1.safetensors"}}
    (empty / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model-1\.safetensors is not a readable safetensors file"):
        read_hf(empty)
    (empty / "model.safetensors.index.json").unlink()
    # a pickle that would run code is refused (weights_only=True)
    torch.save({"transformer.wte.weight": torch.zeros(2, 2), "x": _NotATensor()}, empty / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_hf(empty)
    (empty / "gptlab_tokenizer.json").write_text(json.dumps({"kind": "char"}))
    with pytest.raises(CheckpointError, match=r"gptlab_tokenizer\.json: char tokenizer state: 'chars' is None"):
        load_hf_model(empty)


def test_export_needs_gpt2_options(tmp_path):
    small = dict(vocab_size=10, block_size=8, n_layer=1, n_head=1, n_embd=8)
    with pytest.raises(ConfigError, match="model.bias=false"):
        export_hf(build_model(dict(small, bias=False)), tmp_path / "a")
    with pytest.raises(ConfigError, match="model.qkv_bias=false"):
        export_hf(build_model(dict(small, qkv_bias=False)), tmp_path / "b")
    with pytest.raises(ConfigError, match="model.arch=gpt"):
        export_hf(build_model(dict(arch="bigram", vocab_size=10)), tmp_path / "c")
    model = build_model(small)
    model.transformer.h[0].mlp.gelu = torch.nn.GELU()
    with pytest.raises(ConfigError, match=r"transformer\.h\.0\.mlp\.gelu"):
        export_hf(model, tmp_path / "d")
    with pytest.raises(CheckpointError, match="the char tokenizer has 12 tokens but the model's vocab_size is 10"):
        export_hf(build_model(small), tmp_path / "e" / "f", CharTokenizer("abcdefghijkl"))
    # variants: GPT-2 cannot express them (pos=rope exports as Llama, which refuses what it lacks)
    with pytest.raises(ConfigError, match=r"^model\.norm=rmsnorm cannot be exported: GPT-2 has learned positions"):
        export_hf(build_model(dict(small, norm="rmsnorm", bias=False)), tmp_path / "g")
    with pytest.raises(ConfigError, match=r"^model\.mlp_hidden=16 cannot be exported: GPT-2 has"):
        export_hf(build_model(dict(small, mlp_hidden=16)), tmp_path / "h")
    with pytest.raises(ConfigError, match=r"^model\.norm=layernorm: Llama needs model\.norm=rmsnorm$"):
        export_hf(build_model(dict(small, pos="rope", bias=False)), tmp_path / "i")
    assert sorted(os.listdir(tmp_path)) == []


# ----------------------------------------------------------------------------------------------
# command line and the tokenizer of exported directories


def test_cli_import_then_export(tmp_path, small_hf, capsys):
    directory, hf = small_hf
    ckpt = tmp_path / "small.ckpt"
    # no tokenizer in the directory: refused, nothing written
    assert hf_main(["import", str(directory), str(ckpt)]) == 1
    err = capsys.readouterr().err
    assert one_line(err) and "has neither gptlab_tokenizer.json nor" in err and "--tokenizer gpt2" in err
    assert not ckpt.exists()
    assert hf_main(["import", str(directory), str(ckpt), "--tokenizer", "gpt2"]) == 1
    assert "50257 tokens but the model's vocab_size is 100" in capsys.readouterr().err

    chars = char_file(tmp_path)
    assert hf_main(["import", str(directory), str(ckpt), "--tokenizer", str(chars)]) == 0
    out = capsys.readouterr().out
    assert one_line(out) and f"-> {ckpt}" in out and "char tokenizer (10 tokens, from tokenizer=" in out
    model, hparams = checkpoint.model_from_checkpoint(checkpoint.load(ckpt), ckpt)
    assert hparams["tokenizer"] == CharTokenizer(CHARS).state_dict()
    assert checkpoint.load(ckpt)["gptlab"]["source"] == str(directory)
    ids = torch.randint(0, 100, (2, 32))
    with torch.no_grad():
        ref = hf(ids).logits
        assert rel_err(model.eval()(ids), ref) < 1e-4

    assert hf_main(["export", str(ckpt), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert one_line(out) and "config.json, gptlab_tokenizer.json, model.safetensors" in out and "char tokenizer" in out
    with torch.no_grad():
        assert rel_err(GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()(ids).logits, ref) < 1e-4
    # the exported directory carries its tokenizer: a plain import needs no --tokenizer
    assert hf_main(["import", str(tmp_path / "out"), str(tmp_path / "again.ckpt")]) == 0
    assert "from " + str(tmp_path / "out" / "gptlab_tokenizer.json") in capsys.readouterr().out

    # user errors: one line on stderr, exit status 1
    assert hf_main(["export", str(tmp_path / "missing.ckpt"), str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: checkpoint not found") and one_line(err)
    assert hf_main(["import", str(tmp_path / "nowhere/dir"), str(tmp_path / "y.ckpt")]) == 1
    assert "directory not found" in capsys.readouterr().err
    assert hf_main(["import", str(directory), str(tmp_path), "--tokenizer", str(chars)]) == 1
    assert "is a directory; give the checkpoint file to write" in capsys.readouterr().err


def test_char_and_word_models_export_their_vocabulary(tmp_path):
    """Sampling an exported char model decodes with its own characters (GPT-2's would index past
    them), and importing it does not label it GPT-2 BPE."""
    text = SHAKESPEARE.read_text(encoding="utf-8")[:20000]
    char = CharTokenizer(text)
    shape = dict(arch="gpt", vocab_size=char.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)
    ckpt = gptlab_ckpt(tmp_path / "char.ckpt", shape, char.state_dict())
    exported = export_checkpoint(ckpt, tmp_path / "char-hf")
    assert "char tokenizer (" + str(char.vocab_size) + " tokens)" in str(exported)
    out = exported.path
    config = json.loads((out / "config.json").read_text())
    assert "tokenizer_class" not in config and config["eos_token_id"] is None
    assert not (out / "vocab.json").exists() and not (out / "generation_config.json").exists()
    assert json.loads((out / "gptlab_tokenizer.json").read_text()) == char.state_dict()

    args = ["prompt=ROMEO:", "max_new_tokens=30", "num_samples=1", "device=cpu", "greedy=true"]
    from_dir = run_sample([f"ckpt_path={out}", *args])
    assert from_dir == run_sample([f"ckpt_path={ckpt}", *args])  # the same model, the same characters
    assert from_dir[0].startswith("ROMEO:") and len(from_dir[0]) == 36 and set(from_dir[0]) <= set(char.chars)

    imported = import_checkpoint(out, tmp_path / "back.ckpt")
    assert checkpoint.info(imported.path).tokenizer == char.state_dict()

    # a word model: its end-of-text token becomes GPT-2's bos/eos
    word = WordTokenizer(WordTokenizer.split(text))
    shape = dict(shape, vocab_size=word.vocab_size + 3)  # a padded vocabulary is fine
    out = export_checkpoint(gptlab_ckpt(tmp_path / "word.ckpt", shape, word.state_dict()), tmp_path / "word-hf").path
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == word.eot_id
    assert load_hf_model(out)[1].state_dict() == word.state_dict()

    # a checkpoint without tokenizer state: the weights are exported, and the summary says what is missing
    bare = export_checkpoint(gptlab_ckpt(tmp_path / "bare.ckpt", shape, None), tmp_path / "bare-hf")
    assert bare.files == ["config.json", "model.safetensors"] and "no tokenizer" in str(bare)
    # a tokenizer larger than the model is an error, not an export
    small = dict(shape, vocab_size=char.vocab_size - 1)
    with pytest.raises(CheckpointError, match=rf"{char.vocab_size} tokens but the model's vocab_size is"):
        export_checkpoint(gptlab_ckpt(tmp_path / "small.ckpt", small, char.state_dict()), tmp_path / "small-hf")
    assert not (tmp_path / "small-hf").exists()


class CharTokenizerWithHFFiles(CharTokenizer):
    """A tokenizer that writes its own Hugging Face files (the `to_hf_files` hook of the export)."""

    def to_hf_files(self, directory: Path) -> None:
        from tokenizers import Tokenizer, models, pre_tokenizers

        fast = Tokenizer(models.WordLevel(vocab=dict(self.stoi), unk_token=self.chars[0]))
        fast.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
        fast.save(str(Path(directory) / "tokenizer.json"))


def test_tokenizers_with_to_hf_files_write_their_own(tmp_path):
    tok = CharTokenizerWithHFFiles("abcdefgh")
    model = build_model(dict(vocab_size=8, block_size=8, n_layer=1, n_head=1, n_embd=8))
    out, files = export_hf(model, tmp_path / "out", tok)
    assert files == ["config.json", "gptlab_tokenizer.json", "model.safetensors", "tokenizer.json"]
    assert "tokenizer_class" not in json.loads((out / "config.json").read_text())
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(out / "tokenizer.json")).encode("cafe").ids == tok.encode("cafe")
    # gptlab_tokenizer.json decides over the Hugging Face files
    assert load_hf_model(out)[1].state_dict() == tok.state_dict()


def test_export_into_an_earlier_export_replaces_its_files(tmp_path):
    out = tmp_path / "out"
    big = build_model(dict(vocab_size=50257, block_size=8, n_layer=1, n_head=1, n_embd=8))
    export_hf(big, out, BPETokenizer("gpt2"))
    (out / "README.md").write_text("mine")
    small = build_model(dict(vocab_size=10, block_size=8, n_layer=1, n_head=1, n_embd=8))
    export_hf(small, out, CharTokenizer("abcdefghij"))
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "gptlab_tokenizer.json", "model.safetensors"]
    assert load_hf_model(out)[1].vocab_size == 10
    # the staging directory of an export that was killed is cleared by the next one
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    debris = temp_name(out, directory=True)
    debris = debris.with_name(debris.name.replace(f"-{os.getpid()}-", f"-{dead.stdout.strip()}-"))
    debris.mkdir()
    (debris / "model.safetensors").write_bytes(b"half")
    export_hf(small, tmp_path / "other")
    assert not debris.exists() and sorted(os.listdir(tmp_path)) == ["other", "out"]


# ----------------------------------------------------------------------------------------------
# a full disk and a read-only filesystem (a 1 MiB tmpfs)


@pytest.fixture
def small_disk(tmp_path) -> Path:
    mount = tmp_path / "disk"
    mount.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_full_and_read_only_disks(small_disk, tmp_path):
    small = build_model(dict(vocab_size=10, block_size=8, n_layer=1, n_head=1, n_embd=8))
    big = build_model(dict(vocab_size=2000, block_size=8, n_layer=1, n_head=1, n_embd=160))  # > 1 MiB
    # export: one line naming the file, and nothing left behind, not even the parent it created
    with pytest.raises(FilesystemError) as e:
        export_hf(big, small_disk / "new" / "out", CharTokenizer("ab"))
    assert one_line(str(e.value)) and "no space left on the device" in str(e.value)
    assert str(small_disk / "new" / "out" / "model.safetensors") in str(e.value)
    assert os.listdir(small_disk) == []
    # a failed export into an earlier one leaves the earlier one whole
    out, _ = export_hf(small, small_disk / "out", CharTokenizer("ab"))
    before = {p.name: sha(p) for p in out.iterdir()}
    with pytest.raises(FilesystemError, match="no space left"):
        export_hf(big, out, CharTokenizer("abc"))
    assert {p.name: sha(p) for p in out.iterdir()} == before and os.listdir(small_disk) == ["out"]

    # import: the checkpoint is written atomically, an earlier one survives a full disk
    hf_dir = tmp_path / "hf"
    export_hf(big, hf_dir, CharTokenizer("ab"))
    ckpt = small_disk / "model.ckpt"
    gptlab_ckpt(ckpt, dict(vocab_size=10, block_size=8, n_layer=1, n_head=1, n_embd=8), {"kind": "char", "chars": "ab"})
    saved = sha(ckpt)
    assert hf_main(["import", str(hf_dir), str(ckpt)]) == 1
    assert sha(ckpt) == saved and sorted(os.listdir(small_disk)) == ["model.ckpt", "out"]
    with pytest.raises(FilesystemError, match=rf"cannot write the checkpoint {small_disk / 'new.ckpt'}: no space"):
        import_checkpoint(hf_dir, small_disk / "new.ckpt")
    assert sorted(os.listdir(small_disk)) == ["model.ckpt", "out"]

    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(FilesystemError, match="the filesystem is read-only") as e:
        export_hf(small, small_disk / "out2")
    assert one_line(str(e.value)) and str(small_disk) in str(e.value)
    with pytest.raises(FilesystemError, match="read-only"):
        import_checkpoint(hf_dir, small_disk / "ro.ckpt")


# ----------------------------------------------------------------------------------------------
# sample.py and train.py with a Hugging Face GPT-2 (GPT-2 vocabulary, tiny width)


def test_sample_py_from_hf_directory(gpt2_vocab_hf, tmp_path):
    directory, hf = gpt2_vocab_hf
    enc = BPETokenizer("gpt2").enc
    prompt = "ROMEO: But soft"
    ids = torch.tensor([enc.encode(prompt)])
    expected = enc.decode(hf_greedy(hf, ids, 5)[0].tolist())
    args = [f"prompt={prompt}", "max_new_tokens=5", "num_samples=1", "device=cpu", "greedy=true"]
    assert run_sample([f"ckpt_path={directory}", *args]) == [expected]
    # without tokenizer files: refused, unless named
    bare = tmp_path / "bare"
    shutil.copytree(directory, bare, ignore=shutil.ignore_patterns("vocab.json", "merges.txt"))
    with pytest.raises(CheckpointError, match="sample.py: tokenizer=gpt2"):
        run_sample([f"ckpt_path={bare}", *args])
    assert run_sample([f"ckpt_path={bare}", "tokenizer=gpt2", *args]) == [expected]


def test_python_m_gptlab_hf(tmp_path, monkeypatch, capsys):
    """`python -m gptlab.hf` itself, its __main__ run as Python runs it (user errors are tested through main)."""
    import runpy

    ckpt = gptlab_ckpt(tmp_path / "c.ckpt", dict(vocab_size=10, block_size=8, n_layer=1, n_head=1, n_embd=8),
                       CharTokenizer(CHARS).state_dict())
    monkeypatch.setattr(sys, "argv", ["gptlab.hf", "export", str(ckpt), str(tmp_path / "out")])
    with pytest.raises(SystemExit) as done:
        runpy.run_module("gptlab.hf", run_name="__main__", alter_sys=True)
    assert done.value.code in (0, None)
    out = capsys.readouterr().out
    assert one_line(out) and "GPT-2 with" in out
    assert (tmp_path / "out" / "gptlab_tokenizer.json").is_file()


def _compose_train(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides)


def test_finetune_experiment_config():
    cfg = _compose_train(["experiment=finetune_shakespeare"])
    assert cfg.task_name == "finetune" and cfg.model.init_from == "gpt2"
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.block_size, cfg.model.dropout) == (12, 768, 1024, 0.1)
    assert cfg.data.tokenizer == "bpe" and cfg.data.batch_size == 1
    assert cfg.optim.lr == cfg.optim.min_lr == 3e-5 and cfg.optim.warmup_steps == 0
    assert cfg.trainer.max_steps == 20 and cfg.trainer.accumulate_grad_batches == 32
    # train.py counts val_check_interval in optimizer steps (Lightning's micro-batches = 5 x 32)
    assert cfg.trainer.val_check_interval == 5


def test_init_from_end_to_end(gpt2_vocab_hf, tmp_path):
    """train.py train=false with the finetune recipe and model.init_from: the validation loss is
    the Hugging Face model's own loss on the same windows (so the weights really were loaded). The
    recipe's model=gpt2 (12 layers of 768) need not be restated: the shape is the checkpoint's."""
    directory, hf = gpt2_vocab_hf
    if not SHAKESPEARE.is_file():
        pytest.skip(f"offline corpus missing: {SHAKESPEARE}")
    data_dir = tmp_path / "data"
    val_loss = run_train([
        "experiment=finetune_shakespeare", "train=false", f"model.init_from={directory}",
        f"data.path={SHAKESPEARE}", "data.val_windows=6", "data.batch_size=3", f"paths.data_dir={data_dir}",
        "callbacks=none", "logger=none", "trainer.accelerator=cpu", "+trainer.enable_progress_bar=false",
    ], tmp_path / "run")

    from gptlab.data import TokenDataModule

    dm = TokenDataModule(path=str(SHAKESPEARE), data_dir=str(data_dir), tokenizer="bpe", block_size=64,
                         batch_size=3, val_windows=6)
    dm.setup()
    losses, counts = [], []
    with torch.no_grad():
        for x, y in dm.val_dataloader():
            logits = hf(x).logits
            losses.append(float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))) * x.size(0))
            counts.append(x.size(0))
    expected = sum(losses) / sum(counts)
    assert abs(expected - math.log(50257)) > 0.5  # far from an untrained model's loss
    assert val_loss == pytest.approx(expected, rel=1e-4)


# ----------------------------------------------------------------------------------------------
# Llama (LlamaForCausalLM): import, export, sample.py; model.init_from takes the checkpoint's shape

LLAMA = dict(vocab_size=61, hidden_size=32, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=24, rope_theta=500.0, rms_norm_eps=1e-5)


def make_llama(directory: Path, fmt: str = "safetensors", seed: int = 0, **kwargs) -> LlamaForCausalLM:
    """A random LlamaForCausalLM saved to `directory` in layout `fmt` (safetensors, sharded, bin); every
    weight random and the norm gains around 1, so a swapped norm or projection cannot go unnoticed."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(bos_token_id=None, eos_token_id=None, **kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("norm.weight") else 0.0))
    if fmt == "bin":
        model.config.save_pretrained(directory)
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    else:
        model.save_pretrained(directory, **({"max_shard_size": "20KB"} if fmt == "sharded" else {}))
    assert (fmt == "sharded") is (directory / "model.safetensors.index.json").is_file()
    return model


def shakespeare_chars() -> CharTokenizer:
    return CharTokenizer(SHAKESPEARE.read_text(encoding="utf-8"))


def llama_nano_ckpt(path: Path, tokenizer, tied: bool = False, seed: int = 0) -> Path:
    """A gptlab checkpoint of conf/model/llama_nano.yaml's shape (tied: with 3 key/value heads), random
    weights far from any initialisation (norm gains around 1)."""
    from inprocess import compose_config

    model_cfg = compose_config(["model=llama_nano"]).model
    cfg = {**OmegaConf.to_container(model_cfg, resolve=True), "vocab_size": tokenizer.vocab_size}
    for switch in RUN_SWITCHES:
        cfg.pop(switch, None)
    if tied:
        cfg.update(tie_weights=True, n_kv_head=3)
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if ".ln_" in name else 0.0))
    return checkpoint.save(checkpoint.new_checkpoint(cfg, model.state_dict(), tokenizer.state_dict()), path)


def foreign_tokenizer_json(directory: Path) -> None:
    """A tokenizer.json that is not GPT-2's (as Llama repositories have, SentencePiece-style)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    words = HFTokenizer(models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>"))
    words.save(str(directory / "tokenizer.json"))


@pytest.mark.parametrize(
    "fmt,tied,n_kv",
    [("safetensors", True, 2), ("sharded", False, 4), ("bin", False, 1)],
    ids=["tied-gqa-safetensors", "untied-sharded", "untied-mqa-bin"],
)
def test_llama_import_logits_and_greedy_ids(tmp_path, capsys, fmt, tied, n_kv):
    directory = tmp_path / "llama"
    hf = make_llama(directory, fmt, tie_word_embeddings=tied, num_key_value_heads=n_kv, **LLAMA)
    foreign_tokenizer_json(directory)
    ckpt = tmp_path / "llama.ckpt"
    capsys.readouterr()  # save_pretrained's progress bar
    # a foreign tokenizer.json and no gptlab_tokenizer.json: refused, naming --tokenizer; nothing written
    assert hf_main(["import", str(directory), str(ckpt)]) == 1
    err = capsys.readouterr().err
    assert one_line(err) and "tokenizer.json is not GPT-2's byte-level BPE" in err and "--tokenizer" in err
    assert not ckpt.exists()

    assert hf_main(["import", str(directory), str(ckpt), "--tokenizer", str(char_file(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert one_line(out) and ": Llama with " in out and "char tokenizer (10 tokens" in out
    model, hparams = checkpoint.model_from_checkpoint(checkpoint.load(ckpt), ckpt)
    cfg = hparams["model"]
    assert (cfg["pos"], cfg["norm"], cfg["mlp"], cfg["bias"], cfg["n_kv_head"], cfg["tie_weights"]) == (
        "rope", "rmsnorm", "swiglu", False, n_kv, tied)
    sizes = (cfg["n_layer"], cfg["n_embd"], cfg["mlp_hidden"], cfg["rope_theta"], cfg["block_size"])
    assert sizes == (2, 32, 88, 500.0, 24)
    assert (model.lm_head.weight is model.transformer.wte.weight) is tied
    model.eval()
    torch.manual_seed(1)
    ids = torch.randint(0, 61, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=0, atol=1e-4)
    prompt = ids[:, :4]
    expected = hf.generate(prompt, max_new_tokens=16, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert torch.equal(generate(model, prompt, 16, greedy=True), expected)


@pytest.mark.parametrize("tied", [False, True], ids=["llama_nano-untied-mqa", "tied-mha"])
def test_llama_export_loads_with_from_pretrained(tmp_path, capsys, tied):
    tok = shakespeare_chars()
    ckpt = llama_nano_ckpt(tmp_path / "nano.ckpt", tok, tied)
    out = tmp_path / "out"
    assert hf_main(["export", str(ckpt), str(out)]) == 0
    printed = capsys.readouterr().out
    assert one_line(printed) and ": Llama with " in printed and "char tokenizer (65 tokens)" in printed
    assert sorted(os.listdir(out)) == ["config.json", "gptlab_tokenizer.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["architectures"], config["tie_word_embeddings"]) == (
        "llama", ["LlamaForCausalLM"], tied)
    assert (config["num_key_value_heads"], config["intermediate_size"]) == (3 if tied else 1, 128)
    assert ("lm_head.weight" in load_file(out / "model.safetensors")) is not tied  # safetensors refuses aliases
    hf, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()
    model = checkpoint.model_from_checkpoint(checkpoint.load(ckpt), ckpt)[0].eval()
    torch.manual_seed(2)
    ids = torch.randint(0, 65, (2, 64))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=0, atol=1e-4)
    prompt = ids[:, :5]
    expected = hf.generate(prompt, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert torch.equal(generate(model, prompt, 20, greedy=True), expected)
    if tied:
        return
    # sample.py from the directory decodes with its own tokenizer (gptlab_tokenizer.json) what transformers decodes
    start = torch.tensor([tok.encode("ROMEO:")])
    ids = hf.generate(start, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(start))
    text = tok.decode(ids[0].tolist())
    args = ["prompt=ROMEO:", "max_new_tokens=12", "num_samples=1", "device=cpu", "greedy=true"]
    assert run_sample([f"ckpt_path={out}", *args]) == [text]
    # and the directory imports back without --tokenizer
    assert hf_main(["import", str(out), str(tmp_path / "back.ckpt")]) == 0
    assert "from " + str(out / "gptlab_tokenizer.json") in capsys.readouterr().out


def test_init_from_takes_the_checkpoints_shape(tmp_path, data_dir, monkeypatch):
    """model.init_from=<Llama directory> with the default model=gpt_micro (4 layers of 128, learned
    positions): the run has the checkpoint's shape, the run's dropout, and starts from its weights."""
    monkeypatch.setenv("GPTLAB_DATA_DIR", str(data_dir))
    ckpt = llama_nano_ckpt(tmp_path / "nano.ckpt", shakespeare_chars())
    export_checkpoint(ckpt, tmp_path / "llama")
    quick = [f"data.path={SHAKESPEARE}", f"paths.data_dir={data_dir}", "trainer.max_steps=2",
             "trainer.val_check_interval=2", "data.batch_size=4", "data.val_windows=8", "logger=none",
             "~callbacks.progress_bar", "~callbacks.text_sample"]
    init = f"model.init_from={tmp_path / 'llama'}"
    # explicit values that agree (n_layer), a smaller context and a dropout are fine
    value = run_train([init, *quick, "model.n_layer=3", "model.block_size=32", "model.dropout=0.1"], tmp_path / "run")
    assert value is not None and math.isfinite(value)
    trained = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    hp = trained["hyper_parameters"]["model"]
    assert (hp["n_layer"], hp["n_embd"], hp["n_head"], hp["n_kv_head"], hp["pos"], hp["mlp"], hp["vocab_size"]) == (
        3, 48, 3, 1, "rope", "swiglu", 65)
    assert (hp["block_size"], hp["dropout"]) == (32, 0.1) and "init_from" not in hp
    assert trained["global_step"] == 2
    # two steps from the exported weights: close to them, far from the other initialisations
    start = checkpoint.model_state(checkpoint.load(ckpt))["transformer.wte.weight"]
    now = checkpoint.model_state(trained)["transformer.wte.weight"]
    assert float((now - start).abs().mean()) < 0.05 * float(start.abs().mean())

    # an explicit value that disagrees is one line naming the key, the value given and the checkpoint's
    with pytest.raises(ConfigError) as e:
        run_train([init, *quick, "model.n_layer=4"], tmp_path / "bad")
    message = str(e.value)
    assert one_line(message) and message.startswith(f"model.n_layer=4 but {init} has n_layer=3 (")
    with pytest.raises(ConfigError, match=r"^model\.block_size=128 but .* has block_size=64; .*only be smaller"):
        run_train([init, *quick, "model.block_size=128"], tmp_path / "bad")
    # the data's tokenizer must fit the checkpoint's vocabulary (here a gptlab checkpoint of 10 tokens)
    small = gptlab_ckpt(tmp_path / "small.ckpt", dict(vocab_size=10, block_size=8, n_layer=1, n_head=1, n_embd=8),
                        CharTokenizer(CHARS).state_dict())
    with pytest.raises(ConfigError, match=r"model\.vocab_size=10 is smaller than the tokenizer's 65"):
        run_train([f"model.init_from={small}", *quick], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
