"""Multi-process data parallel training on CPU (gloo): `trainer=ddp_cpu trainer.devices=2`, alone and
inside a Hydra multirun."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from gptlab.data import TokenDataModule
from gptlab.training.optim import lr_factor

from conftest import ROOT, SHAKESPEARE, TINY, read_scalars, train_args
from inprocess import kept_environ, run_main, run_main_captured, run_sample
from eval_items import TRAIN_CHOICE, TRAIN_CLOZE, native, write_jsonl

pytestmark = pytest.mark.slow

B, T = 8, 32  # TINY's data.batch_size and model.block_size
PROBE = ["+callbacks.probe._target_=rank_probe.RankProbe"]
PROBE_ENV = {"PYTHONPATH": str(ROOT / "tests")}


def probes(run_dir: Path) -> dict[int, dict]:
    out = {}
    for f in sorted(run_dir.glob("probe_rank*.json")):
        record = json.loads(f.read_text())
        out[record["global_rank"]] = record
    return out


def event_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.rglob("events.out.tfevents.*"))


@pytest.fixture(scope="module")
def eval_tasks(tmp_path_factory) -> list[Path]:
    """Task files for the downstream-eval callback the DDP run carries (tests/eval_items.py)."""
    d = tmp_path_factory.mktemp("ddp-tasks")
    return [write_jsonl(d / "lines.jsonl", TRAIN_CHOICE), write_jsonl(d / "words.jsonl", TRAIN_CLOZE)]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, data_dir, eval_tasks) -> tuple[Path, str]:
    """train.py's main in this process (rank 0), which starts rank 1 as from the script; what both printed."""
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    with kept_environ():
        os.environ.update(PROBE_ENV)
        os.environ.pop("OMP_NUM_THREADS", None)  # (the suite's workers set it): the launcher's own share of the cores
        code, out, err = run_main_captured(train_args(
            run_dir,
            "trainer=ddp_cpu",
            "trainer.devices=2",
            "trainer.accumulate_grad_batches=2",
            "trainer.max_steps=4",
            "trainer.val_check_interval=2",
            "optim.warmup_steps=2",
            "optim.lr=1e-3",
            "optim.min_lr=1e-4",
            *PROBE,
            # downstream tasks at each validation: 3 items a task over 2 ranks
            "callbacks=eval",
            f"callbacks.eval.tasks=[{eval_tasks[0]},{eval_tasks[1]}]",
            "callbacks.eval.limit=null",
        ))
    assert code == 0, err[-3000:]
    return run_dir, out + err


def test_ddp_ranks_draw_different_windows(ddp_run, data_dir):
    run_dir, _ = ddp_run
    ranks = probes(run_dir)
    assert sorted(ranks) == [0, 1]
    assert all(r["world_size"] == 2 for r in ranks.values())
    # 4 optimizer steps x 2 accumulated micro-batches on each rank
    assert [len(r["batches"]) for r in ranks.values()] == [8, 8]
    for k in range(8):
        assert ranks[0]["batches"][k] != ranks[1]["batches"][k], f"both ranks trained on the same batch {k}"
    # ... and they are exactly the windows the data module gives each rank
    dm = TokenDataModule(path=str(SHAKESPEARE), data_dir=str(data_dir), block_size=T, batch_size=B, seed=1337)
    dm.setup("fit")
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        dataset = dm.train_dataset()
        for k in (0, 7):
            assert dataset.batch(k)[0].tolist() == ranks[rank]["batches"][k]


