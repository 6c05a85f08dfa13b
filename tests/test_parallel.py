"""FSDP2, tensor parallelism, activation checkpointing, Muon on sharded weights and sharded checkpoints
(gptlab.training.parallel, gptlab.sharded) on CPU processes with gloo.

Two processes, this one and one spawned, run every multi-process job in turn (tests/parallel_worker.py):
ddp_cpu, fsdp2 and tp for 10 steps of the GPT-2 default and of a Llama-style model with GQA and QK-norm,
each with AdamW and with Muon (the default experiment's optimizer), some with activation checkpointing; a
tp run stopped half way and a fsdp2 run of train.py SIGKILLed (both processes) after a sharded checkpoint, resumed from
their sharded checkpoints; and ddp_cpu on a mixture of token shards, recording the windows each rank
reads. float32 throughout: the losses must agree to 1e-5.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gptlab import checkpoint
from gptlab.data import TokenDataModule
from gptlab.data.shards import write_shard
from gptlab.errors import CheckpointError, ConfigError
from gptlab.models import build_model
from gptlab.sharded import main as sharded_main

from conftest import SHAKESPEARE, TINY, kill_after_checkpoint, read_scalars
from inprocess import run_sample, run_train
from parallel_worker import run_ranks

pytestmark = pytest.mark.slow

STEPS, HALF = 10, 5
BASE = [f"data.path={SHAKESPEARE}", *TINY, f"trainer.max_steps={STEPS}", f"trainer.val_check_interval={STEPS}",
        "logger=none", "~callbacks.text_sample", "~callbacks.attention_maps", "~callbacks.throughput",
        "~callbacks.periodic_checkpoint", "~callbacks.lr_monitor", "optim.warmup_steps=2", f"callbacks.health.interval={HALF}"]
LLAMA = ["model=llama_nano", "model.n_embd=32", "model.n_layer=2", "model.n_head=4", "model.n_kv_head=2",
         "model.block_size=32", "model.qk_norm=true"]
GPT = ["optim=adamw"]
SAMPLING = [o for o in BASE if o != "~callbacks.text_sample"]  # TextSample generates on every rank: the KV cache
# the GPT-2 default and the Llama-style model, each with AdamW and with Muon (the default experiment's optimizer);
# gpt and llama also run the checkpoint, resume, sampling and health jobs
MODELS = {"gpt": GPT, "gpt_muon": [], "llama": LLAMA, "llama_adamw": [*LLAMA, "optim=adamw"]}
PLAIN = ("gpt_muon", "llama_adamw")  # only the equality jobs
DDP = ["trainer=ddp_cpu"]
FSDP2 = ["trainer=fsdp2", "trainer.accelerator=cpu", "trainer.devices=2"]
TP = ["trainer=tp", "trainer.accelerator=cpu", "trainer.devices=2"]
NO_CKPT = ["~callbacks.model_checkpoint"]
AC = ["model.activation_checkpointing=true"]
TENSORBOARD = ["logger=tensorboard"]  # (after BASE's logger=none: the last one counts)
TO_HALF = [f"trainer.max_steps={HALF}", f"trainer.val_check_interval={HALF}", f"optim.decay_steps={STEPS}"]
# fsdp2_gpt's run as train.py runs it, with a sharded checkpoint every 4 steps: killed, then resumed
KILLED = [*(o for o in BASE if o != "~callbacks.periodic_checkpoint"), *GPT, *FSDP2,
          "callbacks.periodic_checkpoint.every_n_train_steps=4", "callbacks.periodic_checkpoint.save_top_k=-1"]
# two token-shard sources where token i of source s is s * MIX_N + i: a window's first token says where it starts
MIX_N, B = 25_000, 8


def mixture(d: Path) -> dict:
    """data.mix of the two sources, whose shards the runs fixture writes into d."""
    return {name: {"path": str(d / f"s{s}.bin"), "val_path": str(d / f"s{s}.bin"), "weight": w}
            for s, (name, w) in enumerate((("a", 3), ("b", 1)))}


def mix_job(mix: dict) -> list[str]:
    sources = ", ".join(f"{n}: {{path: '{e['path']}', val_path: '{e['val_path']}', weight: {e['weight']}}}"
                        for n, e in mix.items())
    return [*(o for o in BASE if not o.startswith("data.path=")), "data.tokenizer=bpe", "data.url=null",
            f"data.mix={{{sources}}}", "data.val_windows=4", *DDP, *NO_CKPT, "trainer.max_steps=2",
            "trainer.val_check_interval=2", "+callbacks.probe.logits=false", "+callbacks.probe.windows=true"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("parallel")
    (out / "mix").mkdir()
    for i in range(2):
        write_shard(out / "mix" / f"s{i}.bin", np.arange(i * MIX_N, (i + 1) * MIX_N))
    killed = kill_after_checkpoint(out / "fsdp2_killed", [*KILLED, f"hydra.run.dir={out / 'fsdp2_killed'}"], data_dir,
                                   step=4, tensorboard=False)
    refs = [(f"ref_{m}", [*BASE, *model, *NO_CKPT, *(TENSORBOARD if m == "llama" else [])]) for m, model in MODELS.items()]
    jobs = [
        ("ddp_gpt", [*BASE, *GPT, *DDP, *NO_CKPT]),
        ("fsdp2_gpt", [*SAMPLING, *GPT, *FSDP2]),
        ("tp_gpt", [*BASE, *GPT, *TP, *AC, *NO_CKPT]),
        ("ddp_llama", [*BASE, *LLAMA, *DDP, *AC, *NO_CKPT]),
        ("fsdp2_llama", [*BASE, *LLAMA, *FSDP2, *AC, *NO_CKPT, "model.compile=aot_eager"]),
        ("tp_llama", [*SAMPLING, *LLAMA, *TP, *TENSORBOARD]),
        ("tp_half", [*BASE, *LLAMA, *TP, *TO_HALF]),
        # the resumed runs: ckpt_path points at the killed run's newest and the interrupted run's last sharded checkpoint
        ("fsdp2_resumed", [*KILLED, f"ckpt_path={killed}"]),
        ("tp_resumed", [*BASE, *LLAMA, *TP, f"ckpt_path={out / 'tp_half' / 'checkpoints' / 'last.ckpt'}"]),
        ("ddp_mix", mix_job(mixture(out / "mix"))),
        *((f"{name}_{m}", [*BASE, *MODELS[m], *strategy, *NO_CKPT]) for m in PLAIN
          for name, strategy in (("ddp", DDP), ("fsdp2", FSDP2), ("tp", TP))),
    ]
    run_ranks(2, free_port(), refs, jobs, out)
    return out, json.loads((out / "results.json").read_text())


def close(a: list[float], b: list[float], tol: float = 1e-5) -> bool:
    return len(a) == len(b) == STEPS and max(abs(x - y) for x, y in zip(a, b)) < tol


@pytest.mark.parametrize("model", list(MODELS))
def test_fsdp2_and_tp_losses_equal_ddp_and_one_process(runs, model):
    """FSDP2 on 2 processes trains as DDP on 2; TP on 2 (both ranks on one batch) as one process."""
    _, r = runs
    assert close(r[f"fsdp2_{model}"]["losses"], r[f"ddp_{model}"]["losses"])
    assert close(r[f"tp_{model}"]["losses"], r[f"ref_{model}"]["losses"])
    assert r[f"ddp_{model}"]["losses"] != r[f"ref_{model}"]["losses"]  # DDP saw twice the data
    assert r[f"ref_{model}"]["losses"][-1] < r[f"ref_{model}"]["losses"][0] - 0.1  # it learns


def test_health_statistics_under_tp_equal_one_process(runs):
    """The sampled steps' norms, update ratios, activation RMS and attention logits of a TP run (each rank
    holds half the heads and a shard of the matrices) are one process's."""
    out, _ = runs
    one, tp = (read_scalars(out / name / "tensorboard") for name in ("ref_llama", "tp_llama"))
    keys = [k for k in one if k.split("/")[0] in ("grad_norm", "param_norm", "update_ratio", "act_rms", "attn_logit_max")]
    assert len(keys) == 6 * 3 + 2 * 2  # other, 2 blocks and 3 groups (Muon, AdamW decay and no decay); 2 layers
    for key in keys:
        assert [s for s, _ in tp[key]] == [s for s, _ in one[key]] == [HALF - 1, STEPS - 1]
        assert [v for _, v in tp[key]] == pytest.approx([v for _, v in one[key]], rel=1e-4), key


