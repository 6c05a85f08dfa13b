"""The README's Quickstart runs as written: every command of its ```bash blocks, in order, with tiny step
counts appended, in a fresh directory (so `outputs/` is where the README says it is)."""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, SHAKESPEARE, TINY
from inprocess import run_main, run_sample, run_train


STEPS = ["trainer.max_steps=2", "trainer.val_check_interval=2", "~callbacks.attention_maps",
         "callbacks.text_sample.max_new_tokens=4"]


def quickstart_commands() -> list[list[str]]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Quickstart\n(.*?)^## ", readme, re.S | re.M).group(1)
    blocks = re.findall(r"^```bash\n(.*?)^```", section, re.S | re.M)
    return [shlex.split(line, comments=True) for block in blocks for line in block.splitlines() if line.strip()]


def resolve(arg: str, cwd: Path) -> str:
    """`outputs/.../<date>/...` as the path in `cwd` (each <date> is the one directory there)."""
    key, eq, value = arg.rpartition("=") if "=" in arg else ("", "", arg)
    if not value.startswith("outputs"):
        return arg
    path = cwd
    for part in Path(value).parts:
        if part == "<date>":
            (path,) = [p for p in path.iterdir() if p.is_dir()]
        else:
            path = path / part
    return f"{key}{eq}{path}"


def test_readme_is_short_and_has_a_quickstart():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 250
    programs = [" ".join(c[:3]) if c[:2] == ["python", "-m"] else " ".join(c[:2]) for c in quickstart_commands()]
    assert programs[:3] == ["python train.py", "tensorboard --logdir", "python sample.py"], programs


def test_quickstart_commands_run(tmp_path, data_dir, monkeypatch):
    ran = []
    for cmd in quickstart_commands():
        args = [resolve(a, tmp_path) for a in cmd]
        if args[:2] == ["python", "train.py"] and "-m" not in args:
            run_dir = tmp_path / "outputs" / "train" / "runs" / "2026-01-01_00-00-00"
            run_train([*args[2:], f"data.path={SHAKESPEARE}", *TINY, *STEPS], run_dir)
            assert (run_dir / "checkpoints" / "last.ckpt").is_file()
        elif args[:2] == ["python", "train.py"]:  # a sweep: a multirun with its sweeper, launcher and callbacks
            monkeypatch.chdir(tmp_path)
            assert run_main([*args[2:], f"data.path={SHAKESPEARE}", *TINY, *STEPS]) == 0
            monkeypatch.chdir(ROOT)
            (sweep,) = (tmp_path / "outputs" / "train" / "multiruns").iterdir()
            assert sorted(p.name for p in sweep.iterdir() if p.name.isdigit()) == ["0", "1"]
            assert all((job / "DONE").is_file() for job in sweep.iterdir() if job.name.isdigit())
        elif args[0] == "tensorboard":  # a server: check that it has what to show, and that it is installed
            assert shutil.which("tensorboard") or importlib.util.find_spec("tensorboard.main")
            assert list(Path(args[args.index("--logdir") + 1]).rglob("events.out.tfevents.*"))
        elif args[:2] == ["python", "sample.py"]:
            texts = run_sample([*args[2:], "num_samples=1", "max_new_tokens=8", "device=cpu"])
            assert len(texts) == 1 and texts[0].startswith("ROMEO:")
        elif args[:3] == ["python", "-m", "gptlab.report"]:
            from gptlab.report.__main__ import main

            main(args[3:])
            assert (Path(args[3]) / "report.md").is_file()
        elif args[:3] == ["python", "-m", "gptlab.eval"]:
            # scores hellaswag and lambada, downloaded on first use: the evaluation tests check it offline
            continue
        else:
            pytest.fail(f"README Quickstart: no check for {' '.join(cmd)}; add one to {Path(__file__).name}")
        ran.append(" ".join(cmd[:3]))
    assert len(ran) >= 5, ran