def test_ddp_cpu_ranks_share_the_cores(ddp_run):
    """Each of 2 CPU processes computes with half the cores' threads (Lightning's launcher sets them where
    OMP_NUM_THREADS is not set), not one per core: they would spin against each other at every collective
    (5-8x fewer steps in the time-budget test below)."""
    run_dir, _ = ddp_run
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert [r["threads"] for r in probes(run_dir).values()] == [max(1, cores // 2)] * 2


def test_ddp_only_rank_zero_writes(ddp_run):
    run_dir, output = ddp_run
    assert len(event_files(run_dir)) == 1, event_files(run_dir)
    assert [p.name for p in (run_dir / "tensorboard").iterdir() if p.is_dir()] == []  # no version_1 etc.
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["best-step000004.ckpt", "last.ckpt"], ckpts
    assert not list(run_dir.rglob("lightning_logs"))
    assert output.count("[gptlab] final val/loss") == 1
    assert output.count("[gptlab] gpt with") == 1


def test_ddp_global_batch_and_lr_schedule(ddp_run):
    run_dir, _ = ddp_run
    scalars = read_scalars(run_dir / "tensorboard")
    # global batch: batch_size x devices x accumulate windows of block_size tokens per optimizer step
    tokens = dict(scalars["train/tokens"])
    assert tokens[3] == 4 * B * T * 2 * 2
    assert tokens[0] == B * T * 2 * 2
    # the LR follows the schedule of optimizer steps (warmup 2, cosine to min_lr at max_steps=4)
    lrs = dict(scalars["lr/decay"])
    assert sorted(lrs) == [0, 1, 2, 3]
    for step, lr in lrs.items():
        assert lr == pytest.approx(1e-3 * lr_factor(step, 2, 4, 0.1), rel=1e-5)
    # validation every 2 optimizer steps, the validation loss averaged over both ranks' shards
    assert [s for s, _ in scalars["val/loss"]] == [1, 3]
    assert all(math.isfinite(v) for _, v in scalars["val/loss"])


def test_ddp_eval_callback_gives_one_process_numbers(ddp_run, eval_tasks):
    """Each rank scores every second item; gathered, the logged numbers are the final weights' in one process."""
    run_dir, _ = ddp_run
    scalars = read_scalars(run_dir / "tensorboard")
    final = native(run_dir / "checkpoints" / "last.ckpt", eval_tasks)
    for task, metrics in final.items():
        for name, m in metrics.items():
            assert [s for s, _ in scalars[f"eval/{task}/{name}"]] == [1, 3]
            assert scalars[f"eval/{task}/{name}"][-1][1] == pytest.approx(m["value"], rel=1e-5), (task, name)


def test_an_eval_failing_on_one_rank_stops_every_rank(tmp_path, eval_tasks, monkeypatch):
    """callbacks=eval's ranks (gptlab.eval.ranks) in a real 2-process gloo group where rank 1 alone fails
    (its task file missing, then its share of the scoring raising): every rank raises at the same step,
    naming rank 1, and none waits at a collective for it."""
    import multiprocessing

    from eval_items import rank_of_a_failing_eval

    from gptlab.errors import DataError
    from gptlab.eval.callback import DownstreamEval

    # a task file that cannot be read stops a single process as the callback is built; one rank of a
    # launch keeps the error for its setup, where every rank raises together (checked below)
    missing = str(eval_tasks[0]) + ".missing"
    with pytest.raises(DataError, match="task file not found"):
        DownstreamEval([missing])
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert isinstance(DownstreamEval([missing]).error, DataError)

    ctx = multiprocessing.get_context("spawn")
    ranks = [ctx.Process(target=rank_of_a_failing_eval, args=(r, 2, str(tmp_path / "store"), str(eval_tasks[0]),
                                                             str(tmp_path))) for r in range(2)]
    for proc in ranks:
        proc.start()
    for proc in ranks:
        proc.join(timeout=120)
    hung = [proc.pid for proc in ranks if proc.is_alive()]
    for proc in ranks:
        if proc.is_alive():
            proc.kill()
    assert not hung, "a rank waits for the one that failed"
    seen = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)}
    assert seen[1]["seen"][0] == f"DataError: task file not found: {missing}"
    assert seen[0]["seen"][0] == f"DataError: callbacks=eval failed on rank 1: task file not found: {missing}"
    assert seen[1]["seen"][1] == "DataError: a share that cannot be scored"
    assert seen[0]["seen"][1] == "DataError: callbacks=eval failed on rank 1: a share that cannot be scored"
    assert seen[0]["joined"] == seen[1]["joined"] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_ddp_checkpoint_loads_and_samples(ddp_run, data_dir):
    run_dir, _ = ddp_run
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    assert ckpt["gptlab"]["tokens_seen"] == 4 * B * T * 2 * 2
    (text,) = run_sample([f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "max_new_tokens=10", "num_samples=1",
                          "prompt=ROMEO:", "device=cpu"])
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 10