def test_resume_from_sharded_checkpoints_is_exact(runs):
    """A fsdp2 run killed with SIGKILL after a sharded checkpoint (tp: stopped half way) and resumed
    ends as the uninterrupted run."""
    out, r = runs
    half = r["tp_half"]
    assert half["losses"] == pytest.approx(r["tp_llama"]["losses"][:HALF], abs=1e-6)
    for name, full in (("fsdp2", "fsdp2_gpt"), ("tp", "tp_llama")):
        resumed, done = r[f"{name}_resumed"], STEPS - len(r[f"{name}_resumed"]["losses"])
        assert done in ({HALF} if name == "tp" else set(range(4, STEPS, 4)))
        assert resumed["losses"] == pytest.approx(r[full]["losses"][done:], abs=1e-5)
        assert resumed["val_loss"] == pytest.approx(r[full]["val_loss"], abs=1e-5)
        assert torch.allclose(torch.tensor(resumed["logits"]), torch.tensor(r[full]["logits"]), atol=1e-5)
    # the killed run's directory: its periodic checkpoints and the resumed run's, no temporaries left by the kill
    names = sorted(p.name for p in (out / "fsdp2_killed" / "checkpoints").iterdir())
    assert names == [f"best-step{STEPS:06d}.ckpt", "last.ckpt", *(f"step{s:06d}.ckpt" for s in range(4, STEPS + 1, 4))]
    ckpts = out / "fsdp2_gpt" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [f"best-step{STEPS:06d}.ckpt", "last.ckpt"]  # no temporaries
    assert sorted(p.name for p in (ckpts / "last.ckpt").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]


