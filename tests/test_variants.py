"""GPT variants (RoPE, RMSNorm, SwiGLU / ReLU^2, QK-norm, grouped-query attention), their KV cache,
attention pictures and Llama interop."""

import io
import math

import pytest
import torch
import yaml

from conftest import SHAKESPEARE, TINY
from gptlab.errors import CheckpointError, ConfigError
from gptlab.models import build_model
from gptlab.sampling import generate
from gptlab.training.attention_maps import attention_grid, attention_probs
from inprocess import run_sample, run_train

VARIANTS = {
    "gpt2": {},
    "rope": {"pos": "rope"},
    "rmsnorm": {"norm": "rmsnorm"},
    "swiglu": {"mlp": "swiglu"},
    "relu2": {"mlp": "relu2", "mlp_hidden": 48},
    "qk_norm": {"qk_norm": True, "pos": "rope"},
    "gqa": {"n_kv_head": 2},
    "mqa-rope": {"n_kv_head": 1, "pos": "rope"},
    "llama": {"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "n_kv_head": 2, "tie_weights": False},
}


def tiny(block=16, n_layer=2, **variant):
    torch.manual_seed(0)
    return build_model(dict(vocab_size=50, block_size=block, n_layer=n_layer, n_head=4, n_embd=32, **variant)).eval()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_generation_and_explicit_attention_match_the_plain_forward(name):
    m = tiny(block=16, **VARIANTS[name])
    idx = torch.randint(0, 50, (2, 5))
    out = generate(m, idx, 11, greedy=True, use_cache=True)
    assert torch.equal(out, generate(m, idx, 11, greedy=True, use_cache=False))
    cache = m.new_cache(2)
    steps = [m(out[:, :4], cache=cache, pos=0)[:, -1]]
    steps += [m(out[:, t : t + 1], cache=cache, pos=t)[:, -1] for t in range(4, 16)]
    full = m(out)
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 3:], rtol=1e-5, atol=1e-5)
    # the explicit-softmax pass computes what scaled_dot_product_attention does
    probs = []
    torch.testing.assert_close(m(out, attention=probs), full, rtol=1e-5, atol=1e-5)
    assert len(probs) == 2 and probs[0].shape == (2, 4, 16, 16)
    torch.testing.assert_close(probs[1].sum(-1), torch.ones(2, 4, 16))
    assert probs[0].triu(1).abs().max() == 0  # causal


def test_grouped_query_attention_shapes_and_flops():
    m = tiny(**VARIANTS["llama"])
    cache = m.new_cache(3)
    assert len(cache) == 2 and cache[0].k.shape == cache[0].v.shape == (3, 2, 16, 8)  # n_kv_head=2, head 8
    attn = m.transformer.h[0].attn
    assert attn.c_attn.weight.shape == (32 + 2 * 2 * 8, 32) and attn.c_attn.bias is None
    assert m.config.mlp_hidden == 96  # 8/3 * 32 = 85.3, up to a multiple of 32
    # by hand: q + k + v + o, three MLP matrices, two RMSNorms per block; final norm; untied head
    per_layer = 32 * 64 + 32 * 32 + 3 * 32 * 96 + 2 * 32
    n = 2 * per_layer + 32 + 50 * 32
    assert m.num_params(non_embedding=True) == n and m.num_params() == n + 50 * 32
    assert m.flops_per_token(16) == 6 * n + 12 * 2 * 4 * 8 * 16
    assert sorted(m.config.variant_options()) == [
        "model.mlp=swiglu", "model.mlp_hidden=96", "model.n_kv_head=2", "model.norm=rmsnorm", "model.pos=rope"]
    assert tiny().config.variant_options() == []


def test_rope_cache_is_a_buffer_outside_the_state_dict_that_follows_dtype():
    m = tiny(pos="rope")
    assert not any("rope" in k or "wpe" in k for k in m.state_dict())
    assert m.rope_cos.dtype == torch.float32 and m.rope_cos.shape == (16, 8)
    idx = torch.randint(0, 50, (1, 16))
    reference = m(idx).double()
    m.to(torch.float64)
    assert m.rope_cos.dtype == torch.float64
    torch.testing.assert_close(m(idx), reference, rtol=1e-4, atol=1e-4)
    m.to(torch.bfloat16)
    assert m(idx).dtype == torch.bfloat16 and m.new_cache(1)[0].k.dtype == torch.bfloat16


def test_rope_cache_slides_past_block_size_like_recompute_over_the_last_block():
    """One layer: every token equals a plain forward over exactly the last block_size tokens."""
    block = 8
    m = tiny(block=block, n_layer=1, pos="rope")
    prompt = torch.randint(0, 50, (1, 3))
    out = generate(m, prompt, 30, greedy=True, use_cache=True)
    seq = prompt[0].tolist()
    for _ in range(30):
        seq.append(int(m(torch.tensor([seq[-block:]]))[0, -1].argmax()))
    assert out[0].tolist() == seq
    # and the logits, step by step, with positions growing past block_size
    cache = m.new_cache(1)
    m(out[:, :block], cache=cache, pos=0)
    for t in range(block, 33):
        step = m(out[:, t : t + 1], cache=cache, pos=t)[0, -1]
        torch.testing.assert_close(step, m(out[:, t - block + 1 : t + 1])[0, -1], rtol=1e-4, atol=1e-4)


