"""The GPU path: `pytest -m gpu` on a CUDA machine (every test here is marked `gpu` and skips without CUDA).

Through train.py (in-process, `trainer=gpu`): bf16-mixed and 16-mixed steps, torch.compile with inductor
and a checkpoint that loads into an eager model, fused AdamW and its foreach fallback under mixed
precision with clipping, optim=muon, TF32 and pinned batches for the GPU preset, TextSample under
compile without recompiles; Muon's Newton-Schulz in bfloat16 against torch.optim.Muon; KV-cache
generation equal to recomputation; sample.py in bfloat16; FSDP on one GPU (a subprocess: it starts a
process group), FSDP1 with the activation-checkpointing switch, FSDP2 with NCCL, bf16, per-Block
compile, activation checkpointing and Muon. Tiny models and a few steps each: about two minutes, most of it inductor compiling.
"""

from __future__ import annotations

import math
import sys

import lightning as L
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gptlab.checkpoint import COMPILE_PREFIX, model_from_checkpoint
from gptlab.checkpoint import load as load_checkpoint
from gptlab.models import build_model
from gptlab.sharded import main as sharded_main
from gptlab.sampling import generate
from gptlab.training.muon import Muon, orthogonalize

from conftest import SHAKESPEARE, TINY, read_scalars, run_script, train_args
from inprocess import run_sample, run_train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the GPU path runs with "
                       "`pytest -m gpu` on a GPU machine"),
]
BF16 = pytest.mark.skipif(torch.cuda.is_available() and not torch.cuda.is_bf16_supported(),
                          reason="this GPU has no bfloat16 (pre-Ampere): trainer.precision=16-mixed")

# A tiny model on the GPU: conftest's TINY (2 layers, 32 channels, block 32, batch 8) with trainer=gpu.
# (DEVICE, GPU and COMPILE are read at call time, so that a CPU run of these bodies can swap them for
# "cpu", trainer=cpu and a backend without code generation when checking the tests themselves.)
DEVICE = "cuda"
GPU = [f"data.path={SHAKESPEARE}", *TINY, "trainer=gpu"]
COMPILE = "true"  # model.compile=true: inductor


class Probe(L.Callback):
    """Records what a run really did: where the model and the batches were, whether the loader pins
    memory, the optimizer, the float32 matmul precision, and Dynamo's compile count at each validation."""

    runs: list[Probe] = []

    def __init__(self):
        Probe.runs.append(self)
        self.frames: list[int] = []  # frames Dynamo compiled in this run, as of each validation's end
        self.frames_before = 0
        self.losses: list[float] = []

    def on_fit_start(self, trainer, pl_module):
        from torch._dynamo.utils import counters  # process-wide: count from here

        self.frames_before = counters["frames"]["ok"]

    def on_train_start(self, trainer, pl_module):
        self.optimizer = trainer.optimizers[0]
        self.pinned = trainer.train_dataloader.pin_memory
        self.matmul_precision = torch.get_float32_matmul_precision()
        self.device = pl_module.device
        self.precision = trainer.precision
        self.compiled = getattr(pl_module.model, "_compiled_call_impl", None) is not None
        self.backend = pl_module.compile_backend

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.batch_device = batch[0].device

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))

    def on_validation_end(self, trainer, pl_module):  # after TextSample's (callbacks run in list order)
        from torch._dynamo.utils import counters

        self.frames.append(counters["frames"]["ok"] - self.frames_before)

    def on_train_end(self, trainer, pl_module):
        self.steps = trainer.global_step


def probed(overrides: list[str], run_dir) -> tuple[float, Probe]:
    """train.py's train() with a Probe appended to the callbacks."""
    Probe.runs.clear()
    value = run_train([*overrides, f"+callbacks.probe._target_={Probe.__module__}.{Probe.__qualname__}"], run_dir)
    (probe,) = Probe.runs
    return value, probe


