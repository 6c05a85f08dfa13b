"""Hugging Face GPT-2 weights in and out of gptlab's GPT.

gptlab's GPT has GPT-2's layout and module names, so converting is a matter of three details:

* Hugging Face stores `attn.c_attn`, `attn.c_proj`, `mlp.c_fc` and `mlp.c_proj` as `Conv1D` layers
  whose weight is (in, out); gptlab uses `nn.Linear`, whose weight is (out, in). Those four weights
  are transposed on the way in and out.
* Checkpoints of `GPT2Model` (and OpenAI's original `pytorch_model.bin`) have no `transformer.`
  prefix; both spellings are read. The causal-mask buffers `attn.bias` / `attn.masked_bias` of old
  checkpoints are not weights and are ignored.
* A tied output head is not stored (`lm_head.weight` is absent); an untied one is loaded into
  `lm_head` of a model built with `tie_weights=False`.

Entry points: `load_hf_gpt2` (sample.py, for a directory), `load_pretrained_into`
(train.py, for `model.init_from`), `export_hf`, and the command line

    python -m gptlab.models.hf export <run>/checkpoints/last.ckpt <out_dir>
    python -m gptlab.models.hf import <hf dir or hub id> <out.ckpt>

This is the only gptlab module that touches safetensors / huggingface_hub, and it imports them
lazily, so the rest of gptlab works without the `hf` extra (`pip install -e ".[hf]"`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch

from gptlab.errors import CheckpointError, ConfigError, GptlabError
from gptlab.models import build_model
from gptlab.models.gpt import GPT

# Hugging Face Conv1D layers: weight (in, out), i.e. the transpose of nn.Linear's (out, in)
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# activations that are GELU with the tanh approximation (gptlab's MLP)
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
# GPT2Config defaults, used (as transformers does) for keys an old config.json leaves out
HF_DEFAULTS = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "layer_norm_epsilon": 1e-5,
    "activation_function": "gelu_new",
}
# GPT2Config options that gptlab's GPT has fixed to these values
FIXED_OPTIONS = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False}
GPT2_EOT = 50256
GPT2_TOKENIZERS = ("gpt2", "r50k_base")  # tiktoken names of GPT-2's byte-level BPE
# non-weight buffers of old checkpoints (h.N.attn.bias is the causal mask, not c_attn's bias)
_BUFFER = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$")
_INSTALL_HINT = 'install the Hugging Face extra: pip install -e ".[hf]"'


def _is_conv1d(key: str) -> bool:
    return key.endswith(CONV1D_SUFFIXES)


def _hf_shape(key: str, shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """A gptlab (nn.Linear) shape as Hugging Face stores it."""
    shape = tuple(shape)
    return tuple(reversed(shape)) if _is_conv1d(key) and len(shape) == 2 else shape


# ----------------------------------------------------------------------------------------------
# config.json <-> gptlab model config


def hf_config_to_model_cfg(config_json: dict[str, Any]) -> dict[str, Any]:
    """The gptlab model config (a `conf/model/*.yaml`-style dict) of a Hugging Face GPT-2 config.json."""
    if not isinstance(config_json, dict):
        raise CheckpointError(f"config.json must hold a JSON object, not {type(config_json).__name__}")
    model_type = config_json.get("model_type")
    architectures = config_json.get("architectures") or []
    if model_type is not None and model_type != "gpt2":
        raise CheckpointError(
            f"config.json: model_type={model_type!r} is not GPT-2; only model_type 'gpt2' checkpoints "
            f"(GPT2LMHeadModel) can be loaded into gptlab's GPT"
        )
    foreign = [a for a in architectures if not str(a).startswith("GPT2")]
    if foreign:
        raise CheckpointError(
            f"config.json: architectures={architectures} is not GPT-2; only GPT2LMHeadModel / GPT2Model "
            f"checkpoints can be loaded into gptlab's GPT"
        )
    if model_type is None and not architectures:
        raise CheckpointError("config.json names neither model_type nor architectures; expected model_type 'gpt2'")

    def get(key: str) -> Any:
        return config_json.get(key, HF_DEFAULTS[key])

    activation = get("activation_function")
    if activation not in TANH_GELUS:
        raise CheckpointError(
            f"config.json: activation_function={activation!r} is not supported; gptlab's GPT uses GELU with "
            f"the tanh approximation ({' / '.join(TANH_GELUS)})"
        )
    n_embd = get("n_embd")
    n_inner = config_json.get("n_inner")
    if n_inner is not None and n_inner != 4 * n_embd:
        raise CheckpointError(
            f"config.json: n_inner={n_inner} is not supported; gptlab's MLP is 4 * n_embd = {4 * n_embd}"
        )
    # options of GPT2Config that change the computation and that gptlab's GPT does not have
    for key, supported in FIXED_OPTIONS.items():
        if key in config_json and bool(config_json[key]) != supported:
            raise CheckpointError(
                f"config.json: {key}={config_json[key]!r} is not supported (gptlab's GPT has {supported})"
            )
    return {
        "arch": "gpt",
        "vocab_size": int(get("vocab_size")),
        "block_size": int(get("n_positions")),
        "n_layer": int(get("n_layer")),
        "n_head": int(get("n_head")),
        "n_embd": int(n_embd),
        "bias": True,
        "qkv_bias": True,
        "tie_weights": bool(config_json.get("tie_word_embeddings", True)),
        "layer_norm_eps": float(get("layer_norm_epsilon")),
    }


def model_cfg_to_hf_config(model: GPT, tokenizer_name: str | None = "gpt2") -> dict[str, Any]:
    """A Hugging Face GPT-2 config.json for `model`; ConfigError names any option GPT-2 lacks."""
    if not isinstance(model, GPT):
        raise ConfigError(
            f"only gptlab GPT models (model.arch=gpt) can be exported to Hugging Face GPT-2, not {type(model).__name__}"
        )
    cfg = model.config
    if not cfg.bias:
        raise ConfigError("model.bias=false cannot be exported: GPT-2 has biases in every Linear and LayerNorm")
    if not cfg.qkv_bias:
        raise ConfigError("model.qkv_bias=false cannot be exported: GPT-2's attention c_attn has a bias")
    for i, block in enumerate(model.transformer.h):
        gelu = getattr(block.mlp, "gelu", None)
        if not isinstance(gelu, torch.nn.GELU) or gelu.approximate != "tanh":
            raise ConfigError(f"transformer.h.{i}.mlp.gelu is not GELU(approximate='tanh'); GPT-2 (gelu_new) needs it")
    gpt2_tokenizer = tokenizer_name in GPT2_TOKENIZERS
    eot = GPT2_EOT if gpt2_tokenizer and cfg.vocab_size > GPT2_EOT else None
    dtype = str(model.transformer.wte.weight.dtype).removeprefix("torch.")
    out: dict[str, Any] = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "activation_function": "gelu_new",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": bool(cfg.tie_weights),
        "bos_token_id": eot,
        "eos_token_id": eot,
        "use_cache": True,
        "torch_dtype": dtype,
        "gptlab_tokenizer": tokenizer_name,
    }
    if gpt2_tokenizer:
        out["tokenizer_class"] = "GPT2Tokenizer"
    return out


# ----------------------------------------------------------------------------------------------
# reading


def _resolve_dir(path_or_id: str | os.PathLike) -> Path:
    """A local directory, or the snapshot directory of a hub id (downloaded once, then cached)."""
    text = str(path_or_id).strip()
    if not text:
        raise CheckpointError("no Hugging Face model given: pass a local directory or a hub id such as gpt2")
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(
            f"{path} is a file; give the Hugging Face model directory (config.json + model.safetensors) "
            f"or a hub id such as gpt2"
        )
    looks_local = text.startswith((".", "/", "~", "\\")) or text.count("/") > 1 or os.sep != "/" and os.sep in text
    if looks_local:
        raise CheckpointError(f"Hugging Face model directory not found: {path}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{text!r} is no local directory; to download it from the hub, {_INSTALL_HINT}") from None
    try:
        safetensors = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
        local = Path(snapshot_download(text, allow_patterns=safetensors))
        if not any(local.glob("*.safetensors")):  # an old repo with PyTorch weights only
            local = Path(snapshot_download(text, allow_patterns=["config.json", "pytorch_model.bin"]))
    except Exception as e:  # offline, unknown repo, invalid id, gated repo, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"{text!r} is no local directory and could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}: {first}). Downloading needs network access; offline, pass a local "
            f"directory with config.json and model.safetensors (or pytorch_model.bin)"
        ) from None
    return local


def _load_weights(directory: Path) -> dict[str, torch.Tensor]:
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    binary = directory / "pytorch_model.bin"
    if single.is_file() or index.is_file():
        try:
            from safetensors import SafetensorError
            from safetensors.torch import load_file
        except ImportError:
            raise CheckpointError(f"{directory} holds safetensors weights; to read them, {_INSTALL_HINT}") from None
        files = [single] if single.is_file() else None
        if files is None:
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a readable safetensors index ({e})") from None
            files = [directory / name for name in dict.fromkeys(weight_map.values())]
        state: dict[str, torch.Tensor] = {}
        for file in files:
            try:
                state.update(load_file(str(file), device="cpu"))
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{file} is not a readable safetensors file ({e})") from None
        return state
    if binary.is_file():
        try:
            state = torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as e:  # refused pickle, truncated file, ...
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{binary} could not be loaded with weights_only=True ({first})") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{binary} does not hold a state dict")
        return state
    raise CheckpointError(f"{directory} has no model.safetensors or pytorch_model.bin")


def _to_gptlab_key(key: str) -> str | None:
    """gptlab's name of a Hugging Face key; None for keys that are not GPT weights."""
    if _BUFFER.search(key):
        return None
    if key.startswith("lm_head."):
        return key
    if key.startswith("multiple_choice_head."):  # GPT2DoubleHeadsModel's classifier
        return None
    return key if key.startswith("transformer.") else "transformer." + key


