"""Helpers shared by the benchmarks in bench/: paths, machine info, tables, JSON results.

Imported by the scripts as a sibling module (`python bench/<name>.py` puts bench/ on sys.path).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]  # the repository root
RESULTS = ROOT / "bench" / "results"
# A directory holding tinyshakespeare.txt and optionally tiktoken_cache/ (as for the test suite);
# without it the corpus comes from gptlab's own cache, downloaded once.
DATA = os.environ.get("GPTLAB_TEST_DATA")

if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))
if DATA and (Path(DATA) / "tiktoken_cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(Path(DATA) / "tiktoken_cache"))


def corpus() -> Path:
    """Tiny Shakespeare: $GPTLAB_TEST_DATA/tinyshakespeare.txt, else gptlab's cache (sha256-checked download)."""
    if DATA and (Path(DATA) / "tinyshakespeare.txt").is_file():
        return Path(DATA) / "tinyshakespeare.txt"
    from gptlab.data.download import TINY_SHAKESPEARE_SHA256, TINY_SHAKESPEARE_URL, default_data_dir, download

    return download(TINY_SHAKESPEARE_URL, default_data_dir() / "corpora" / "tinyshakespeare.txt", TINY_SHAKESPEARE_SHA256)


def __getattr__(name: str) -> Any:
    if name == "SHAKESPEARE":  # looked up when first used, so that `--help` needs no corpus
        globals()[name] = corpus()
        return globals()[name]
    raise AttributeError(name)


def compose(overrides: Sequence[str], hydra_cfg: bool = False):
    """conf/train.yaml with `overrides`, as `python train.py <overrides>` composes it (hydra_cfg: the Hydra node too)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return hydra_compose("train", overrides=list(overrides), return_hydra_config=hydra_cfg)
    finally:
        GlobalHydra.instance().clear()


def fit_in_process(overrides: Sequence[str], run_dir: str | Path):
    """gptlab.run.fit.fit on conf/train.yaml with `overrides` as train.py runs it, in this process, writing
    into run_dir (its checkpoints, its TensorBoard and its log directory); fit's Outcome."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from gptlab.run.fit import fit

    cfg = compose(overrides, hydra_cfg=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as @hydra.main passes it: the Hydra node lives in HydraConfig
        cfg.paths.output_dir = cfg.paths.log_dir = str(run_dir)
    return fit(cfg)


def train_py(args: Sequence[str], in_process: bool = False) -> tuple[int, str, str]:
    """`python train.py <args>` from the repository root: (exit status, stdout, stderr). `in_process` (the
    --tiny modes): the same run through fit_in_process, into the args' hydra.run.dir, which spares a
    Python start and its seconds of imports (the end-to-end time then leaves them out)."""
    if not in_process:
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, capture_output=True, text=True)
        return proc.returncode, proc.stdout, proc.stderr
    run_dir = next((a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")), None)
    if run_dir is None:
        raise ValueError("train_py(in_process=True) writes into the args' hydra.run.dir=<dir>; none was given")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fit_in_process([a for a in args if not a.startswith("hydra.run.dir=")], run_dir)
    return 0, out.getvalue(), ""


def model_config(name: str, **changes: Any) -> dict[str, Any]:
    """The shape of conf/model/<name>.yaml (its base config included, the run switches left out), with `changes`."""
    from omegaconf import OmegaConf

    from gptlab.config import RUN_SWITCHES

    model = OmegaConf.to_container(compose([f"model={name}", "~experiment"]).model, resolve=True)
    return {**{k: v for k, v in model.items() if k not in RUN_SWITCHES}, **changes}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(torch_too: bool = True) -> dict[str, Any]:
    info: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }
    if torch_too:
        import torch

        info.update(
            torch=torch.__version__,
            torch_threads=torch.get_num_threads(),
            torch_interop_threads=torch.get_num_interop_threads(),
            cpu_capability=torch.backends.cpu.get_cpu_capability(),
            mkldnn=torch.backends.mkldnn.is_available(),
            mkl=torch.backends.mkl.is_available(),
        )
        try:
            import lightning

            info["lightning"] = lightning.__version__
        except ImportError:
            pass
    return info


def machine_line(info: dict[str, Any]) -> str:
    parts = [
        f"cpu: {info['cpu_model']} ({info['cpu_count']} cpus, {info.get('cpu_affinity')} usable)",
        f"load avg {info['loadavg_1_5_15'][0]:.2f}" if info.get("loadavg_1_5_15") else "",
    ]
    if "torch" in info:
        parts.append(f"torch {info['torch']} ({info['torch_threads']} threads, {info['cpu_capability']})")
    line = " | ".join(p for p in parts if p)
    load = (info.get("loadavg_1_5_15") or [0])[0]
    if load > 0.5:
        line += f"\n[bench] WARNING: load average {load:.2f} on {info['cpu_count']} cpus: other work is running, timings are noisy"
    return line


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], left: Sequence[int] = (0,)) -> str:
    """A plain-text table: columns right-aligned except those in `left` (default: the first)."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    lines = [fmt(headers), fmt(["-" * w for w in widths])]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, mean and spread of a sample (seconds or whatever unit it is in)."""
    v = sorted(values)
    if not v:
        return {"n": 0}
    q = lambda p: v[min(len(v) - 1, max(0, round(p * (len(v) - 1))))]  # noqa: E731
    return {
        "n": len(v),
        "median": statistics.median(v),
        "mean": statistics.fmean(v),
        "min": v[0],
        "p10": q(0.10),
        "p90": q(0.90),
        "max": v[-1],
        "stdev": statistics.stdev(v) if len(v) > 1 else 0.0,
    }


def write_results(name: str, data: dict[str, Any], out: str | None = None) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def int_list(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


def float_list(text: str) -> list[float]:
    return [float(x) for x in str(text).split(",") if x.strip()]