def test_rope_cache_slides_as_a_sliding_window_mask_in_deeper_models():
    block = 8
    m = tiny(block=block, n_layer=3, pos="rope", n_kv_head=2)
    out = generate(m, torch.randint(0, 50, (2, 3)), 30, greedy=True)
    windowed = m(out, window=block)  # the whole sequence, each token attending to its last 8
    cache = m.new_cache(2)
    steps = [m(out[:, :block], cache=cache, pos=0)[:, -1]]
    steps += [m(out[:, t : t + 1], cache=cache, pos=t)[:, -1] for t in range(block, 33)]
    torch.testing.assert_close(torch.stack(steps, 1), windowed[:, block - 1 :], rtol=1e-4, atol=1e-4)
    assert torch.equal(windowed.argmax(-1)[:, 2:-1], out[:, 3:])  # the greedy tokens are that pass's argmax
    with pytest.raises(ValueError, match="exceeds block_size=8"):
        m(out)


def test_bad_variant_configs():
    base = dict(vocab_size=10, n_embd=32, n_head=4)
    for bad, message in [({"pos": "alibi"}, "model.pos='alibi': choose one of learned, rope"),
                         ({"mlp": "geglu"}, "model.mlp='geglu'"),
                         ({"norm": "batchnorm"}, "model.norm='batchnorm'"),
                         ({"n_kv_head": 3}, "model.n_kv_head=3 does not divide model.n_head=4"),
                         ({"mlp_hidden": 0}, "model.mlp_hidden=0"),
                         ({"rope_theta": 0.0, "pos": "rope"}, "model.rope_theta=0.0"),
                         ({"n_embd": 36, "n_head": 12, "pos": "rope"}, "even head size")]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            build_model({**base, **bad})


def test_attention_grid_colours_and_layout():
    probs = torch.zeros(2, 3, 4, 4)
    probs[1, 2] = torch.eye(4)
    image = attention_grid(probs, scale=2, gap=2)
    assert image.shape == (3, 2 * 8 + 2, 3 * 8 + 2 * 2)
    purple, yellow = image[:, 0, 0], image[:, 10, 20]  # layer 1, head 2, query 0 / key 0
    assert torch.allclose(purple, torch.tensor([68, 1, 84]) / 255) and torch.allclose(yellow, torch.tensor([253, 231, 37]) / 255)
    assert torch.allclose(image[:, 8, 0], torch.full((3,), 0.5))  # the gap between layers
    m = tiny(**VARIANTS["gqa"])
    assert attention_probs(m.train(), torch.randint(0, 50, (2, 6))).shape == (2, 4, 6, 6) and m.training


# -- through train.py and sample.py, in-process --------------------------------------------------------

QUICK = [f"data.path={SHAKESPEARE}", *(o for o in TINY if not o.startswith(("model=", "model.n_head"))),
         "model.n_head=4", "trainer.max_steps=4", "trainer.val_check_interval=4", "data.num_workers=0",
         "callbacks.text_sample.max_new_tokens=4", "callbacks.throughput.window_size=2"]
RUNS = {
    "rope-gqa-qk_norm": ["model=gpt_nano", "model.pos=rope", "model.n_kv_head=2", "model.qk_norm=true"],
    "rmsnorm-swiglu": ["model=gpt_nano", "model.norm=rmsnorm", "model.mlp=swiglu", "model.bias=false"],
    # the attention pictures skip loggers other than TensorBoard
    "relu2": ["model=gpt_nano", "model.mlp=relu2", "model.mlp_hidden=64", "logger=none", "~callbacks.lr_monitor",
              "++callbacks.attention_maps._target_=gptlab.training.attention_maps.AttentionMaps"],
    "llama_micro": ["model=llama_micro", "++callbacks.attention_maps._target_=gptlab.training.attention_maps.AttentionMaps",
                    "++callbacks.attention_maps.max_tokens=8"],
}


