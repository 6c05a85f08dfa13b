"""Checkpoints (gptlab.checkpoint) and the files rule (gptlab.files): atomic writes, modes from the umask,
a full disk, debris of killed writers, untrusted input, and errors that say what does not fit."""

import os
import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch

from gptlab import checkpoint
from gptlab.checkpoint import COMPILE_PREFIX, model_from_checkpoint
from gptlab.data import TokenDataModule
from gptlab.errors import CheckpointError, NonFiniteLossError
from gptlab.files import FilesystemError, owner_tag
from gptlab.models import build_model
from gptlab.training import LanguageModel
from gptlab.checkpoint import AtomicCheckpointIO

from conftest import SHAKESPEARE
from inprocess import run_sample

TINY_MODEL = dict(arch="gpt", vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=16)


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("serialisation failed (simulated)")


def test_checkpoint_write_is_atomic(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    with pytest.raises(RuntimeError, match="simulated"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2, "x": Unpicklable()}, path)
    assert io.load_checkpoint(path)["global_step"] == 1  # the previous file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # and no temporary is left


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_checkpoints_get_the_umasks_mode(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        checkpoint.save({"state_dict": {}}, tmp_path / "a.ckpt")
    finally:
        os.umask(old)
    assert (tmp_path / "a.ckpt").stat().st_mode & 0o777 == mode


def test_temporaries_of_dead_writers_are_removed_on_the_next_write(tmp_path):
    sleeper = subprocess.Popen(["sleep", "30"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        host, _, rand = owner_tag().split("-")
        stale = tmp_path / f".last.ckpt.{host}-{dead.pid}-{rand}.tmp"
        live = tmp_path / f".last.ckpt.{host}-{sleeper.pid}-{rand}.tmp"
        foreign = tmp_path / f".last.ckpt.otherhost-{dead.pid}-{rand}.tmp"
        for p in (stale, live, foreign):
            p.write_bytes(b"partial")
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, tmp_path / "last.ckpt")
        assert not stale.exists() and live.exists() and foreign.exists()
    finally:
        sleeper.kill()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (we may be root in CI); skipped where mounting is not allowed."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tiny_disk):
    path = tiny_disk / "last.ckpt"
    checkpoint.save({"state_dict": {"w": torch.ones(10)}, "global_step": 1}, path)
    with pytest.raises(FilesystemError, match=f"cannot write the checkpoint {path}: no space left") as info:
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(1 << 19)}, "global_step": 2}, path)
    assert "\n" not in str(info.value)
    assert checkpoint.load(path)["global_step"] == 1
    assert [p.name for p in tiny_disk.iterdir()] == ["last.ckpt"]


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_and_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "payload": Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match="refused to load .*posix.system") as info:
        checkpoint.load(evil)
    assert "weights_only" not in str(info.value)  # never the advice to turn the safety off
    with pytest.raises(CheckpointError, match="refused"):
        run_sample([f"ckpt_path={evil}", "device=cpu"])
    assert not marker.exists()


def test_files_that_are_not_checkpoints_are_named_as_such(tmp_path):
    notes = tmp_path / "notes.ckpt"
    notes.write_text("these are my notes, not a model\n")
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint file") as info:
        checkpoint.load(notes)
    assert "code" not in str(info.value) and "weights_only" not in str(info.value)
    tensors = tmp_path / "tensors.pt"
    torch.save({"weights": torch.zeros(3)}, tensors)
    with pytest.raises(CheckpointError, match="not a gptlab/Lightning checkpoint"):
        checkpoint.load(tensors)
    good = tmp_path / "good.ckpt"
    checkpoint.save(checkpoint.new_checkpoint(TINY_MODEL, build_model(TINY_MODEL).state_dict(), None), good)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        checkpoint.load(truncated)


def test_a_state_dict_that_does_not_fit_names_keys_and_shapes(tmp_path):
    state = build_model(TINY_MODEL).state_dict()
    state["transformer.wte.weight"] = torch.zeros(70, 16)
    del state["lm_head.weight"], state["transformer.ln_f.bias"]
    state["extra.weight"] = torch.zeros(1)
    ckpt = checkpoint.new_checkpoint(TINY_MODEL, state, None)
    with pytest.raises(CheckpointError) as info:
        model_from_checkpoint(ckpt, "x.ckpt")
    message = str(info.value)
    assert "missing: transformer.ln_f.bias" in message and "unexpected: extra.weight" in message
    assert "transformer.wte.weight (70, 16) vs (65, 16)" in message


@pytest.mark.parametrize("layout", ["model._orig_mod.", "_orig_mod.model."])
def test_checkpoint_with_compile_prefixes_loads(tmp_path, layout):
    """A state dict saved from a torch.compile'd module (keys `..._orig_mod.x`, as other tools write them)
    in a Lightning-style checkpoint loads into an eager model."""
    eager = build_model(TINY_MODEL)
    state = torch.compile(eager).state_dict()
    assert all(k.startswith(COMPILE_PREFIX) for k in state)
    if layout == "model._orig_mod.":
        state_dict = {f"model.{k}": v for k, v in state.items()}
    else:  # the whole LightningModule compiled
        state_dict = {f"{COMPILE_PREFIX}model.{k[len(COMPILE_PREFIX):]}": v for k, v in state.items()}
    path = tmp_path / "compiled.ckpt"
    # a config that carries the run switches (compile) beside the shape still loads
    torch.save({"state_dict": state_dict, "hyper_parameters": {"model": {**TINY_MODEL, "compile": True}},
                "global_step": 0}, path)
    model, _ = model_from_checkpoint(checkpoint.load(path), path)
    for name, tensor in eager.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    x = torch.randint(0, 65, (2, 8))
    assert torch.equal(model.eval()(x), eager.eval()(x))


class PoisonWeights(L.Callback):
    """Fault injection: turns a weight into NaN before optimizer step `at`."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            with torch.no_grad():
                pl_module.model.transformer.ln_f.weight.fill_(float("nan"))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_dir):
    dm = TokenDataModule(path=str(SHAKESPEARE), data_dir=str(data_dir), block_size=16, batch_size=4, val_windows=8)
    dm.prepare_data()
    module = LanguageModel(model=TINY_MODEL, optim=dict(warmup_steps=1), tokenizer=dm.tokenizer.state_dict())
    ckpt_cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="step{step}", every_n_train_steps=2,
                                                  save_top_k=-1, auto_insert_metric_name=False)
    trainer = L.Trainer(max_steps=10, val_check_interval=100, check_val_every_n_epoch=None, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, plugins=[AtomicCheckpointIO()],
                        callbacks=[ckpt_cb, PoisonWeights(at=5)], num_sanity_val_steps=0)
    with pytest.raises(NonFiniteLossError, match="at step 5"):
        trainer.fit(module, datamodule=dm)
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["step2.ckpt", "step4.ckpt"]
    model, _ = model_from_checkpoint(checkpoint.load(tmp_path / "step4.ckpt"))
    assert all(torch.isfinite(p).all() for p in model.parameters())
