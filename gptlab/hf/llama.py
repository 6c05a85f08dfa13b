"""Hugging Face Llama (LlamaForCausalLM) configs and weights in and out of gptlab's GPT.

A Llama is gptlab's GPT with `pos=rope norm=rmsnorm mlp=swiglu bias=false` (and `n_kv_head` for
grouped-query attention). The conversion is renaming plus one detail: gptlab computes queries, keys
and values in one matmul (`attn.c_attn`, rows q | k | v), Llama in three (`q_proj`, `k_proj`,
`v_proj`), so they are concatenated on the way in and split on the way out. No q/k permutation is
needed: gptlab's RoPE pairs channels i and i + head_dim/2 (rotate_half), as HF's Llama does.

    gptlab                               Llama
    transformer.wte.weight               model.embed_tokens.weight
    transformer.h.N.ln_1.weight          model.layers.N.input_layernorm.weight
    transformer.h.N.attn.c_attn.weight   model.layers.N.self_attn.{q,k,v}_proj.weight (concatenated)
    transformer.h.N.attn.c_proj.weight   model.layers.N.self_attn.o_proj.weight
    transformer.h.N.ln_2.weight          model.layers.N.post_attention_layernorm.weight
    transformer.h.N.mlp.c_gate.weight    model.layers.N.mlp.gate_proj.weight
    transformer.h.N.mlp.c_fc.weight      model.layers.N.mlp.up_proj.weight
    transformer.h.N.mlp.c_proj.weight    model.layers.N.mlp.down_proj.weight
    transformer.ln_f.weight              model.norm.weight
    lm_head.weight                       lm_head.weight (the embedding when tied)

Plain functions on dicts and tensors; reading and writing directories is gptlab.hf's business.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
import torch.nn as nn

from gptlab.checkpoint import strip_compile_prefix
from gptlab.errors import CheckpointError, ConfigError
from gptlab.models import model_config

# the sizes every Llama config.json states (save_pretrained writes them); a missing one is an error,
# never LlamaConfig's default (a 7B model)
SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "max_position_embeddings")
# LlamaConfig's defaults, for the options a config.json leaves out
LLAMA_DEFAULTS = {
    "num_key_value_heads": None, "hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False,
}
TOP_KEYS = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
LAYER_KEYS = {
    "ln_1.weight": "input_layernorm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "mlp.c_gate.weight": "mlp.gate_proj.weight",
    "mlp.c_fc.weight": "mlp.up_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}
QKV = ("q_proj", "k_proj", "v_proj")
_GPTLAB_LAYER = re.compile(r"transformer\.h\.(\d+)\.(.+)")
_LLAMA_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


# ----------------------------------------------------------------------------------------------
# config.json <-> gptlab model config


def llama_config_to_model_cfg(config_json: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
    """The gptlab model config (a conf/model/*.yaml-style dict) of a Llama config.json; one line
    naming the option for what gptlab's GPT cannot express (`source`: the file, for the message)."""
    if not isinstance(config_json, dict):
        raise CheckpointError(f"{source} must hold a JSON object, not {type(config_json).__name__}")
    model_type = config_json.get("model_type", "llama")
    if model_type != "llama":
        raise CheckpointError(f"{source}: model_type={model_type!r}: gptlab.hf.llama reads 'llama' configs only")

    missing = [key for key in SIZE_KEYS if config_json.get(key) is None]
    if missing:
        raise CheckpointError(f"{source} has no {missing[0]}; a Llama config.json states {', '.join(SIZE_KEYS)}")

    def get(key: str) -> Any:
        value = config_json.get(key)
        return LLAMA_DEFAULTS.get(key) if value is None else value

    if get("hidden_act") != "silu":
        raise CheckpointError(f"{source}: hidden_act={get('hidden_act')!r}: gptlab's swiglu MLP uses 'silu'")
    for key in ("attention_bias", "mlp_bias"):
        if get(key):
            raise CheckpointError(f"{source}: {key}=true: gptlab's Llama layout has no biases")
    # transformers >= 5 writes rope_parameters; older versions rope_theta and rope_scaling
    rope = config_json.get("rope_parameters") or config_json.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"{source}: rope_parameters={rope!r} is not a JSON object")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(f"{source}: rope_type={rope_type!r}: gptlab's RoPE has no scaling, only 'default'")
    n_embd, n_head = get("hidden_size"), get("num_attention_heads")
    head_dim = config_json.get("head_dim")
    if head_dim is not None and n_head and head_dim * n_head != n_embd:
        raise CheckpointError(
            f"{source}: head_dim={head_dim}: gptlab's head size is hidden_size / num_attention_heads = "
            f"{n_embd / n_head:g}"
        )
    return {
        "arch": "gpt",
        "vocab_size": get("vocab_size"),
        "block_size": get("max_position_embeddings"),
        "n_layer": get("num_hidden_layers"),
        "n_head": n_head,
        "n_embd": n_embd,
        "n_kv_head": get("num_key_value_heads") or n_head,
        "mlp_hidden": get("intermediate_size"),
        "pos": "rope",
        "rope_theta": float(rope.get("rope_theta", get("rope_theta"))),
        "norm": "rmsnorm",
        "mlp": "swiglu",
        "qk_norm": False,
        "dropout": 0.0,
        "bias": False,
        "qkv_bias": False,
        "tie_weights": bool(get("tie_word_embeddings")),
        "layer_norm_eps": float(get("rms_norm_eps")),
    }


def model_cfg_to_llama_config(
    model_cfg: dict[str, Any], bos_token_id: int | None = None, eos_token_id: int | None = None
) -> dict[str, Any]:
    """The config.json of LlamaForCausalLM for a gptlab model config; ConfigError naming the first
    option Llama cannot express."""
    if model_cfg.get("arch", "gpt") != "gpt":
        raise ConfigError(f"model.arch={model_cfg.get('arch')!r}: only model.arch=gpt exports to Llama")
    cfg = model_config(model_cfg)
    needs = {"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "qkv_bias": False, "qk_norm": False}
    for key, value in needs.items():
        if getattr(cfg, key) != value:
            want = str(value).lower()
            raise ConfigError(f"model.{key}={str(getattr(cfg, key)).lower()}: Llama needs model.{key}={want}")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.layer_norm_eps,
        # both spellings: transformers >= 5 reads rope_parameters, older versions rope_theta
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_weights,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
    }
    if bos_token_id is not None:
        config["bos_token_id"] = bos_token_id
    if eos_token_id is not None:
        config["eos_token_id"] = eos_token_id
    return config


# ----------------------------------------------------------------------------------------------
# state dicts


def _no_counterpart(keys: list[str], side: str) -> CheckpointError:
    shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
    return CheckpointError(f"{shown}: no Llama counterpart in this {side} state dict (is it a Llama-style model?)")


def gptlab_to_llama_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM's state dict from a Llama-style gptlab GPT's. A tied head comes out as
    `lm_head.weight` sharing the embedding's tensor (drop it, as save_pretrained does, before writing
    safetensors)."""
    sd = strip_compile_prefix(sd)
    if "transformer.wte.weight" not in sd:
        raise CheckpointError("transformer.wte.weight is missing: not a gptlab GPT state dict")
    n_embd = sd["transformer.wte.weight"].size(1)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in sd.items():
        layer = _GPTLAB_LAYER.fullmatch(key)
        if key in TOP_KEYS:
            out[TOP_KEYS[key]] = tensor
        elif layer and layer[2] == "attn.c_attn.weight":
            kv = (tensor.size(0) - n_embd) // 2
            for name, part in zip(QKV, tensor.split((n_embd, kv, kv))):
                out[f"model.layers.{layer[1]}.self_attn.{name}.weight"] = part.clone()
        elif layer and layer[2] in LAYER_KEYS:
            out[f"model.layers.{layer[1]}.{LAYER_KEYS[layer[2]]}"] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise _no_counterpart(unknown, "gptlab")
    out.setdefault("lm_head.weight", out["model.embed_tokens.weight"])
    return out


def llama_to_gptlab_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """gptlab GPT's state dict from LlamaForCausalLM's (or LlamaModel's, without `model.`). Without
    `lm_head.weight` (a tied checkpoint) the head is the embedding."""
    inverse_top = {v: k for k, v in TOP_KEYS.items()}
    inverse_layer = {v: k for k, v in LAYER_KEYS.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in sd.items():
        if not key.startswith(("model.", "lm_head.")):
            key = "model." + key  # LlamaModel's keys
        layer = _LLAMA_LAYER.fullmatch(key)
        if key in inverse_top:
            out[inverse_top[key]] = tensor
        elif layer and layer[2].endswith("rotary_emb.inv_freq"):
            continue  # a buffer of old checkpoints, recomputed from rope_theta
        elif layer and layer[2] in inverse_layer:
            out[f"transformer.h.{layer[1]}.{inverse_layer[layer[2]]}"] = tensor
        elif layer and layer[2].removeprefix("self_attn.").removesuffix(".weight") in QKV:
            qkv.setdefault(layer[1], {})[layer[2].split(".")[1]] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise _no_counterpart(unknown, "Llama")
    for i, parts in qkv.items():
        missing = [name for name in QKV if name not in parts]
        if missing:
            raise CheckpointError(f"model.layers.{i}.self_attn.{missing[0]}.weight is missing")
        out[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat([parts[name] for name in QKV])
    if "transformer.wte.weight" not in out:
        raise CheckpointError("model.embed_tokens.weight is missing: not a Llama state dict")
    out.setdefault("lm_head.weight", out["transformer.wte.weight"])
    return out


# ----------------------------------------------------------------------------------------------
# a directory's weights in, a model's weights out (what gptlab.hf.convert reads and writes)


def to_gptlab_state(cfg: dict[str, Any], hf_state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A Llama directory's weights in gptlab's names, for a model of config `cfg` (from config.json).

    A tied model's head is its embedding (transformers ignores a stored copy too); an untied one
    needs its own `lm_head.weight` (transformers would initialise a missing one randomly)."""
    try:
        state = llama_to_gptlab_state(hf_state)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    if cfg["tie_weights"]:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    elif "lm_head.weight" not in hf_state:
        raise CheckpointError(f"{source}: config.json has tie_word_embeddings=false but lm_head.weight is missing")
    return state


def hf_config(model: nn.Module, eot_id: int | None = None) -> dict[str, Any]:
    """LlamaForCausalLM's config.json for `model` (`eot_id`: the tokenizer's end-of-text token, bos and eos)."""
    out = model_cfg_to_llama_config({"arch": "gpt", **dataclasses.asdict(model.config)}, eot_id, eot_id)
    out["torch_dtype"] = str(model.transformer.wte.weight.dtype).removeprefix("torch.")
    return out


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s weights in LlamaForCausalLM's names (CPU, contiguous). A tied head is left out, as
    save_pretrained leaves it out: safetensors refuses tensors that share memory, and
    LlamaForCausalLM re-ties lm_head to the embedding when it loads."""
    state = gptlab_to_llama_state(model.state_dict())
    if model.config.tie_weights:
        del state["lm_head.weight"]
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