def read_hf_state_dict(path_or_id: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(gptlab model config, state dict in gptlab's names and nn.Linear layout) of a Hugging Face GPT-2.

    `path_or_id`: a directory with config.json and model.safetensors (preferred) or pytorch_model.bin,
    or a hub id such as `gpt2` (downloaded with huggingface_hub; needs network the first time).
    `lm_head.weight` is in the state dict only when the model is untied (then cfg tie_weights=False).
    """
    directory = _resolve_dir(path_or_id)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{directory} has no config.json; is it a Hugging Face model directory?")
    try:
        config_json = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config_file} is not valid JSON ({e})") from None
    cfg = hf_config_to_model_cfg(config_json)
    state: dict[str, torch.Tensor] = {}
    for key, tensor in _load_weights(directory).items():
        name = _to_gptlab_key(key)
        if name is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{directory}: {key} is not a tensor")
        if _is_conv1d(name):
            if tensor.dim() != 2:
                raise CheckpointError(f"{directory}: {key} has shape {tuple(tensor.shape)}; a Conv1D weight is 2-D")
            tensor = tensor.t()
        state[name] = tensor.contiguous()
    wte = state.get("transformer.wte.weight")
    if wte is None:
        raise CheckpointError(f"{directory}: transformer.wte.weight (the token embedding) is missing")
    head = state.pop("lm_head.weight", None)
    if not cfg["tie_weights"]:
        # untied: the head is its own matrix (transformers would initialise a missing one randomly)
        if head is None:
            raise CheckpointError(
                f"{directory}: config.json has tie_word_embeddings=false but lm_head.weight is missing"
            )
        state["lm_head.weight"] = head
    # tied: transformers uses the embedding as the head; a stored copy of it is redundant
    return cfg, state


# ----------------------------------------------------------------------------------------------
# loading into gptlab


def _describe(cfg: dict[str, Any]) -> str:
    keys = ("n_layer", "n_head", "n_embd", "vocab_size", "block_size", "tie_weights")
    return ", ".join(f"{k}={cfg[k]}" for k in keys)


def _copy_into(model: GPT, cfg: dict[str, Any], state: dict[str, torch.Tensor], source: str) -> None:
    """Copy a gptlab-layout state dict (from read_hf_state_dict) into `model`, checking every shape."""
    if not isinstance(model, GPT):
        raise ConfigError(
            f"model.init_from={source}: pretrained GPT-2 weights need model.arch=gpt, not {type(model).__name__}"
        )
    mc = model.config
    hint = f"the checkpoint {source} has {_describe(cfg)}; set model=gpt2 (or the matching model.* values)"
    if mc.n_head != cfg["n_head"]:
        raise ConfigError(f"model.n_head={mc.n_head} but {hint}")
    if abs(mc.layer_norm_eps - cfg["layer_norm_eps"]) > 1e-12:
        raise ConfigError(
            f"model.layer_norm_eps={mc.layer_norm_eps} but the checkpoint {source} uses {cfg['layer_norm_eps']}"
        )
    state = dict(state)
    params = dict(model.named_parameters(remove_duplicate=False))
    if "lm_head.weight" in state and mc.tie_weights:
        raise CheckpointError(
            f"lm_head.weight: the checkpoint {source} has an output head of its own (tie_word_embeddings=false) "
            f"but the model ties it to the token embedding; set model.tie_weights=false"
        )
    if "lm_head.weight" not in state and not mc.tie_weights:
        state["lm_head.weight"] = state["transformer.wte.weight"]  # untied model from a tied checkpoint
    wpe = state.get("transformer.wpe.weight")
    if wpe is not None and wpe.dim() == 2 and mc.block_size < wpe.size(0) and wpe.size(1) == mc.n_embd:
        # a shorter context than the checkpoint's: keep the first block_size positions (as nanoGPT does)
        state["transformer.wpe.weight"] = wpe[: mc.block_size]
    for key in state:
        if key not in params:
            raise CheckpointError(
                f"{key}: in the checkpoint {source} but the model has no such parameter "
                f"(model.bias/model.qkv_bias must be true, and {hint})"
            )
    for key, param in params.items():
        if key == "lm_head.weight" and mc.tie_weights:
            continue  # the same tensor as transformer.wte.weight
        if key not in state:
            raise CheckpointError(f"{key}: the model has this parameter but the checkpoint {source} does not ({hint})")
        tensor = state[key]
        if tuple(tensor.shape) != tuple(param.shape):
            raise CheckpointError(
                f"{key}: checkpoint {_hf_shape(key, tensor.shape)} vs model {_hf_shape(key, param.shape)} "
                f"(Hugging Face layout); {hint}"
            )
    with torch.no_grad():
        for key, param in params.items():
            if key == "lm_head.weight" and mc.tie_weights:
                continue
            param.copy_(state[key])


def load_pretrained_into(model: GPT, path_or_id: str | os.PathLike) -> GPT:
    """Overwrite `model`'s weights with a Hugging Face GPT-2 (train.py's `model.init_from`).

    The model's shape must be the checkpoint's (n_layer, n_head, n_embd, vocab_size; block_size may
    be smaller, then the first block_size positions are used). Returns `model`.
    """
    cfg, state = read_hf_state_dict(path_or_id)
    _copy_into(model, cfg, state, str(path_or_id))
    return model


def load_hf_gpt2(path_or_id: str | os.PathLike) -> GPT:
    """A gptlab GPT (in eval mode) with the weights of a Hugging Face GPT-2 directory or hub id."""
    cfg, state = read_hf_state_dict(path_or_id)
    model = build_model(cfg)
    _copy_into(model, cfg, state, str(path_or_id))
    return model.eval()


# ----------------------------------------------------------------------------------------------
# writing


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """`model`'s weights in Hugging Face GPT2LMHeadModel names and Conv1D layout (CPU, contiguous).

    A tied head is left out, as transformers saves it: safetensors refuses tensors that share
    memory, and GPT2LMHeadModel re-ties lm_head to wte when it loads.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and model.config.tie_weights:
            continue
        tensor = tensor.detach().to("cpu")
        tensor = tensor.t().contiguous() if _is_conv1d(key) else tensor.contiguous()
        out[key] = tensor
    if not model.config.tie_weights:
        # an untied head may still share storage with wte (e.g. copied by reference); never save aliases
        if out["lm_head.weight"].data_ptr() == out["transformer.wte.weight"].data_ptr():
            out["lm_head.weight"] = out["lm_head.weight"].clone()
    return out


def export_hf(model: GPT, out_dir: str | os.PathLike, tokenizer_name: str | None = "gpt2") -> Path:
    """Write `model` as a Hugging Face GPT-2 directory (config.json + model.safetensors).

    `transformers.GPT2LMHeadModel.from_pretrained(out_dir)` loads it. `tokenizer_name` is the
    tokenizer the model was trained with ("gpt2" for GPT-2 BPE; None or another name for a gptlab
    char/word tokenizer, which Hugging Face has no class for); it is noted in config.json.
    """
    config = model_cfg_to_hf_config(model, tokenizer_name)
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ConfigError(f"writing model.safetensors needs safetensors; {_INSTALL_HINT}") from None
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if config["eos_token_id"] is not None:
        generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
        (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    return out


# ----------------------------------------------------------------------------------------------
# command line


def _tokenizer_name(tokenizer_state: dict[str, Any] | None) -> str | None:
    if tokenizer_state and tokenizer_state.get("kind") == "bpe":
        encoding = tokenizer_state.get("encoding", "gpt2")
        return "gpt2" if encoding in GPT2_TOKENIZERS else encoding
    return tokenizer_state.get("kind") if tokenizer_state else None


def export_checkpoint(ckpt_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """gptlab .ckpt -> Hugging Face GPT-2 directory."""
    from gptlab import checkpoint
    from gptlab.checkpoint import model_from_checkpoint

    ckpt = checkpoint.load(ckpt_path)
    model, hparams = model_from_checkpoint(ckpt, ckpt_path)
    tokenizer = _tokenizer_name(hparams.get("tokenizer"))
    out = export_hf(model, out_dir, tokenizer_name=tokenizer)
    print(f"[gptlab] wrote {out}/config.json and model.safetensors ({model.num_params():,} parameters)")
    if tokenizer != "gpt2":
        print(
            f"[gptlab] note: the model was trained with the {tokenizer or 'unknown'} tokenizer, not GPT-2 BPE; "
            f"Hugging Face's GPT2Tokenizer does not fit it (encode/decode with gptlab's tokenizer)"
        )
    return out


def import_checkpoint(path_or_id: str | os.PathLike, out_file: str | os.PathLike) -> Path:
    """Hugging Face GPT-2 -> a gptlab checkpoint (GPT-2 BPE tokenizer) that sample.py reads."""
    out = Path(out_file).expanduser()
    if out.is_dir():
        raise ConfigError(f"{out} is a directory; give the checkpoint file to write, e.g. {out / 'gpt2.ckpt'}")
    cfg, state = read_hf_state_dict(path_or_id)
    model = build_model(cfg)
    _copy_into(model, cfg, state, str(path_or_id))
    cfg = {**cfg, "compile": False, "init_from": None}
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {"model": cfg, "tokenizer": {"kind": "bpe", "encoding": "gpt2"}},
        "global_step": 0,
    }
    torch.save(ckpt, out)
    print(f"[gptlab] wrote {out} ({model.num_params():,} parameters); sample it with python sample.py ckpt_path={out}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gptlab.models.hf", description="Convert between gptlab checkpoints and Hugging Face GPT-2."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="gptlab .ckpt -> Hugging Face GPT-2 directory (config.json + model.safetensors)")
    p.add_argument("ckpt", help="a gptlab checkpoint, e.g. outputs/train/runs/<date>/checkpoints/last.ckpt")
    p.add_argument("out_dir", help="directory to write (created if needed)")
    p = sub.add_parser("import", help="Hugging Face GPT-2 directory or hub id -> gptlab checkpoint")
    p.add_argument("source", help="a local Hugging Face GPT-2 directory, or a hub id such as gpt2")
    p.add_argument("out", help="checkpoint file to write, e.g. gpt2.ckpt")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            export_checkpoint(args.ckpt, args.out_dir)
        else:
            import_checkpoint(args.source, args.out)
    except GptlabError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"Error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
