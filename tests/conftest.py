"""Shared test fixtures: the offline data in ../shared/data and helpers to run train.py / sample.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SHAKESPEARE = SHARED / "tinyshakespeare.txt"
TIKTOKEN_CACHE = SHARED / "tiktoken_cache"

# A tiny model and short run: enough to exercise every code path in seconds on a 2-core CPU.
TINY = [
    "model=gpt_nano",
    "model.n_embd=32",
    "model.n_layer=2",
    "model.n_head=2",
    "model.block_size=32",
    "data.batch_size=8",
    "data.val_windows=32",
    "trainer.log_every_n_steps=1",
    "callbacks.text_sample.max_new_tokens=20",
    "~callbacks.progress_bar",
]


def pytest_configure(config):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))
    if not SHAKESPEARE.is_file():
        raise pytest.UsageError(f"test data missing: {SHAKESPEARE} (see ../shared/data/README.md)")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One GPTLAB_DATA_DIR for the session, so the prepared corpus is shared between tests."""
    return tmp_path_factory.mktemp("gptlab-data")


def env_for(data_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        GPTLAB_DATA_DIR=str(data_dir),
        TIKTOKEN_CACHE_DIR=str(TIKTOKEN_CACHE),
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"),
    )
    env.update(extra)
    return env


def run_script(script: str, args: list[str], data_dir: Path, cwd: Path | None = None, check: bool = True,
               timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd or ROOT,
        env=env_for(data_dir, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def train_args(run_dir: Path, *extra: str) -> list[str]:
    return [f"data.path={SHAKESPEARE}", *TINY, f"hydra.run.dir={run_dir}", *extra]


def read_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def read_texts(tb_dir: Path) -> list[tuple[int, str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tb_dir), size_guidance={"tensors": 0})
    ea.Reload()
    return [
        (e.step, e.tensor_proto.string_val[0].decode())
        for tag in ea.Tags()["tensors"]
        if tag.startswith("samples")
        for e in ea.Tensors(tag)
    ]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_dir) -> Path:
    """A 20-step char-level run through train.py, shared by the tests that read its outputs."""
    run_dir = tmp_path_factory.mktemp("run") / "char"
    run_script("train.py", train_args(run_dir, "trainer.max_steps=20", "trainer.val_check_interval=10"), data_dir)
    return run_dir
