"""Hydra callbacks (conf/hydra/default.yaml): a writable output directory before Hydra writes to it,
and a sweep's tally at its end."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from gptlab.files import FilesystemError, check_writable


def fail(message: str) -> None:
    """`Error: <message>` on stderr and exit status 1: a bad sweep setting, before any job runs."""
    print(f"Error: {message}", file=sys.stderr)
    raise SystemExit(1)


class OutputDirCheck(Callback):
    """One clear line, not a traceback, when the run or sweep directory cannot be created; and a sweep
    that was asked for a run directory (`hparams_search=optuna` switches to multirun by itself) says so
    instead of writing elsewhere."""

    def _check(self, directory: str, key: str) -> None:
        try:
            check_writable(directory, key)
        except FilesystemError as e:
            fail(str(e))

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        given = [o for o in config.hydra.overrides.hydra if o.split("=")[0].lstrip("+~") == "hydra.run.dir"]
        if given:
            fail(f"this is a sweep (multirun): {given[0]} is not used; give hydra.sweep.dir=<dir> instead")
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")


class SweepTally(Callback):
    """At the end of a multirun, one line: `N jobs: F finished, X failed (#3 non-finite loss, ...)`, then
    `, P pruned (#4 at step 20, ...)` if an Optuna pruner stopped some, from the DONE / FAILED / PRUNED
    markers of the jobs this sweep ran; exit status 1 if any failed (a pruned trial did not fail)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time() - 1.0

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from gptlab.run.job import read_marker

        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():  # the sweep stopped before its first job (its error is on stderr)
            return
        jobs = sorted((p for p in sweep_dir.glob("[0-9]*") if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
        outcomes = [(p.name, *read_marker(p)) for p in jobs if _ran_now(p, self.started)]
        finished = [o for o in outcomes if o[1] == "finished"]
        failed = [o for o in outcomes if o[1] == "failed"]
        line = f"[gptlab] {len(outcomes)} jobs: {len(finished)} finished, {len(failed)} failed"
        if failed:
            reasons = ", ".join(f"#{num} {_short(str(why))}" for num, _, why in failed[:8])
            line += f" ({reasons}{', ...' if len(failed) > 8 else ''})"
        pruned = [o for o in outcomes if o[1] == "pruned"]
        if pruned:
            at = ", ".join(f"#{num} at step {(why or {}).get('steps')}" for num, _, why in pruned[:8])
            line += f", {len(pruned)} pruned ({at}{', ...' if len(pruned) > 8 else ''})"
        print(f"{line}; sweep directory {sweep_dir}", file=sys.stderr if failed else sys.stdout, flush=True)
        if failed:
            raise SystemExit(1)


def _ran_now(job_dir: Path, since: float) -> bool:
    """A job of this sweep: its marker (or, still unmarked, its directory) is newer than the sweep's start
    (a resumed Optuna study's sweep directory also holds the jobs of earlier sweeps)."""
    markers = [job_dir / m for m in ("DONE", "FAILED", "PRUNED") if (job_dir / m).exists()]
    return any(m.stat().st_mtime >= since for m in markers) or (not markers and job_dir.stat().st_mtime >= since)


def _short(reason: str, width: int = 50) -> str:
    """The error's first clause, e.g. `non-finite training loss (nan) at step 3`."""
    reason = reason.split(";")[0].strip()
    return reason if len(reason) <= width else reason[: width - 3] + "..."