@pytest.mark.parametrize("name", list(RUNS))
def test_variant_trains_and_samples(name, tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("GPTLAB_DATA_DIR", str(data_dir))
    value = run_train([*RUNS[name], *QUICK, f"paths.data_dir={data_dir}"], tmp_path)
    assert value is not None and math.isfinite(value)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    hp = torch.load(ckpt, weights_only=True)["hyper_parameters"]["model"]
    for key, value in (o.removeprefix("model.").split("=") for o in RUNS[name] if o.startswith("model.")):
        assert hp[key] == yaml.safe_load(value)
    texts = run_sample([f"ckpt_path={ckpt}", "num_samples=1", "max_new_tokens=40", "device=cpu", "prompt=ROMEO:"])
    assert len(texts) == 1 and texts[0].startswith("ROMEO:") and len(texts[0]) == len("ROMEO:") + 40
    assert (tmp_path / "tensorboard").exists() is (name != "relu2")
    if name == "llama_micro":
        from PIL import Image
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        assert (hp["pos"], hp["mlp"], hp["n_kv_head"], hp["bias"], hp["tie_weights"]) == ("rope", "swiglu", 2, False, False)
        ea = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
        ea.Reload()
        events = ea.Images("attention")
        assert [e.step for e in events] == [3]  # the validation at step 4 (Lightning's step 3)
        # 2 layers x 4 heads of 8 x 8 maps, 12 pixels per token (96 // 8), 2-pixel gaps
        assert (events[0].height, events[0].width) == (2 * 96 + 2, 4 * 96 + 6)
        picture = Image.open(io.BytesIO(events[0].encoded_image_string))
        assert picture.getpixel((0, 0)) != picture.getpixel((95, 0))  # query 0 sees key 0 only: bright, then dark


# -- Llama interop ---------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def llama(tied=False, n_kv=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=88, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=n_kv, max_position_embeddings=24,
                         rope_theta=500.0, rms_norm_eps=1e-5, tie_word_embeddings=tied,
                         bos_token_id=None, eos_token_id=None)  # no eos: greedy runs the full length
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tied, n_kv", [(True, 4), (False, 1)])  # GQA: the from_pretrained test
def test_llama_round_trip_logits_and_greedy_ids(tied, n_kv):
    from transformers import LlamaConfig, LlamaForCausalLM

    from gptlab.hf.llama import gptlab_to_llama_state, llama_config_to_model_cfg, llama_to_gptlab_state, \
        model_cfg_to_llama_config

    hf = llama(tied, n_kv)
    cfg = llama_config_to_model_cfg(hf.config.to_dict())
    assert (cfg["n_kv_head"], cfg["mlp_hidden"], cfg["rope_theta"], cfg["tie_weights"]) == (n_kv, 88, 500.0, tied)
    ours = build_model(cfg).eval()
    ours.load_state_dict(llama_to_gptlab_state(hf.state_dict()))
    x = torch.randint(0, 61, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=0, atol=1e-4)
    prompt = x[:, :4]
    assert torch.equal(generate(ours, prompt, 12, greedy=True),
                       hf.generate(prompt, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(prompt)))
    # and back: a gptlab model (random, not the imported one) into a fresh LlamaForCausalLM
    torch.manual_seed(1)
    mine = build_model(cfg).eval()
    back = LlamaForCausalLM(LlamaConfig(**model_cfg_to_llama_config(cfg), bos_token_id=None, eos_token_id=None)).eval()
    back.load_state_dict(gptlab_to_llama_state(mine.state_dict()), strict=True)
    assert back.config.rope_parameters["rope_theta"] == 500.0 and back.config.num_key_value_heads == n_kv
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, mine(x), rtol=0, atol=1e-4)
    assert torch.equal(generate(mine, prompt, 12, greedy=True),
                       back.generate(prompt, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(prompt)))


def test_llama_refuses_what_it_cannot_express():
    from gptlab.hf.llama import gptlab_to_llama_state, llama_config_to_model_cfg, llama_to_gptlab_state, \
        model_cfg_to_llama_config

    llama_cfg = dict(vocab_size=50, block_size=16, n_layer=1, n_head=4, n_embd=32, **VARIANTS["llama"])
    for change, message in [({"pos": "learned"}, "model.pos=learned: Llama needs model.pos=rope"),
                            ({"qk_norm": True}, "model.qk_norm=true: Llama needs model.qk_norm=false"),
                            ({"mlp": "relu2"}, "model.mlp=relu2"), ({"bias": True}, "model.bias=true"),
                            ({"arch": "bigram"}, "model.arch='bigram'")]:
        with pytest.raises(ConfigError, match=message):
            model_cfg_to_llama_config({**llama_cfg, **change})
    base = llama().config.to_dict()
    for change, message in [({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "rope_type='llama3'"),
                            ({"hidden_act": "gelu"}, "hidden_act='gelu'"), ({"attention_bias": True}, "attention_bias"),
                            ({"model_type": "mistral"}, "model_type='mistral'"), ({"head_dim": 16}, "head_dim=16")]:
        with pytest.raises(CheckpointError, match=message):
            llama_config_to_model_cfg({**base, **change})
    with pytest.raises(CheckpointError, match="transformer.wpe.weight: no Llama counterpart"):
        gptlab_to_llama_state(tiny(pos="learned", mlp="swiglu", norm="rmsnorm", bias=False).state_dict())
    with pytest.raises(CheckpointError, match="k_proj.weight is missing"):
        llama_to_gptlab_state({k: v for k, v in llama().state_dict().items() if "layers.1.self_attn.k_proj" not in k})


# a whole directory (python -m gptlab.hf export / import) against from_pretrained: tests/test_hf.py