@pytest.fixture
def exact_matmuls():
    """float32 matmuls without TF32 for the test (a train.py run may have allowed TF32 process-wide)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


# -- mixed precision through train.py ---------------------------------------------------------------
@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, data_dir):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    run_dir = tmp_path_factory.mktemp("gpu-bf16") / "run"
    value, probe = probed([*GPU, "trainer.precision=bf16-mixed", "trainer.max_steps=6", "trainer.val_check_interval=3"],
                          run_dir)
    return run_dir, value, probe


def test_bf16_mixed_trains_on_the_gpu(bf16_run):
    run_dir, value, probe = bf16_run
    assert probe.device.type == DEVICE and probe.batch_device.type == DEVICE
    assert probe.precision == "bf16-mixed" and probe.steps == 6
    assert math.isfinite(value) and len(probe.losses) == 6 and all(math.isfinite(v) for v in probe.losses)
    assert [s for s, _ in read_scalars(run_dir / "tensorboard")["val/loss"]] == [2, 5]
    # autocast computes in bf16, the weights stay float32: the checkpoint samples anywhere
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert {v.dtype for v in ckpt["state_dict"].values()} == {torch.float32}
    assert {v.device.type for v in ckpt["state_dict"].values()} == {"cpu"}  # gptlab.checkpoint.load maps to the CPU


def test_16_mixed_trains_with_a_grad_scaler(tmp_path, data_dir):
    value, probe = probed([*GPU, "trainer.precision=16-mixed", "trainer.max_steps=4", "trainer.val_check_interval=4"],
                          tmp_path)
    assert probe.precision == "16-mixed" and probe.steps == 4 and math.isfinite(value)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    # Lightning keeps the GradScaler's state in the checkpoint, so a resumed run keeps its loss scale
    scale = ckpt["MixedPrecision"]["scale"]
    assert math.isfinite(float(scale)) and float(scale) > 0
    assert {v.dtype for v in ckpt["state_dict"].values()} == {torch.float32}


# -- the GPU preset: TF32 and pinned batches ---------------------------------------------------------
@pytest.fixture(scope="module")
def preset_run(tmp_path_factory, data_dir):
    """experiment=shakespeare_char (what the GPU kit trains), shrunk to the tiny model for 2 steps."""
    if not torch.cuda.is_bf16_supported():
        pytest.skip("experiment=shakespeare_char trains in bf16-mixed")
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # torch's default: whatever the run leaves is its doing
    try:
        _, probe = probed(["experiment=shakespeare_char", *GPU, "model.compile=false", "trainer.max_steps=2",
                           "trainer.val_check_interval=2"], tmp_path_factory.mktemp("gpu-preset") / "run")
    finally:
        torch.set_float32_matmul_precision(before)
    return probe


def test_gpu_preset_allows_tf32(preset_run):
    """float32 matmuls (the parameters' master copy, the fp32 parts outside autocast) may use TF32 tensor cores."""
    assert preset_run.matmul_precision in ("high", "medium"), (
        "train.py does not call torch.set_float32_matmul_precision('high') on the CUDA path")


def test_gpu_preset_pins_batches(preset_run):
    """Pinned host memory lets the non_blocking copy (below) overlap with the GPU's work."""
    assert preset_run.batch_device.type == DEVICE
    assert preset_run.pinned, "the GPU preset's train loader does not pin memory (data.pin_memory)"


class CopyCalls(TorchDispatchMode):
    """The non_blocking flag of every tensor copy to another device."""

    def __init__(self):
        super().__init__()
        self.non_blocking: list[bool] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket is torch.ops.aten._to_copy and "device" in kwargs:
            self.non_blocking.append(bool(kwargs.get("non_blocking", False)))
        return func(*args, **kwargs)


def test_batches_are_copied_to_the_gpu_non_blocking():
    """LanguageModel keeps Lightning's transfer_batch_to_device, which copies with non_blocking=True."""
    from gptlab.training import LanguageModel

    module = LanguageModel(model=dict(arch="gpt", vocab_size=65, block_size=8, n_layer=1, n_head=1, n_embd=8))
    batch = (torch.zeros(2, 8, dtype=torch.long).pin_memory(), torch.zeros(2, 8, dtype=torch.long).pin_memory())
    with CopyCalls() as copies:
        x, y = module.transfer_batch_to_device(batch, torch.device(DEVICE), 0)
    assert x.device.type == y.device.type == DEVICE
    assert copies.non_blocking == [True, True]


# -- torch.compile (inductor) ------------------------------------------------------------------------
@BF16
def test_compile_inductor_checkpoint_loads_into_an_eager_model(tmp_path, data_dir, exact_matmuls):
    value, probe = probed([*GPU, f"model.compile={COMPILE}", "trainer.precision=bf16-mixed", "trainer.max_steps=3",
                           "trainer.val_check_interval=3", "callbacks.text_sample.max_new_tokens=8"], tmp_path)
    assert probe.compiled and probe.backend == ("inductor" if COMPILE == "true" else COMPILE)
    assert probe.frames[-1] > 0  # Dynamo compiled the model's forward
    assert math.isfinite(value)
    ckpt_path = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint(ckpt_path)
    assert not [k for k in ckpt["state_dict"] if COMPILE_PREFIX in k]
    assert "compile" not in ckpt["hyper_parameters"]["model"]  # how it ran is not what it is
    eager, _ = model_from_checkpoint(ckpt, ckpt_path)  # strict load
    eager = eager.to(DEVICE).eval()
    compiled = build_model(dict(ckpt["hyper_parameters"]["model"])).to(DEVICE).eval()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile(**({} if COMPILE == "true" else {"backend": COMPILE}))
    torch.set_float32_matmul_precision("highest")  # the run may have allowed TF32; compare exact float32
    x = torch.randint(0, eager.config.vocab_size, (4, eager.config.block_size), device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-4)


@BF16
def test_text_sample_under_compile_compiles_once(tmp_path, data_dir):
    """TextSample generates with the compiled model at every validation: prefill, one-token decoding and a
    cache rebuilt past block_size (48 new tokens, block 32) compile once, at the first validation; later
    validations and the training steps between them reuse those graphs."""
    config = torch._dynamo.config
    limit = getattr(config, "recompile_limit", None) or config.cache_size_limit  # renamed in torch 2.7
    # past the limit Dynamo would quietly run eager; make it fail instead (the switch's name differs by version)
    fail = {k: True for k in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit") if hasattr(config, k)}
    torch._dynamo.reset()  # fresh caches: this run compiles everything it needs
    with config.patch(fail):
        value, probe = probed([*GPU, f"model.compile={COMPILE}", "trainer.precision=bf16-mixed", "trainer.max_steps=8",
                               "trainer.val_check_interval=2", "callbacks.text_sample.max_new_tokens=48"], tmp_path)
    assert math.isfinite(value) and len(probe.frames) == 4
    assert 0 < probe.frames[0] <= limit, probe.frames
    assert probe.frames == [probe.frames[0]] * 4, f"recompiled after the first validation: {probe.frames}"


# -- optimizers ---------------------------------------------------------------------------------------
@BF16
@pytest.mark.parametrize("precision, clip, fused", [("bf16-mixed", 1.0, False), ("bf16-mixed", 0.0, True),
                                                    ("32-true", 1.0, True)])
def test_adamw_fused_on_cuda_except_mixed_precision_with_clipping(tmp_path, data_dir, precision, clip, fused):
    """Lightning refuses gradient clipping with an optimizer that unscales inside its step (fused AdamW)
    under mixed precision: gptlab then builds foreach AdamW, and the step runs."""
    value, probe = probed([*GPU, f"trainer.precision={precision}", f"trainer.gradient_clip_val={clip}", "optim=adamw",
                           "trainer.max_steps=3", "trainer.val_check_interval=3"], tmp_path)
    opt = probe.optimizer
    assert type(opt) is torch.optim.AdamW
    assert bool(opt.defaults["fused"]) is fused and bool(opt.defaults["foreach"]) is not fused
    assert probe.steps == 3 and math.isfinite(value)
    p = opt.param_groups[0]["params"][0]
    assert p.device.type == opt.state[p]["exp_avg"].device.type == DEVICE  # it stepped, on the GPU


@BF16
def test_optim_muon_trains_on_cuda(tmp_path, data_dir):
    value, probe = probed([*GPU, "optim=muon", "trainer.precision=bf16-mixed", "optim.warmup_steps=2",
                           "trainer.max_steps=12", "trainer.val_check_interval=12"], tmp_path)
    assert isinstance(probe.optimizer, Muon)
    muon = [g for g in probe.optimizer.param_groups if g.get("muon")]
    assert len(muon) == 1 and all(p.device.type == DEVICE and p.dim() == 2 for p in muon[0]["params"])
    assert probe.steps == 12 and math.isfinite(value)
    assert probe.losses[-1] < probe.losses[0] - 0.5  # it learns


class MatmulDtypes(TorchDispatchMode):
    """The dtypes the matrix products inside the block ran in."""

    def __init__(self):
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            self.dtypes.add(args[1].dtype)
        return func(*args, **(kwargs or {}))


def test_newton_schulz_runs_in_bfloat16_on_cuda():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(96, 64, device="cuda"))
    v, _ = torch.linalg.qr(torch.randn(64, 64, device="cuda"))
    g = u @ torch.diag(torch.logspace(-1, 1, 64, device="cuda")) @ v.T  # singular values 0.1 ... 10
    with MatmulDtypes() as seen:
        x = orthogonalize(g)
    assert seen.dtypes == {torch.bfloat16}
    assert x.dtype == torch.float32 and x.is_cuda
    s = torch.linalg.svdvals(x.float())
    assert 0.6 < s.min() and s.max() < 1.25, s


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
@pytest.mark.parametrize("shape", [(96, 32), (32, 96)])
def test_muon_on_cuda_matches_torch_muon(shape):
    """Both run Newton-Schulz in bfloat16 on CUDA: the updates agree to bfloat16 precision."""
    torch.manual_seed(0)
    start = torch.randn(shape, device=DEVICE)
    ours, ref = start.clone(), start.clone()
    grads = [torch.randn(shape, device=DEVICE) for _ in range(4)]
    for opt, p in ((Muon([{"params": [ours], "muon": True}], lr=0.02, weight_decay=0.1, momentum=0.95), ours),
                   (torch.optim.Muon([ref], lr=0.02, weight_decay=0.1, momentum=0.95, adjust_lr_fn="match_rms_adamw"),
                    ref)):
        for g in grads:
            p.grad = g.clone()
            opt.step()
    moved = (ref - start).norm()
    assert moved > 0.1
    assert (ours - ref).norm() / moved < 0.03


# -- generation ---------------------------------------------------------------------------------------
def _tiny_cuda(block=32, dtype=torch.float32):
    torch.manual_seed(0)
    model = build_model(dict(vocab_size=50, block_size=block, n_layer=2, n_head=2, n_embd=32, dropout=0.0))
    return model.to(device=DEVICE, dtype=dtype).eval()


def test_kv_cache_generation_on_cuda_equals_recompute(exact_matmuls):
    m = _tiny_cuda()
    idx = torch.randint(0, 50, (2, 5), device=DEVICE)
    a = generate(m, idx, 27, greedy=True, use_cache=True)
    b = generate(m, idx, 27, greedy=True, use_cache=False)
    assert a.device.type == DEVICE and torch.equal(a, b)
    cache = m.new_cache(2)
    with torch.no_grad():
        full = m(a[:, :10])
        step = [m(a[:, :4], cache=cache, pos=0)[:, -1]]
        step += [m(a[:, t : t + 1], cache=cache, pos=t)[:, -1] for t in range(4, 10)]
    torch.testing.assert_close(torch.stack(step[1:], 1), full[:, 4:10], rtol=1e-4, atol=1e-4)


def test_kv_cache_in_bfloat16_is_as_accurate_as_recompute(exact_matmuls):
    """sample.py dtype=bfloat16: the cache holds bfloat16 keys and values; cached decoding strays from the
    float32 logits no further than a bfloat16 forward pass over the whole sequence does."""
    m32 = _tiny_cuda()
    m16 = _tiny_cuda(dtype=torch.bfloat16)
    cache = m16.new_cache(2)
    assert cache[0].k.dtype == torch.bfloat16 and cache[0].k.device.type == DEVICE
    x = torch.randint(0, 50, (2, 20), device=DEVICE)
    with torch.no_grad():
        exact = m32(x)[:, 4:20]
        full = m16(x).float()[:, 4:20]
        step = [m16(x[:, :4], cache=cache, pos=0)[:, -1]]
        step += [m16(x[:, t : t + 1], cache=cache, pos=t)[:, -1] for t in range(4, 20)]
    cached = torch.stack(step[1:], 1).float()
    recompute_error = (full - exact).abs().max().item()
    assert 0 < recompute_error < 0.1 * exact.abs().max().item()  # bfloat16 rounding, not garbage
    assert (cached - exact).abs().max().item() <= 2 * recompute_error + 1e-3
    # past block_size the cache is rebuilt (prefill of block // 2 tokens) and decoding goes on
    out = generate(m16, x[:, :5], 100, temperature=0.8, top_k=10, generator=torch.Generator(DEVICE).manual_seed(0))
    assert out.shape == (2, 105) and out.device.type == DEVICE and int(out.max()) < 50


@BF16
def test_sample_py_on_cuda_in_bfloat16(bf16_run):
    ckpt = bf16_run[0] / "checkpoints" / "last.ckpt"
    common = [f"ckpt_path={ckpt}", f"device={DEVICE}", "dtype=bfloat16", "prompt=KING:", "max_new_tokens=100"]
    texts = run_sample([*common, "num_samples=2"])
    assert len(texts) == 2 and all(t.startswith("KING:") and len(t) == len("KING:") + 100 for t in texts)
    greedy = [run_sample([*common, "num_samples=1", "greedy=true"])[0] for _ in range(2)]
    assert greedy[0] == greedy[1]  # deterministic on the GPU too


# -- FSDP ---------------------------------------------------------------------------------------------
@BF16
def test_fsdp_on_one_gpu(tmp_path, data_dir):
    """trainer=fsdp with one device, as the GPU kit runs it (a subprocess: FSDP starts a process group).
    The full state dict is one ordinary checkpoint file that loads into an eager model and samples."""
    run_dir = tmp_path / "run"
    proc = run_script("train.py", train_args(run_dir, "trainer=fsdp", "trainer.devices=1", "optim=adamw",
                                             "trainer.precision=bf16-mixed", "trainer.max_steps=4",
                                             "trainer.val_check_interval=2"), data_dir, timeout=600)
    assert "[gptlab] final val/loss" in proc.stdout
    losses = [v for _, v in read_scalars(run_dir / "tensorboard")["train/loss"]]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    ckpt_path = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt_path.is_file()
    ckpt = load_checkpoint(ckpt_path)
    assert not [k for k in ckpt["state_dict"] if "_fsdp_wrapped_module" in k or "_flat_param" in k]
    model, _ = model_from_checkpoint(ckpt, ckpt_path)  # strict: every parameter whole, by its plain name
    assert model.num_params() == build_model(dict(ckpt["hyper_parameters"]["model"])).num_params()
    texts = run_sample([f"ckpt_path={ckpt_path}", "device=cuda", "num_samples=1", "max_new_tokens=20"])
    assert len(texts) == 1 and texts[0]


def test_fsdp_with_the_activation_checkpointing_switch(tmp_path, data_dir):
    """model.activation_checkpointing=true under trainer=fsdp turns on FSDP1's own checkpoint wrapper:
    the checkpoint keeps plain parameter names and the losses are those of a run without it."""
    losses = {}
    for on in ("false", "true"):
        run_dir = tmp_path / on
        run_script("train.py", train_args(run_dir, "trainer=fsdp", "trainer.devices=1", "optim=adamw",
                                          f"model.activation_checkpointing={on}", "trainer.max_steps=4",
                                          "trainer.val_check_interval=4"), data_dir, timeout=600)
        losses[on] = [v for _, v in read_scalars(run_dir / "tensorboard")["train/loss"]]
        ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
        assert not [k for k in ckpt["state_dict"] if "_checkpoint_wrapped_module" in k]
    assert losses["true"] == pytest.approx(losses["false"], abs=1e-5)


def test_fsdp2_nccl_bf16_compile_and_checkpointing_on_one_gpu(tmp_path, data_dir):
    """trainer=fsdp2 on one GPU with NCCL: bf16 compute (FSDP2's param_dtype), per-Block inductor,
    activation checkpointing, optim=muon; the sharded checkpoint consolidates into a file that samples."""
    run_dir = tmp_path / "run"
    proc = run_script("train.py", train_args(run_dir, "trainer=fsdp2", "trainer.devices=1",
                                             "trainer.strategy.param_dtype=bfloat16", f"model.compile={COMPILE}",
                                             "model.activation_checkpointing=true", "optim=muon",
                                             "trainer.max_steps=4", "trainer.val_check_interval=2"),
                      data_dir, timeout=900)
    assert "distributed_backend=nccl" in proc.stdout + proc.stderr
    losses = [v for _, v in read_scalars(run_dir / "tensorboard")["train/loss"]]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    sharded = run_dir / "checkpoints" / "last.ckpt"
    assert (sharded / "meta.pt").is_file()
    sharded_main(["consolidate", str(sharded), str(tmp_path / "one.ckpt")])
    texts = run_sample([f"ckpt_path={tmp_path / 'one.ckpt'}", "device=cuda", "num_samples=1", "max_new_tokens=20"])
    assert len(texts) == 1 and texts[0]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-m", "gpu"]))
