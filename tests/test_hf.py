"""Hugging Face GPT-2 import/export (gptlab.models.hf) against transformers' own GPT2LMHeadModel.

Everything is offline: the Hugging Face models are small random GPT-2s built and saved with
transformers itself, in the layouts found in the wild (safetensors, pytorch_model.bin with and
without the `transformer.` prefix, tied and untied heads).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.torch import load_file  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from gptlab.errors import CheckpointError, ConfigError  # noqa: E402
from gptlab.models import build_model  # noqa: E402
from gptlab.models.hf import (  # noqa: E402
    export_hf,
    hf_config_to_model_cfg,
    load_hf_gpt2,
    load_pretrained_into,
    main as hf_main,
    read_hf_state_dict,
)
from gptlab.sampling import generate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TIKTOKEN_CACHE = SHARED / "tiktoken_cache"
SHAKESPEARE = SHARED / "tinyshakespeare.txt"


# ----------------------------------------------------------------------------------------------
# helpers


def make_hf(directory: Path, seed: int = 0, fmt: str = "safetensors", scale: float = 0.2, **kwargs) -> GPT2LMHeadModel:
    """A random GPT2LMHeadModel saved to `directory` in layout `fmt`.

    Every parameter is random (LayerNorm gains around 1, biases non-zero, an untied head different
    from the embedding), so a forgotten transpose or a dropped bias cannot go unnoticed.
    fmt: "safetensors" (save_pretrained), "bin" (pytorch_model.bin, transformers' key names) or
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
    assert (directory / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")).is_file()
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def hf_greedy(model: GPT2LMHeadModel, prompt: torch.Tensor, n: int) -> torch.Tensor:
    out = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n, pad_token_id=0
    )
    assert out.shape == (prompt.size(0), prompt.size(1) + n)
    return out


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


# ----------------------------------------------------------------------------------------------
# import -> same logits and greedy tokens as transformers; export -> transformers loads it back


@pytest.mark.parametrize(
    "fmt,kwargs",
    [
        pytest.param("safetensors", dict(SMALL, tie_word_embeddings=True), id="2L-2H-32-tied-safetensors"),
        pytest.param(
            "safetensors",
            dict(n_layer=3, n_head=4, n_embd=64, vocab_size=257, n_positions=64, tie_word_embeddings=False),
            id="3L-4H-64-untied-safetensors",
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

    # export back; transformers loads every weight and computes the same logits
    out = export_hf(model, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert config["activation_function"] == "gelu_new"
    assert config["n_positions"] == config["n_ctx"] == kwargs["n_positions"]
    assert config["tie_word_embeddings"] is tied
    assert config["tokenizer_class"] == "GPT2Tokenizer"
    assert config["bos_token_id"] is None  # the vocabulary is not GPT-2's 50257 tokens
    assert ("lm_head.weight" in load_file(out / "model.safetensors")) is not tied
    hf2, info = GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf2.eval()
    with torch.no_grad():
        assert rel_err(hf2(ids).logits, ref) < 1e-4


def test_export_of_a_gptlab_model_and_vocab_50257(tmp_path):
    """A model trained by gptlab (not imported), GPT-2's vocabulary size, untied, dropout > 0."""
    torch.manual_seed(0)
    model = build_model(
        dict(vocab_size=50257, block_size=24, n_layer=1, n_head=2, n_embd=16, dropout=0.1, tie_weights=False)
    ).eval()
    out = export_hf(model, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["bos_token_id"] == config["eos_token_id"] == 50256
    assert config["resid_pdrop"] == 0.1 and config["tie_word_embeddings"] is False
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 50256
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    ids = torch.randint(0, 50257, (2, 24))
    with torch.no_grad():
        assert rel_err(hf(ids).logits, model(ids)) < 1e-4
    # and back again
    again = load_hf_gpt2(out)
    assert not again.config.tie_weights
    with torch.no_grad():
        assert rel_err(again(ids), model(ids)) < 1e-4


def test_read_hf_state_dict_layout(small_hf):
    directory, hf = small_hf
    cfg, state = read_hf_state_dict(directory)
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


def test_load_pretrained_into_a_configured_model(small_hf):
    directory, hf = small_hf
    # as train.py builds it: conf/model/*.yaml keys, runtime keys included, dropout for finetuning,
    # and a shorter context than the checkpoint's (the first 16 positions are kept)
    base = dict(arch="gpt", vocab_size=100, n_layer=2, n_head=2, n_embd=32, dropout=0.1, bias=True,
                qkv_bias=None, compile=False, init_from=str(directory))
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
    from gptlab.models.hf import _copy_into

    cfg, state = read_hf_state_dict(directory)
    state["transformer.h.1.attn.c_attn.weight"] = torch.zeros(144, 48)
    message = r"transformer\.h\.1\.attn\.c_attn\.weight: checkpoint \(48, 144\) vs model \(32, 96\)"
    with pytest.raises(CheckpointError, match=message):
        _copy_into(build_model(shape), cfg, state, str(directory))


def test_non_gpt2_checkpoints_are_rejected(tmp_path):
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(CheckpointError, match="model_type='llama' is not GPT-2"):
        load_hf_gpt2(llama)
    with pytest.raises(CheckpointError, match="BertModel"):
        hf_config_to_model_cfg({"architectures": ["BertModel"]})
    with pytest.raises(CheckpointError, match="activation_function='relu'"):
        hf_config_to_model_cfg({"model_type": "gpt2", "activation_function": "relu"})
    with pytest.raises(CheckpointError, match="n_inner=100"):
        hf_config_to_model_cfg({"model_type": "gpt2", "n_embd": 32, "n_inner": 100})
    with pytest.raises(CheckpointError, match="scale_attn_by_inverse_layer_idx"):
        hf_config_to_model_cfg({"model_type": "gpt2", "scale_attn_by_inverse_layer_idx": True})
    # GPT2Config defaults fill keys an old config.json leaves out; tie_word_embeddings defaults to true
    cfg = hf_config_to_model_cfg({"model_type": "gpt2"})
    shape = (cfg["n_layer"], cfg["n_embd"], cfg["block_size"], cfg["vocab_size"], cfg["tie_weights"])
    assert shape == (12, 768, 1024, 50257, True)


class _NotATensor:
    pass


def test_unreadable_sources_give_clear_errors(tmp_path, small_hf):
    with pytest.raises(CheckpointError, match="directory not found"):
        read_hf_state_dict(tmp_path / "no" / "such" / "dir")
    with pytest.raises(CheckpointError, match="network"):
        read_hf_state_dict("gptlab-tests/no-such-model-0")  # offline: no hub; online: no such repo
    directory, _ = small_hf
    with pytest.raises(CheckpointError, match="is a file"):
        read_hf_state_dict(directory / "config.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        read_hf_state_dict(empty)
    (empty / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="no model.safetensors or pytorch_model.bin"):
        read_hf_state_dict(empty)
    # a pickle that would run code is refused (weights_only=True)
    torch.save({"transformer.wte.weight": torch.zeros(2, 2), "x": _NotATensor()}, empty / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_hf_state_dict(empty)


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
    assert not any((tmp_path / d).exists() for d in "abcd")


# ----------------------------------------------------------------------------------------------
# command line: python -m gptlab.models.hf export|import


def test_cli_import_then_export(tmp_path, small_hf, capsys):
    from gptlab import checkpoint
    from gptlab.checkpoint import model_from_checkpoint

    directory, hf = small_hf
    ckpt = tmp_path / "small.ckpt"
    assert hf_main(["import", str(directory), str(ckpt)]) == 0
    model, hparams = model_from_checkpoint(checkpoint.load(ckpt), ckpt)
    assert hparams["tokenizer"] == {"kind": "bpe", "encoding": "gpt2"}
    ids = torch.randint(0, 100, (2, 32))
    with torch.no_grad():
        ref = hf(ids).logits
        assert rel_err(model.eval()(ids), ref) < 1e-4

    assert hf_main(["export", str(ckpt), str(tmp_path / "out")]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    with torch.no_grad():
        assert rel_err(GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()(ids).logits, ref) < 1e-4

    # a char-level gptlab checkpoint: exported, with a note that GPT-2's tokenizer does not fit it
    char_model = build_model(dict(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=16))
    char_ckpt = tmp_path / "char.ckpt"
    torch.save(
        {"state_dict": {f"model.{k}": v for k, v in char_model.state_dict().items()},
         "hyper_parameters": {"model": dict(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=16),
                              "tokenizer": {"kind": "char", "chars": "abc"}}},
        char_ckpt,
    )
    assert hf_main(["export", str(char_ckpt), str(tmp_path / "char")]) == 0
    assert "char tokenizer" in capsys.readouterr().out
    config = json.loads((tmp_path / "char" / "config.json").read_text())
    assert config["gptlab_tokenizer"] == "char" and "tokenizer_class" not in config and config["eos_token_id"] is None

    # user errors: one line on stderr, exit status 1
    assert hf_main(["export", str(tmp_path / "missing.ckpt"), str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: checkpoint not found") and err.count("\n") == 1
    assert hf_main(["import", str(tmp_path / "nowhere/dir"), str(tmp_path / "y.ckpt")]) == 1
    assert "directory not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# sample.py and train.py with a Hugging Face GPT-2 (GPT-2 vocabulary, tiny width)


@pytest.fixture(scope="module")
def gpt2_vocab_hf(tmp_path_factory) -> tuple[Path, GPT2LMHeadModel]:
    directory = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    hf = make_hf(directory, seed=7, scale=0.5, n_layer=1, n_head=2, n_embd=16, vocab_size=50257, n_positions=64)
    return directory, hf


def _tiktoken_gpt2(monkeypatch):
    if not TIKTOKEN_CACHE.is_dir():
        pytest.skip(f"offline GPT-2 BPE files missing: {TIKTOKEN_CACHE}")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))
    import tiktoken

    return tiktoken.get_encoding("gpt2")


def test_sample_py_from_hf_directory(gpt2_vocab_hf, monkeypatch):
    directory, hf = gpt2_vocab_hf
    enc = _tiktoken_gpt2(monkeypatch)
    prompt = "ROMEO: But soft"
    ids = torch.tensor([enc.encode(prompt)])
    expected = enc.decode(hf_greedy(hf, ids, 5)[0].tolist())
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(TIKTOKEN_CACHE), PYTHONIOENCODING="utf-8", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), f"ckpt_path={directory}", f"prompt={prompt}",
         "max_new_tokens=5", "num_samples=1", "device=cpu", "greedy=true"],
        cwd=ROOT, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expected.encode("utf-8", "replace").decode("utf-8", "replace") in proc.stdout


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


def test_init_from_end_to_end(gpt2_vocab_hf, tmp_path, monkeypatch):
    """train.py train=false with the finetune recipe and model.init_from: the validation loss is
    the Hugging Face model's own loss on the same windows (so the weights really were loaded)."""
    directory, hf = gpt2_vocab_hf
    _tiktoken_gpt2(monkeypatch)
    if not SHAKESPEARE.is_file():
        pytest.skip(f"offline corpus missing: {SHAKESPEARE}")
    spec = importlib.util.spec_from_file_location("gptlab_train_script", ROOT / "train.py")
    train_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_script)
    data_dir = tmp_path / "data"
    cfg = _compose_train([
        "experiment=finetune_shakespeare", "train=false", f"model.init_from={directory}",
        "model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=64",
        f"data.path={SHAKESPEARE}", "data.val_windows=6", "data.batch_size=3",
        f"paths.data_dir={data_dir}", f"paths.output_dir={tmp_path / 'run'}",
        "callbacks=none", "logger=none", "trainer.accelerator=cpu", "+trainer.enable_progress_bar=false",
    ])
    val_loss = train_script.train(cfg)

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
