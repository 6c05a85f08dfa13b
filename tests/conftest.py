"""Shared test fixtures: the test corpus, found as gptlab finds it, and helpers to run the entry points.

The corpus (tiny Shakespeare) comes from $GPTLAB_TEST_DATA (a directory holding tinyshakespeare.txt
and optionally tiktoken_cache/), else from gptlab's own cache ($GPTLAB_DATA_DIR or ~/.cache/gptlab),
filled once through gptlab's download (sha256-checked).
tiktoken's GPT-2 files come from a tiktoken_cache/ beside the corpus, else from tiktoken's own cache
or download.
"""

from __future__ import annotations

import contextlib
import http.server
import importlib.util
import os
import shutil
import signal
import threading
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The suite sets its own environment: a developer's HYDRA_FULL_ERROR=1 (tracebacks instead of gptlab's
# one-line errors and failure markers) or a tracker's settings (a W&B project, an MLflow server) would
# change what the runs under test do. Removed before anything runs, so subprocesses inherit none of them.
for _var in [v for v in os.environ if v == "HYDRA_FULL_ERROR" or v.startswith(("WANDB_", "MLFLOW_"))]:
    del os.environ[_var]


def _find_corpus() -> tuple[Path | None, str | None]:
    """(the corpus, None) or (None, why it could not be had)."""
    d = os.environ.get("GPTLAB_TEST_DATA")
    if d and (Path(d) / "tinyshakespeare.txt").is_file():
        return Path(d) / "tinyshakespeare.txt", None
    from gptlab.data.download import TINY_SHAKESPEARE_SHA256, TINY_SHAKESPEARE_URL, default_data_dir, download
    from gptlab.errors import GptlabError

    try:
        return download(TINY_SHAKESPEARE_URL, default_data_dir() / "corpora" / "tinyshakespeare.txt",
                        TINY_SHAKESPEARE_SHA256), None
    except GptlabError as e:
        return None, str(e)


SHAKESPEARE, _MISSING = _find_corpus()
_CACHE = SHAKESPEARE.parent / "tiktoken_cache" if SHAKESPEARE else None
TIKTOKEN_CACHE = _CACHE if _CACHE and _CACHE.is_dir() else None

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


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Two workers by default where pytest-xdist is installed (`-n 0` for one process): the suite
    spends most of its time in subprocesses, each a fresh Python importing torch and Lightning, and
    those run side by side on two cores. A module goes to one worker whole, so its module-scoped
    fixtures (a DDP run, a sweep) are built once."""
    worker = hasattr(config, "workerinput") or "PYTEST_XDIST_WORKER" in os.environ
    if not worker and importlib.util.find_spec("xdist") is not None and getattr(config.option, "numprocesses", None) is None:
        config.option.numprocesses = 2
        # one thread per process: two workers (and their subprocesses) already fill the two cores, and
        # OpenMP threads of several processes fighting over them spin instead of working
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        if getattr(config.option, "dist", "no") == "no":
            config.option.dist = "loadscope"
            # in the order pytest_collection_modifyitems gives, not xdist's (modules with the most tests first)
            config.option.loadscopereorder = False


def pytest_collection_modifyitems(session, config, items):
    """Modules with slow tests (subprocesses, sweeps) first: with two workers taking whole modules, the
    long ones start at once and the quick ones fill in around them, instead of one long module ending
    the run alone."""
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow)  # stable: the order within stays


def pytest_configure(config):
    if SHAKESPEARE is None:
        raise pytest.UsageError(
            f"no test corpus: {_MISSING}. Put tinyshakespeare.txt in $GPTLAB_TEST_DATA, "
            f"or run once with network access"
        )
    if TIKTOKEN_CACHE is not None:
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))
    try:
        import tiktoken

        tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise pytest.UsageError(f"tiktoken cannot load GPT-2's BPE ({type(e).__name__}: {e}); set TIKTOKEN_CACHE_DIR "
                                f"to a directory with tiktoken's cached files, or run once with network access") from None


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One GPTLAB_DATA_DIR for the session, so the prepared corpus is shared between tests."""
    d = tmp_path_factory.mktemp("gptlab-data")
    os.environ["GPTLAB_DATA_DIR"] = str(d)  # in-process runs prepare here too
    return d