def test_ddp_ranks_draw_disjoint_windows_of_a_mixture(runs):
    """Two gloo ranks on a mixture of shards read different windows, each rank exactly the windows the
    data module's sampler gives it (rank 0 the ones a single process draws)."""
    out, r = runs
    ranks = r["ddp_mix"]["windows"]  # [rank][step]: the first token of each window
    assert [len(w) for w in ranks] == [2, 2]
    seen = [{t for batch in w for t in batch} for w in ranks]
    assert len(seen[0]) == len(seen[1]) == 2 * B and not seen[0] & seen[1]
    assert all({t // MIX_N for t in s} == {0, 1} for s in seen)  # both sources on both ranks
    dm = TokenDataModule(path=None, url=None, mix=mixture(out / "mix"), tokenizer="bpe", block_size=32, batch_size=B)
    dm.setup("fit")
    for rank, trainer in ((0, None), (0, SimpleNamespace(global_rank=0, world_size=2)),
                          (1, SimpleNamespace(global_rank=1, world_size=2))):
        dm.trainer = trainer
        sampler = dm.train_dataset()
        drawn = [(src * MIX_N + start).tolist() for src, start in map(sampler.draw, range(2))]
        assert drawn == ranks[rank]


@pytest.mark.parametrize("name", ["fsdp2_gpt", "tp_llama"])
def test_consolidated_checkpoint_samples_and_exports(runs, name, tmp_path):
    """The consolidated file: gptlab's format, the sharded model's logits, sample.py, Hugging Face."""
    from gptlab.hf import export_checkpoint
    from gptlab.hf.convert import load_hf_model

    out, r = runs
    sharded = out / name / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointError, match="consolidate"):
        checkpoint.load(sharded)
    target = tmp_path / "one.ckpt"
    sharded_main(["consolidate", str(sharded), str(target)])
    model, _ = checkpoint.model_from_checkpoint(checkpoint.load(target), target)
    x = torch.tensor(r[name]["input"])
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), torch.tensor(r[name]["logits"]), atol=1e-5)
    assert run_sample([f"ckpt_path={target}", "max_new_tokens=5", "num_samples=1", "prompt=ROMEO:"])[0].startswith("ROMEO:")
    if name == "fsdp2_gpt":  # (Hugging Face's Llama has no QK-norm)
        export_checkpoint(target, tmp_path / "hf")
        hf, _ = load_hf_model(tmp_path / "hf")
        with torch.no_grad():
            assert torch.allclose(hf(x), model(x), atol=1e-5)
    with pytest.raises(CheckpointError, match="weights only"):  # no optimizer state to resume
        run_train([*BASE, *NO_CKPT, "trainer.max_steps=40", f"ckpt_path={target}"], tmp_path / "resume")


