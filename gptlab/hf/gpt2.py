"""GPT-2 <-> gptlab's GPT: config.json keys, weight names and weight shapes.

gptlab's GPT has GPT-2's layout and module names, so converting is a matter of three details:

* Hugging Face stores `attn.c_attn`, `attn.c_proj`, `mlp.c_fc` and `mlp.c_proj` as `Conv1D` layers
  whose weight is (in, out); gptlab uses `nn.Linear`, whose weight is (out, in). Those four weights
  are transposed on the way in and out.
* Checkpoints of `GPT2Model` (and OpenAI's original `pytorch_model.bin`) have no `transformer.`
  prefix; both spellings are read. The causal-mask buffers `attn.bias` / `attn.masked_bias` of old
  checkpoints are not weights and are ignored.
* A tied output head is not stored (`lm_head.weight` is absent); an untied one is loaded into
  `lm_head` of a model built with `tie_weights=False`.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from gptlab.errors import CheckpointError, ConfigError
from gptlab.models.gpt import GPT

# Hugging Face Conv1D layers: weight (in, out), i.e. the transpose of nn.Linear's (out, in)
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# activations that are GELU with the tanh approximation (gptlab's MLP)
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
GPT2_PARTS = "learned positions, LayerNorm, a 4 n_embd GELU MLP, one key/value head per query head, no qk_norm"
# the sizes every GPT-2 config.json states; a missing one is an error, never GPT2Config's default
SIZE_KEYS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
# GPT2Config defaults, used (as transformers does) for the keys an old config.json leaves out
DEFAULTS = {"layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", "tie_word_embeddings": True}
# GPT2Config options that gptlab's GPT has fixed to these values
FIXED_OPTIONS = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False}
READABLE = "gptlab reads model_type 'gpt2' (GPT2LMHeadModel) and 'llama' (LlamaForCausalLM)"
# non-weight buffers of old checkpoints (h.N.attn.bias is the causal mask, not c_attn's bias)
_BUFFER = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$")


def is_conv1d(key: str) -> bool:
    return key.endswith(CONV1D_SUFFIXES)


def hf_shape(key: str, shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """A gptlab (nn.Linear) shape as Hugging Face stores it."""
    shape = tuple(shape)
    return tuple(reversed(shape)) if is_conv1d(key) and len(shape) == 2 else shape


# ----------------------------------------------------------------------------------------------
# config.json <-> gptlab model config


def _wrong(source: str, key: str, value: Any, expected: str) -> CheckpointError:
    return CheckpointError(f"{source}: {key}={value!r} is not {expected}")


def _size(config: dict[str, Any], key: str, source: str) -> int:
    if key not in config:
        raise CheckpointError(f"{source} has no {key}; a GPT-2 config.json states {', '.join(SIZE_KEYS)}")
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _wrong(source, key, value, "a positive integer")
    return value


def _architecture(config: dict[str, Any], source: str) -> None:
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list):
        raise _wrong(source, "architectures", architectures, "a list of class names")
    if model_type is not None and model_type != "gpt2":
        raise CheckpointError(f"{source}: model_type={model_type!r} is neither GPT-2 nor Llama; {READABLE}")
    foreign = [a for a in architectures if not str(a).startswith("GPT2")]
    if foreign:
        raise CheckpointError(f"{source}: architectures={architectures} is not GPT-2; {READABLE}")
    if model_type is None and not architectures:
        raise CheckpointError(f"{source} names neither model_type nor architectures; {READABLE}")


def hf_config_to_model_cfg(config: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
    """The gptlab model config (a `conf/model/*.yaml`-style dict) of a Hugging Face GPT-2 config.json.

    Every value is checked: a wrong type, a missing size or an option gptlab's GPT lacks is one
    CheckpointError that names the key and its value (`source`: the file, for the message)."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{source} must hold a JSON object, not {type(config).__name__}")
    _architecture(config, source)
    sizes = {key: _size(config, key, source) for key in SIZE_KEYS}
    if sizes["n_embd"] % sizes["n_head"]:
        raise CheckpointError(
            f"{source}: n_embd={sizes['n_embd']} is not a multiple of n_head={sizes['n_head']}"
        )
    get = {key: config.get(key, default) for key, default in DEFAULTS.items()}
    eps = get["layer_norm_epsilon"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1 or not math.isfinite(eps):
        raise _wrong(source, "layer_norm_epsilon", eps, "a number between 0 and 1")
    if not isinstance(get["tie_word_embeddings"], bool):
        raise _wrong(source, "tie_word_embeddings", get["tie_word_embeddings"], "true or false")
    activation = get["activation_function"]
    if activation not in TANH_GELUS:
        raise CheckpointError(
            f"{source}: activation_function={activation!r} is not supported; gptlab's GPT uses GELU with "
            f"the tanh approximation ({' / '.join(TANH_GELUS)})"
        )
    n_inner = config.get("n_inner")
    if n_inner is not None and n_inner != 4 * sizes["n_embd"]:
        raise CheckpointError(
            f"{source}: n_inner={n_inner!r} is not supported; gptlab's MLP is 4 * n_embd = {4 * sizes['n_embd']}"
        )
    # options of GPT2Config that change the computation and that gptlab's GPT does not have
    for key, supported in FIXED_OPTIONS.items():
        if key in config and config[key] is not supported:
            raise CheckpointError(f"{source}: {key}={config[key]!r} is not supported (gptlab's GPT has {supported})")
    return {
        "arch": "gpt",
        "vocab_size": sizes["vocab_size"],
        "block_size": sizes["n_positions"],
        "n_layer": sizes["n_layer"],
        "n_head": sizes["n_head"],
        "n_embd": sizes["n_embd"],
        "bias": True,
        "qkv_bias": True,
        "tie_weights": get["tie_word_embeddings"],
        "layer_norm_eps": float(eps),
    }


def model_cfg_to_hf_config(model: GPT, eot_id: int | None = None) -> dict[str, Any]:
    """A Hugging Face GPT-2 config.json for `model`; ConfigError names any option GPT-2 lacks.

    `eot_id`: the tokenizer's end-of-text token, GPT-2's bos/eos (None: the tokenizer has none)."""
    if not isinstance(model, GPT):
        raise ConfigError(
            f"only gptlab GPT models (model.arch=gpt) can be exported to Hugging Face GPT-2, not {type(model).__name__}"
        )
    cfg = model.config
    variants = cfg.variant_options()
    if variants:  # pos=rope models export as Llama (gptlab.hf.convert)
        raise ConfigError(f"{variants[0]} cannot be exported: GPT-2 has {GPT2_PARTS}")
    if not cfg.bias:
        raise ConfigError("model.bias=false cannot be exported: GPT-2 has biases in every Linear and LayerNorm")
    if not cfg.qkv_bias:
        raise ConfigError("model.qkv_bias=false cannot be exported: GPT-2's attention c_attn has a bias")
    for i, block in enumerate(model.transformer.h):
        gelu = getattr(block.mlp, "gelu", None)
        if not isinstance(gelu, torch.nn.GELU) or gelu.approximate != "tanh":
            raise ConfigError(f"transformer.h.{i}.mlp.gelu is not GELU(approximate='tanh'); GPT-2 (gelu_new) needs it")
    return {
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
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "use_cache": True,
        "torch_dtype": str(model.transformer.wte.weight.dtype).removeprefix("torch."),
    }


# ----------------------------------------------------------------------------------------------
# weights: Hugging Face names and Conv1D layout <-> gptlab's


def _to_gptlab_key(key: str) -> str | None:
    """gptlab's name of a Hugging Face key; None for keys that are not GPT weights."""
    if _BUFFER.search(key) or key.startswith("multiple_choice_head."):  # masks; GPT2DoubleHeadsModel's classifier
        return None
    if key.startswith("lm_head."):
        return key
    return key if key.startswith("transformer.") else "transformer." + key


def to_gptlab_state(cfg: dict[str, Any], hf_state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A Hugging Face GPT-2 state dict in gptlab's names and nn.Linear layout.

    `lm_head.weight` is in it only when the model is untied (cfg tie_weights=False)."""
    state: dict[str, torch.Tensor] = {}
    for key, tensor in hf_state.items():
        name = _to_gptlab_key(key)
        if name is None:
            continue
        if is_conv1d(name):
            if tensor.dim() != 2:
                raise CheckpointError(f"{source}: {key} has shape {tuple(tensor.shape)}; a Conv1D weight is 2-D")
            tensor = tensor.t()
        state[name] = tensor.contiguous()
    if "transformer.wte.weight" not in state:
        raise CheckpointError(f"{source}: transformer.wte.weight (the token embedding) is missing")
    head = state.pop("lm_head.weight", None)
    if not cfg["tie_weights"]:
        # untied: the head is its own matrix (transformers would initialise a missing one randomly)
        if head is None:
            raise CheckpointError(f"{source}: config.json has tie_word_embeddings=false but lm_head.weight is missing")
        state["lm_head.weight"] = head
    # tied: transformers uses the embedding as the head; a stored copy of it is redundant
    return state


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
        out[key] = tensor.t().contiguous() if is_conv1d(key) else tensor.contiguous()
    if not model.config.tie_weights:
        # an untied head may still share storage with wte (e.g. copied by reference); never save aliases
        if out["lm_head.weight"].data_ptr() == out["transformer.wte.weight"].data_ptr():
            out["lm_head.weight"] = out["lm_head.weight"].clone()
    return out


# ----------------------------------------------------------------------------------------------
# loading into a gptlab GPT of a given shape


def _describe(cfg: dict[str, Any]) -> str:
    keys = ("n_layer", "n_head", "n_embd", "vocab_size", "block_size", "tie_weights")
    return ", ".join(f"{k}={cfg[k]}" for k in keys)


def copy_into(model: GPT, cfg: dict[str, Any], state: dict[str, torch.Tensor], source: str) -> None:
    """Copy a gptlab-layout state dict (from `read`) into `model`, checking every shape."""
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
        if tuple(state[key].shape) != tuple(param.shape):
            raise CheckpointError(
                f"{key}: checkpoint {hf_shape(key, state[key].shape)} vs model {hf_shape(key, param.shape)} "
                f"(Hugging Face layout); {hint}"
            )
    with torch.no_grad():
        for key, param in params.items():
            if key == "lm_head.weight" and mc.tie_weights:
                continue
            param.copy_(state[key])