def test_ddp_time_budget_gives_every_rank_the_same_schedule(tmp_path, data_dir, monkeypatch):
    """trainer.max_time under DDP: rank 0's clock drives the LR on both ranks and the stop. (Rank 0 is
    this process: train.py's main in-process; Lightning starts rank 1.)"""
    run_dir = tmp_path / "run"
    monkeypatch.setenv("PYTHONPATH", PROBE_ENV["PYTHONPATH"])
    assert run_main(train_args(run_dir, "trainer=ddp_cpu", "trainer.devices=2", "trainer.max_steps=-1",
                               "trainer.max_time={seconds: 2}", "trainer.val_check_interval=100000",
                               "optim.warmup_steps=2", "optim.lr=1e-3", "optim.min_lr=1e-4", *PROBE)) == 0
    ranks = probes(run_dir)
    assert ranks[0]["global_step"] == ranks[1]["global_step"] > 2  # past the warmup, however loaded the machine
    assert ranks[0]["lrs"] == ranks[1]["lrs"]  # bit for bit: the parameters stay replicas
    assert ranks[0]["lrs"][-1] < 1e-4 + 0.1 * 9e-4  # the cosine ran out with the budget


def test_multirun_with_ddp_gives_one_job_per_point(tmp_path, data_dir, monkeypatch, capfd):
    """The sweep runs in this process (train.py's main), each job's rank 0 too; the launcher starts rank 1."""
    sweep_dir = tmp_path / "sweep"
    args = [
        "-m",
        f"data.path={SHAKESPEARE}",
        *TINY,
        f"hydra.sweep.dir={sweep_dir}",
        "trainer=ddp_cpu",
        "trainer.devices=2",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "optim.lr=1e-3,2e-3",
        *PROBE,
    ]
    monkeypatch.setenv("PYTHONPATH", PROBE_ENV["PYTHONPATH"])
    code = run_main(args)
    output = "".join(capfd.readouterr())
    assert code == 0, output[-3000:]
    # one sweep of two jobs: the relaunched ranks started no sweeps of their own
    assert output.count("Launching 2 jobs locally") == 1
    assert len(re.findall(r"\t#0 : ", output)) == 1 and len(re.findall(r"\t#1 : ", output)) == 1
    assert sorted(p.name for p in sweep_dir.iterdir()) == ["0", "1", "multirun.yaml", "tensorboard"]
    assert not list(sweep_dir.glob("*/multirun.yaml"))
    # TensorBoard's view of the sweep: one link per job (rank 0's), named by what varies
    assert sorted(p.name for p in (sweep_dir / "tensorboard").iterdir()) == ["optim.lr=0.001", "optim.lr=0.002"]
    for job, lr in (("0", 1e-3), ("1", 2e-3)):
        job_dir = sweep_dir / job
        assert (job_dir / "checkpoints" / "last.ckpt").is_file()
        assert len(event_files(job_dir)) == 1
        hydra_cfg = yaml.safe_load((job_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]
        assert hydra_cfg["job"]["num"] == int(job)
        assert f"optim.lr={lr}" in hydra_cfg["overrides"]["task"]
        # both ranks of the job trained with the job's own config
        ranks = probes(job_dir)
        assert sorted(ranks) == [0, 1]
        assert [r["initial_lr"] for r in ranks.values()] == [lr, lr]
        assert [r["global_step"] for r in ranks.values()] == [2, 2]
        assert ranks[0]["batches"] != ranks[1]["batches"]
        ckpt = torch.load(job_dir / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["hyper_parameters"]["optim"]["lr"] == lr
