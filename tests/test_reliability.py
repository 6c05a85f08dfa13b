"""Crash and resume, atomic writes, concurrent cache preparation, untrusted checkpoints."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from gptlab import checkpoint
from gptlab.checkpoint import model_from_checkpoint
from gptlab.data import TokenDataModule
from gptlab.data.prepare import check_prepared, corpus_files, prepare_corpus
from gptlab.errors import CheckpointError
from gptlab.training import LanguageModel
from gptlab.training.checkpoint_io import AtomicCheckpointIO
from gptlab.errors import NonFiniteLossError

from conftest import ROOT, SHAKESPEARE, env_for, read_scalars, run_script, train_args

RESUME_ARGS = ["model.dropout=0.1", "trainer.max_steps=40", "trainer.val_check_interval=8",
               "callbacks.periodic_checkpoint.every_n_train_steps=4", "callbacks.periodic_checkpoint.save_top_k=-1"]


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, data_dir):
    reference = tmp_path / "reference"
    run_script("train.py", train_args(reference, *RESUME_ARGS), data_dir)

    crashed = tmp_path / "crashed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *train_args(crashed, *RESUME_ARGS)],
                            cwd=ROOT, env=env_for(data_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = crashed / "checkpoints" / "step000012.ckpt"
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = max(int(p.stem[4:]) for p in (crashed / "checkpoints").glob("step*.ckpt"))
    assert 12 <= killed_at < 40

    run_script("train.py", train_args(crashed, *RESUME_ARGS, "resume=auto"), data_dir)

    ref, got = read_scalars(reference / "tensorboard"), read_scalars(crashed / "tensorboard")
    # the same TensorBoard run, every step exactly once, and the same numbers as without the crash
    assert [s for s, _ in got["train/loss"]] == list(range(40))
    assert [s for s, _ in got["val/loss"]] == [7, 15, 23, 31, 39]
    np.testing.assert_allclose([v for _, v in got["train/loss"]], [v for _, v in ref["train/loss"]], rtol=0, atol=1e-6)
    assert abs(got["val/loss"][-1][1] - ref["val/loss"][-1][1]) <= 1e-6
    assert checkpoint.load(crashed / "checkpoints" / "last.ckpt")["global_step"] == 40


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
    module = LanguageModel(model=dict(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=16),
                           optim=dict(warmup_steps=1), tokenizer=dm.tokenizer.state_dict())
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


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full (simulated)")


def test_checkpoint_write_is_atomic(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2, "x": Unpicklable()}, path)
    assert io.load_checkpoint(path)["global_step"] == 1  # the previous file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # and no temporary is left


PREPARE = """
import sys
from pathlib import Path
from gptlab.data.prepare import corpus_files, prepare_corpus
p = prepare_corpus(corpus_files(Path(sys.argv[1])), {"kind": "bpe", "encoding": "gpt2"}, Path(sys.argv[2]),
                   workers=1, log=lambda *a: None)
print(p.directory, p.meta["tokens"]["train"])
"""


def test_two_processes_prepare_the_same_corpus(tmp_path, data_dir):
    corpus = tmp_path / "big.txt"
    corpus.write_text(SHAKESPEARE.read_text() * 4)
    out = tmp_path / "prepared"
    procs = [subprocess.Popen([sys.executable, "-c", PREPARE, str(corpus), str(out)], env=env_for(data_dir),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    lines = {r[0].strip() for r in results}
    assert len(lines) == 1  # same directory, same token count
    directory = Path(lines.pop().split()[0])
    assert check_prepared(directory) is None
    assert [p.name for p in out.iterdir()] == [directory.name]  # no temporary directories left


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_cache_is_detected_and_rebuilt(tmp_path, damage):
    files = corpus_files(SHAKESPEARE)
    first = prepare_corpus(files, {"kind": "char"}, tmp_path, log=lambda *a: None)
    train = first.directory / "train.bin"
    good = train.read_bytes()
    if damage == "truncate":
        train.write_bytes(good[: len(good) // 3])
    else:
        train.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
    assert check_prepared(first.directory) is not None
    messages = []
    again = prepare_corpus(files, {"kind": "char"}, tmp_path, log=messages.append)
    assert any("damaged" in m for m in messages)
    assert again.directory == first.directory and train.read_bytes() == good


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_and_runs_no_code(tmp_path, data_dir):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "payload": Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match="refused"):
        checkpoint.load(evil)
    proc = run_script("sample.py", [f"ckpt_path={evil}", "device=cpu"], data_dir, check=False)
    assert proc.returncode != 0 and "refused" in proc.stderr
    proc = run_script("train.py", train_args(tmp_path / "run", f"ckpt_path={evil}"), data_dir, check=False)
    assert proc.returncode != 0 and "refused" in proc.stderr
    assert not marker.exists()