def env_for(data_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(GPTLAB_DATA_DIR=str(data_dir), PYTHONUNBUFFERED="1")
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


def kill_after_checkpoint(run_dir: Path, args: list[str], data_dir: Path, step: int, tensorboard: bool = True,
                          timeout: float = 240, **env: str) -> Path:
    """Runs train.py with `args` (writing into run_dir) in a process group of its own and SIGKILLs the
    whole group, every rank of a multi-process run, once its checkpoint of `step` is on disk; returns
    the newest checkpoint the run left (it may have gone on a few steps before the kill landed).

    With `tensorboard`, the kill also waits for the event file to be written after that checkpoint:
    Lightning logs a step's scalars after the step's checkpoint callbacks and flushes them right after,
    and a kill in between would lose that one point from TensorBoard (not from training)."""
    target = run_dir / "checkpoints" / f"step{step:06d}.ckpt"

    def ready() -> bool:
        if not target.exists():  # a checkpoint is renamed into place whole
            return False
        events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
        return not tensorboard or bool(events) and max(e.stat().st_mtime_ns for e in events) > target.stat().st_mtime_ns

    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / f"{run_dir.name}.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env_for(data_dir, **env),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        try:
            while not ready() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.01)
            reached = ready()
        finally:
            with contextlib.suppress(ProcessLookupError):  # the group is gone if the run ended by itself
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert reached and proc.returncode == -signal.SIGKILL, (
        f"the run ended ({proc.returncode}) or ran {timeout}s before it could be killed after its step-{step} "
        f"checkpoint:\n{log.read_text()[-3000:]}")
    return max((run_dir / "checkpoints").glob("step*.ckpt"), key=lambda p: int(p.stem[4:]))


def train_args(run_dir: Path, *extra: str) -> list[str]:
    return [f"data.path={SHAKESPEARE}", *TINY, f"hydra.run.dir={run_dir}", *extra]


def read_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    # by step: event files are read in name order, and the names of two in-process runs started within
    # the same second (a run and its resume in one test) may sort either way; a step logged twice stays twice
    return {tag: sorted(((e.step, e.value) for e in ea.Scalars(tag)), key=lambda sv: sv[0])
            for tag in ea.Tags()["scalars"]}


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
    """A 20-step char-level run (in-process, as `python train.py` runs it), shared by the tests that read it."""
    from inprocess import run_train

    run_dir = tmp_path_factory.mktemp("run") / "char"
    run_train([f"data.path={SHAKESPEARE}", *TINY, "trainer.max_steps=20", "trainer.val_check_interval=10"], run_dir)
    return run_dir


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store made by MLflow once: making one runs its schema migrations, seconds
    that every test writing to MLflow would pay again (`mlflow_store` copies it)."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


def mlflow_store(template: Path, directory: Path) -> str:
    """`directory`/mlflow.db, where gptlab's MLflow logger writes by default, as a copy of the template: its URI."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, directory / "mlflow.db")
    return f"sqlite:///{directory / 'mlflow.db'}"


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory quietly, honouring `Range: bytes=N-` (206; 416 past the end) as the hosts of
    corpora do, and records the ranges asked for in `ranges`. `/resolve/<file>` redirects to `/<file>`
    stating `stated[<file>]` as its sha256, as the Hugging Face Hub does for files in LFS."""

    ranges: list[str] = []
    stated: dict[str, str] = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path.startswith("/resolve/"):
            name = self.path.removeprefix("/resolve/")
            self.send_response(302)
            self.send_header("Location", f"/{name}")
            self.send_header("X-Linked-Etag", f'"{self.stated[name]}"')
            self.send_header("Content-Length", "0")
            return self.end_headers()
        try:
            data = Path(self.translate_path(self.path)).read_bytes()
        except OSError:
            return self.send_error(404)
        start, rng = 0, self.headers.get("Range")
        if rng is not None:
            self.ranges.append(rng)
            start = int(rng.split("=")[1].rstrip("-"))
            if start >= len(data):
                return self.send_error(416)
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])


@pytest.fixture()
def http_server(tmp_path):
    """(the directory served, its URL) on 127.0.0.1: downloads tested without the network."""
    root = tmp_path / "www"
    root.mkdir()
    RangeHandler.ranges, RangeHandler.stated = [], {}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: RangeHandler(*a, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
