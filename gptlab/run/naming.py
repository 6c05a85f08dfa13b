"""The one rule that names a run from its overrides, for the trackers, the console and the sweep report:
its command-line overrides minus those it shares with the rest of its sweep and minus those that say
where it goes or how it is watched, sampled numbers shortened; else a fallback (its experiment's name)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from gptlab.run.job import read_yaml

# overrides that say where a run goes or how it is watched, not what it trains
NOISE = ("hydra", "paths", "log_dir", "data_dir", "ckpt_path", "resume", "logger", "callbacks", "data.path")


def key_of(override: str) -> str:
    """`model.pos` of `model.pos=rope`, `+x=1` or `~x`."""
    return override.split("=", 1)[0].lstrip("~+")


def command_line_keys() -> set[str]:
    """The keys this job's command line set (Hydra's task overrides); none outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    return {key_of(o) for o in HydraConfig.get().overrides.task} if HydraConfig.initialized() else set()


def is_noise(override: str) -> bool:
    key = key_of(override)
    return any(key == n or key.startswith(n + ".") or key.startswith(n + "/") for n in NOISE)


def short(override: str) -> str:
    """`optim.lr=0.00024373700083914676` as `optim.lr=0.0002437` (a sampled value's digits)."""
    key, sep, value = override.partition("=")
    try:
        number = float(value)
    except ValueError:
        return override
    return f"{key}={number:.4g}" if sep and len(value) > 8 and not value.isdigit() else override


def run_name(overrides: Iterable[str], shared: Iterable[str] = (), fallback: str = "") -> str:
    """`overrides` minus `shared` and the noise, joined by commas; `fallback` when nothing is left."""
    shared = set(shared)
    return ",".join(short(o) for o in overrides if o not in shared and not is_noise(o)) or fallback


def job_overrides(run_dir: str | os.PathLike) -> list[str]:
    """The overrides a job directory was started with (`.hydra/overrides.yaml`)."""
    return [str(o) for o in (read_yaml(Path(run_dir) / ".hydra" / "overrides.yaml") or [])]


def sweep_name(run_dir: str | os.PathLike) -> str:
    """A running job's name without the rest of its sweep: the overrides given verbatim on the sweep's
    command line (its fixed ones; swept ones were lists or ranges there) are shared by every job."""
    run_dir = Path(run_dir)
    launch = ((read_yaml(run_dir.parent / "multirun.yaml") or {}).get("hydra") or {}).get("overrides") or {}
    return run_name(job_overrides(run_dir), [str(o) for o in launch.get("task") or []], run_dir.name)