def test_bad_parallel_input_is_refused_before_any_process_starts(runs, tmp_path, data_dir):
    out, _ = runs
    cases = [
        ([*BASE, *TP, "model.n_head=4", "model.n_kv_head=1"], "n_kv_head=1 is not divisible"),
        ([*BASE, *TP, "model.n_head=3", "model.n_embd=33"], "n_head=3 is not divisible"),
        ([f"data.path={SHAKESPEARE}", "model=bigram", "logger=none", *TP], "model.arch=bigram"),
        ([*BASE, *FSDP2, "trainer.strategy.tensor_parallel_size=3"], "multiply to the number of processes, 2"),
        ([*BASE, *TP, "trainer.devices=4", "trainer.strategy.tensor_parallel_size=2",
          "trainer.strategy.data_parallel_size=3"], "multiply"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            run_train(overrides, tmp_path / "run")
    sharded = out / "fsdp2_gpt" / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointError, match="python -m gptlab.sharded consolidate"):
        run_train([*BASE, "trainer.max_steps=40", f"ckpt_path={sharded}"], tmp_path / "single")
    with pytest.raises(CheckpointError, match="python -m gptlab.sharded consolidate"):
        run_sample([f"ckpt_path={sharded}", "max_new_tokens=5"])
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*.ckpt"))


@pytest.mark.skipif(not os.environ.get("GPTLAB_TEST_MESH"),
                    reason="set GPTLAB_TEST_MESH=1: 4 processes on a 2 x 2 mesh (a few minutes of CPU on 2 cores)")
def test_a_2x2_mesh_trains_as_ddp_on_2_processes(runs, tmp_path):
    """trainer=tp on 4 processes with tensor_parallel_size=2: FSDP2 over 2 data-parallel groups, each of 2
    tensor-parallel ranks. The groups draw the batches of DDP's 2 ranks, so each model's losses are its
    ddp job's (the Llama-style model with Muon with activation checkpointing, as there)."""
    _, r = runs
    jobs = [(f"mesh_{m}", [*BASE, *model, *(AC if m == "llama" else []), *TP, "trainer.devices=4",
                           "trainer.strategy.tensor_parallel_size=2", *NO_CKPT]) for m, model in MODELS.items()]
    run_ranks(4, free_port(), [], jobs, tmp_path)
    mesh = json.loads((tmp_path / "results.json").read_text())
    for m in MODELS:
        assert close(mesh[f"mesh_{m}"]["losses"], r[f"ddp_{m}"]["losses"]), m


def test_activation_checkpointing_gives_the_same_losses_and_gradients():
    torch.manual_seed(0)
    for cfg in ({}, {"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 1, "qk_norm": True}):
        model = build_model(dict(vocab_size=50, block_size=16, n_layer=3, n_head=2, n_embd=16, **cfg))
        x = torch.randint(0, 50, (2, 16))
        calls = []
        model.transformer.h[0].register_forward_pre_hook(lambda *_: calls.append(1))
        grads = []
        for on in (False, True):
            model.zero_grad()
            model.activation_checkpointing = on
            calls.clear()
            loss = model(x).logsumexp(-1).mean()
            loss.backward()
            grads.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
            assert len(calls) == (2 if on else 1)  # recomputed in backward
        assert grads[0][0] == grads[1][0]
        assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))


def test_sharded_checkpoints_resume_on_another_mesh(runs, tmp_path):
    """Shards written by 2 processes load into 1: an FSDP2 run and a TP run go on under fsdp2 alone (last:
    it moves those runs on by 2 steps)."""
    out, r = runs
    try:
        for name, model in (("fsdp2_gpt", GPT), ("tp_llama", LLAMA)):
            ckpt = out / name / "checkpoints" / "last.ckpt"
            value = run_train([*BASE, *model, *FSDP2, "trainer.devices=1", f"trainer.max_steps={STEPS + 2}",
                               f"ckpt_path={ckpt}"], tmp_path / name)
            assert value < r[name]["val_loss"] + 0.05  # it went on from the trained weights, not from scratch
            meta = torch.load(ckpt / "meta.pt", weights_only=True)
            assert meta["global_step"] == meta["gptlab"]["micro_step"] == STEPS + 2
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
