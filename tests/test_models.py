import pytest
import torch

from gptlab.errors import ConfigError
from gptlab.models import Bigram, build_model
from gptlab.sampling import generate, next_token

GPT2 = dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)


def test_gpt2_124m_parameter_counts():
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        _check_gpt2_counts()


def _check_gpt2_counts():
    tied = build_model({**GPT2, "qkv_bias": False})
    assert tied.num_params() == 124_412_160
    untied = build_model({**GPT2, "qkv_bias": False, "tie_weights": False})
    assert untied.num_params() == 163_009_536
    assert round(untied.memory_report()["fp32_mb"], 2) == 621.83
    assert build_model({**GPT2, "qkv_bias": True}).num_params() == 124_439_808
    assert tied.lm_head.weight is tied.transformer.wte.weight


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    m = build_model(dict(vocab_size=100, block_size=16, n_layer=8, n_head=4, n_embd=256))
    assert abs(m.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 2e-3
    assert abs(m.transformer.h[0].mlp.c_proj.weight.std().item() - 0.02 / 4) < 1e-3  # 1/sqrt(2*8)


def test_bad_model_configs():
    with pytest.raises(ConfigError, match="n_embd=100 is not divisible by model.n_head=3"):
        build_model(dict(vocab_size=10, n_embd=100, n_head=3))
    with pytest.raises(ConfigError, match="unknown key"):
        build_model(dict(vocab_size=10, n_embed=100))
    with pytest.raises(ConfigError, match="model.arch"):
        build_model(dict(arch="lstm", vocab_size=10))


def test_bigram_baseline():
    m = build_model(dict(arch="bigram", vocab_size=65))
    assert isinstance(m, Bigram) and m.num_params() == 65 * 65
    logits = m(torch.zeros(2, 5, dtype=torch.long))
    assert logits.shape == (2, 5, 65)
    out = generate(m, torch.zeros(1, 1, dtype=torch.long), 10)
    assert out.shape == (1, 11)


def _tiny(block=16, dropout=0.0):
    torch.manual_seed(0)
    return build_model(dict(vocab_size=50, block_size=block, n_layer=2, n_head=2, n_embd=32, dropout=dropout)).eval()


def test_kv_cache_greedy_equals_recompute_within_block():
    m = _tiny(block=32)
    idx = torch.randint(0, 50, (2, 5))
    a = generate(m, idx, 27, greedy=True, use_cache=True)
    b = generate(m, idx, 27, greedy=True, use_cache=False)
    assert torch.equal(a, b)
    # and the cached logits match the full forward pass
    cache = m.new_cache(2)
    full = m(a[:, :10])
    step = [m(a[:, :4], cache=cache, pos=0)[:, -1]]
    for t in range(4, 10):
        step.append(m(a[:, t : t + 1], cache=cache, pos=t)[:, -1])
    torch.testing.assert_close(torch.stack(step[1:], 1), full[:, 4:10], rtol=1e-5, atol=1e-5)


def test_kv_cache_beyond_block_size_crops_and_rebuilds():
    """Past block_size the cache is rebuilt from the last block_size//2 tokens; every token must be
    the argmax of a plain forward pass over exactly the window the cache stands for."""
    block = 8
    m = _tiny(block=block)
    prompt = torch.randint(0, 50, (1, 3))
    out = generate(m, prompt, 30, greedy=True, use_cache=True)
    assert out.shape == (1, 33)
    # replay the windows: first fill up to block, then restart from the last block//2 tokens
    seq = prompt[0].tolist()
    start = 0  # index in seq where the current window starts
    for _ in range(30):
        if len(seq) - start > block:  # the window would not fit: rebuild from the last block//2
            start = len(seq) - block // 2
        window = torch.tensor([seq[start:]])
        seq.append(int(m(window)[0, -1].argmax()))
    assert out[0].tolist() == seq
    # without the cache: the usual sliding window of the last block tokens, also valid
    plain = generate(m, prompt, 30, greedy=True, use_cache=False)
    assert plain.shape == (1, 33)
    assert torch.equal(out[0, : block + 1], plain[0, : block + 1])


def test_next_token_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert next_token(logits, greedy=True).item() == 3
    assert next_token(logits, temperature=0).item() == 3
    g = torch.Generator().manual_seed(0)
    picks = {next_token(logits, top_k=2, generator=g).item() for _ in range(50)}
    assert picks == {2, 3}
    picks = {next_token(logits, top_p=0.5, generator=g).item() for _ in range(50)}
    assert picks == {3}  # p(3) = 0.64 >= 0.5 already
    with pytest.raises(ConfigError, match="top_p"):
        generate(_tiny(), torch.zeros(1, 1, dtype=torch.long), 5, top_p=1.5)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate(_tiny(), torch.zeros(1, 1, dtype=torch.long), 0)


def test_module_compile_keeps_parameter_names():
    # Module.compile() (what gptlab uses) keeps the parameter names as they are
    m2 = _tiny()
    m2.compile()
    assert not any("_orig_mod" in k for k in m2.state_dict())


def test_flops_per_token():
    with torch.device("meta"):
        m = build_model({**GPT2, "qkv_bias": True})
    n = m.num_params(non_embedding=True)
    assert m.flops_per_token(1024) == 6 * n + 12 * 12 * 12 * 64 * 1024


def test_defaults_keep_gpt2_parameter_names_and_untied_flops_skip_the_lookup_table():
    m = build_model(dict(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=32, tie_weights=False))
    assert sorted(m.state_dict()) == sorted(
        ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias",
         "lm_head.weight"]
        + [f"transformer.h.0.{n}" for n in ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
                                            "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
                                            "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")]
    )
    # an untied token table is a lookup (no FLOPs); the head is a matmul and counts
    assert m.num_params(non_embedding=True) == m.num_params() - 16 * 32 - 50 * 32
