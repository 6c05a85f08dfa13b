"""Run train.py's `train(cfg)` and sample.py's `sample(cfg)` inside the test process from a config
composed as Hydra composes it (a subprocess costs seconds of imports on a small CPU)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def compose_config(overrides: list[str], config_name: str = "train", hydra_cfg: bool = False) -> DictConfig:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
            return compose(config_name=config_name, overrides=overrides, return_hydra_config=hydra_cfg)
    finally:
        GlobalHydra.instance().clear()


@cache
def script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"gptlab_script_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the script look their module up
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def kept_logging() -> Iterator[None]:
    """Hydra configures logging for the job it runs (handlers on the streams of that moment: pytest's
    captured ones, closed after the test); later tests should log as before."""
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.Logger.manager.loggerDict))]
    saved = {lg: (lg.handlers[:], lg.level, lg.propagate) for lg in loggers}
    try:
        yield
    finally:
        for lg in [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.Logger.manager.loggerDict))]:
            lg.handlers[:], lg.level, lg.propagate = saved.get(lg, ([], logging.NOTSET, True))


@contextlib.contextmanager
def kept_environ() -> Iterator[None]:
    """Lightning leaves PL_GLOBAL_SEED and the like in os.environ; later subprocesses should not see them."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def train_config(overrides: list[str], output_dir: Path, log_dir: Path | None = None) -> DictConfig:
    """The config `python train.py <overrides>` would run with, in the run directory `output_dir`
    (`paths.log_dir`: `log_dir`, by default the run directory too)."""
    cfg = compose_config(overrides, hydra_cfg=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as @hydra.main passes it: the Hydra node lives in HydraConfig
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(log_dir or output_dir)
    return cfg


def run_train(overrides: list[str], output_dir: Path, log_dir: Path | None = None) -> float | None:
    """train.train(cfg) as `python train.py <overrides>` would run it, in the run directory `output_dir`."""
    cfg = train_config(overrides, output_dir, log_dir)
    with kept_environ():
        return script("train").train(cfg)


def run_sample(overrides: list[str]) -> list[str]:
    return script("sample").sample(compose_config(overrides, config_name="sample"))


def run_main_captured(args: list[str], name: str = "train") -> tuple[int, str, str]:
    """`run_main`, with what it printed, the processes it started (DDP ranks) included: (exit status,
    stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with tempfile.TemporaryFile() as fd1, tempfile.TemporaryFile() as fd2:
        sys.stdout.flush(), sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(fd1.fileno(), 1), os.dup2(fd2.fileno(), 2)  # what child processes inherit
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = run_main(args, name)
        finally:
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
        children = [f.seek(0) or f.read().decode(errors="replace") for f in (fd1, fd2)]
    return code, out.getvalue() + children[0], err.getvalue() + children[1]


def run_main(args: list[str], name: str = "train") -> int:
    """`python <name>.py <args>` in this process, Hydra and all (a multirun with its sweeper, launcher
    and callbacks): its exit status. With trainer=ddp_cpu this process is rank 0 and Lightning starts
    the other ranks as it would from the script: `python <name>.py <args>` (__main__ has no __spec__ then;
    under `python -m pytest` it has one, and Lightning would start `python -m pytest.__main__ <args>`).
    The launcher gives this process its share of the cores; later tests get the threads they had."""
    import torch

    saved, main_module, threads = sys.argv, sys.modules["__main__"], torch.get_num_threads()
    saved_spec = main_module.__spec__
    sys.argv = [str(ROOT / f"{name}.py"), *args]
    main_module.__spec__ = None
    main = script(name).main
    main.__wrapped__.__module__ = "__main__"  # so Hydra looks for conf/ beside the script, as when run as one
    try:
        with kept_environ(), kept_logging():
            main()
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv, main_module.__spec__ = saved, saved_spec
        torch.set_num_threads(threads)
        GlobalHydra.instance().clear()
