"""What a training run prints: a step-based progress bar, Lightning without its tips and harmless
warnings, one end-of-run block with the paths and next commands, and one line per finished sweep job.

    quiet_lightning()                     # before the Trainer is created
    # conf/callbacks/default.yaml: progress_bar: {_target_: gptlab.run.console.StepProgressBar}
    print(summary(run_dir, best_ckpt, last_ckpt, "val/loss", 1.70, steps=600, seconds=151))
    print(job_line(run_dir, "val/loss", 1.70, steps=600, seconds=151))   # instead, in a multirun
"""

from __future__ import annotations

import logging
import math
import os
import re
import shlex
import sys
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm


def _fmt_rate(value: float) -> str:
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}"


def _fmt_seconds(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "?"
    s = int(round(value))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class StepProgressBar(TQDMProgressBar):
    """Progress in optimizer steps: `step 120/600 |####| 00:31<02:04, loss=1.912, grad_norm=0.41, val/loss=1.954,
    tok/s=12.3k` (no epochs: training is step-based). The validation bar replaces itself, and the bar ends its
    line at the last step, so Lightning's closing "`Trainer.fit` stopped" line starts on a line of its own.

    Where stdout is not a terminal (a log file, SLURM, a sweep's captured output) a redrawn bar would
    leave a trail of carriage returns, so it prints one plain line per validation instead:
    `step 200/600  loss 1.912  grad_norm 0.41  val/loss 1.954  12.3k tok/s  0:41 elapsed  ETA 1:22`.

    Args:
        refresh_rate: redraw the bar every N steps.
        plain: True: plain lines; False: the bar; None: the bar on a terminal, plain lines elsewhere.
        window: steps in the rolling average of tokens/s.
    """

    BAR = "step {n_fmt}/{total_fmt} |{bar:24}| {elapsed}<{remaining}{postfix}"

    def __init__(self, refresh_rate: int = 1, plain: bool | None = None, window: int = 50, process_position: int = 0):
        super().__init__(refresh_rate=refresh_rate, process_position=process_position)
        self.plain = plain
        self._rate: deque[tuple[float, float]] = deque(maxlen=max(2, window))  # (train clock, tokens)
        self._tokens = 0.0
        self._paused = 0.0  # seconds spent validating, left out of tokens/s
        self._validation_started: float | None = None
        self._started = 0.0
        self._start_step = 0
        self._drawn = 0.0  # when the bar was last redrawn

    # -- what is shown --------------------------------------------------------------------------
    def _is_plain(self) -> bool:
        return (not sys.stdout.isatty()) if self.plain is None else bool(self.plain)

    def tokens_per_second(self) -> float | None:
        if len(self._rate) < 2 or self._rate[-1][0] <= self._rate[0][0]:
            return None
        return (self._rate[-1][1] - self._rate[0][1]) / (self._rate[-1][0] - self._rate[0][0])

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """train loss, gradient norm, the last val/loss and tokens/s (strings: tqdm would pad numbers)."""
        metrics = trainer.progress_bar_metrics
        out: dict[str, Any] = {}
        for key, label, fmt in (("train/loss", "loss", ".4f"), ("train/grad_norm", "grad_norm", ".3g"),
                                ("val/loss", "val/loss", ".4f")):
            if key in metrics:
                out[label] = f"{float(metrics[key]):{fmt}}"
        rate = self.tokens_per_second()
        if rate is not None:
            out["tok/s"] = _fmt_rate(rate)
        return out

    def status_line(self, trainer: L.Trainer) -> str:
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        step = trainer.global_step
        parts = [f"step {step}/{total}" if total else f"step {step}"]
        parts += [f"{k} {v}" if k != "tok/s" else f"{v} tok/s" for k, v in self.get_metrics(trainer, None).items()]
        elapsed = time.perf_counter() - self._started
        parts.append(f"{_fmt_seconds(elapsed)} elapsed")
        done = step - self._start_step
        if total and 0 < done and step < total:
            parts.append(f"ETA {_fmt_seconds(elapsed / done * (total - step))}")
        return "  ".join(parts)

    # -- training bar ---------------------------------------------------------------------------
    def init_train_tqdm(self) -> Tqdm:
        trainer = self.trainer
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        return Tqdm(
            position=2 * self.process_position,
            disable=self.is_disabled or self._is_plain(),
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,  # ETA from the average step time, validation pauses included
            total=total,
            initial=trainer.global_step,  # a resumed run starts where it was
            bar_format=self.BAR,
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()
        self._start_step = trainer.global_step
        super().on_train_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        pass  # one bar for the whole run: no reset, no "Epoch N" at epoch boundaries

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = time.perf_counter()
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        self._tokens += getattr(x, "numel", lambda: 0)() * trainer.world_size
        self._rate.append((now - self._paused, self._tokens))
        bar = self.train_progress_bar
        step, total = trainer.global_step, bar.total
        last = total is not None and step >= total
        # at most ~10 redraws a second: a fast GPU step would spend more on the terminal than on math
        if self.is_enabled and (step % self.refresh_rate == 0 or last) and (now - self._drawn >= 0.1 or last):
            self._drawn = now
            if not bar.disable:
                bar.n = step
                bar.refresh()
            bar.set_postfix(self.get_metrics(trainer, pl_module))
        if last and not trainer.enable_validation:
            self._finish(trainer)

    def _finish(self, trainer: L.Trainer) -> None:
        """The last step: end the bar's line (or print the last plain line) before Lightning's
        "`Trainer.fit` stopped" message."""
        if self._is_plain() and self.is_enabled and not trainer.enable_validation:
            print(self.status_line(trainer), flush=True)
        self.train_progress_bar.close()

    # -- validation -----------------------------------------------------------------------------
    def init_validation_tqdm(self) -> Tqdm:
        # under the training bar and gone when done during fit (leave=False); kept by trainer.validate()
        has_main_bar = self.trainer.state.fn != "validate"
        return Tqdm(
            desc="val",
            position=2 * self.process_position + has_main_bar,
            disable=self.is_disabled or self._is_plain(),
            leave=not has_main_bar,
            dynamic_ncols=True,
            file=sys.stdout,
            bar_format=self.BAR_FORMAT,
        )

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validation_started = time.perf_counter()
        super().on_validation_start(trainer, pl_module)

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        super().on_validation_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
        if batch_idx == 0:
            self.val_progress_bar.set_description("val")  # not "Validation DataLoader 0"

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._validation_started is not None:
            self._paused += time.perf_counter() - self._validation_started
            self._validation_started = None
        if trainer.state.fn == "fit" and not trainer.sanity_checking:  # the training bar exists
            self.train_progress_bar.n = trainer.global_step  # a throttled redraw may have skipped it
        super().on_validation_end(trainer, pl_module)  # closes the val bar, redraws the postfix
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        if self._is_plain() and self.is_enabled:
            print(self.status_line(trainer), flush=True)
        max_steps = trainer.max_steps
        if max_steps and 0 < max_steps <= trainer.global_step:
            self._finish(trainer)


# -- Lightning's console noise --------------------------------------------------------------------

_DROPPED_LINES = (
    # "💡 Tip: ... try installing [litlogger]" (or [litmodels]): Lightning's cloud promotion, every Trainer
    re.compile(r"^💡 Tip: "),
    # "TPU available: False, using: 0 TPU cores" (and HPU/IPU): accelerators this machine has not;
    # the "GPU available: ..., used: ..." line stays (it says whether the GPU is used)
    re.compile(r"^(TPU|HPU|IPU) available: False"),
)

_HARMLESS_WARNINGS = (
    # torch >= 2.10 deprecates `isinstance(x, LeafSpec)`, which Lightning's _pytree still uses on every
    # step's outputs; nothing for the user to do (from lightning/pytorch/utilities/_pytree.py)
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    # "The 'train_dataloader' does not have many workers ...": a batch is a slice of a memory-mapped token
    # file, there is no decoding for workers to do (data.num_workers can still be raised)
    (r"The '(train|val)_dataloader' does not have many workers", UserWarning),
    # under DDP, for val/* and hp/best_val_loss: gptlab reduces those over the ranks itself (torchmetrics,
    # the strategy's reduce), and sync_dist=True would average them a second time
    (r"It is recommended to use `self.log\('(val/[^']*|hp/best_val_loss)', \.\.\., sync_dist=True\)`", UserWarning),
)


class _DropLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in _DROPPED_LINES)


def quiet_lightning() -> None:
    """Silence Lightning's tips and the warnings above; everything else (real warnings, the GPU
    line, "`Trainer.fit` stopped") stays. Call once before creating the Trainer; idempotent."""
    # rank_zero_info logs through one of these two loggers (whichever module was imported last)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) for f in logger.filters):
            logger.addFilter(_DropLines())
    for message, category in _HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


# -- end of a run ---------------------------------------------------------------------------------

def _shown(path: str | os.PathLike | None) -> str:
    """A path as the user would type it: relative to the current directory when under it, quoted."""
    if path is None:
        return "-"
    path = Path(path).absolute()
    try:
        path = path.relative_to(Path.cwd())
    except ValueError:
        pass
    return shlex.quote(str(path))


def _fmt_value(value: float | None) -> str:
    return "-" if value is None else (f"{value:.4f}" if math.isfinite(value) else str(value))


def _fmt_tokens(tokens: float | None) -> str:
    return "" if tokens is None else f", {_fmt_rate(tokens)} tokens"


def summary(run_dir: str | os.PathLike, best_ckpt: str | os.PathLike | None, last_ckpt: str | os.PathLike | None,
            metric: str, value: float | None, steps: int | None = None, seconds: float | None = None,
            tokens: float | None = None, spikes: str | None = None) -> str:
    """The end-of-run block: where everything is and the commands to go on with."""
    done = f"{metric} {_fmt_value(value)}"
    if steps is not None:
        done += f" after {steps} steps"
    done += _fmt_tokens(tokens) + (f" in {_fmt_seconds(seconds)}" if seconds is not None else "")
    ckpt = best_ckpt or last_ckpt
    lines = [
        "─" * 72,
        f"run finished: {done}",
        f"  run dir          {_shown(run_dir)}",
        f"  best checkpoint  {_shown(best_ckpt)}",
        f"  last checkpoint  {_shown(last_ckpt)}",
        *([f"  loss spikes      {spikes}"] if spikes is not None else []),
        "next:",
    ]
    if ckpt is not None:
        lines.append(f"  python sample.py ckpt_path={_shown(ckpt)}")
    tensorboard = Path(run_dir) / "tensorboard"
    lines.append(f"  tensorboard --logdir {_shown(tensorboard if tensorboard.is_dir() else run_dir)}")
    if last_ckpt is not None:
        lines.append(f"  python train.py ckpt_path={_shown(last_ckpt)} trainer.max_steps=<more>   # train on")
    lines.append("─" * 72)
    return "\n".join(lines)


def job_line(run_dir: str | os.PathLike, metric: str, value: float | None, steps: int | None = None,
             seconds: float | None = None, name: str | None = None) -> str:
    """One line for a finished job of a multirun: `[job 3] optim.lr=0.003,model.n_layer=4: val/loss
    1.7012 after 600 steps in 2:31 (outputs/.../3)`. `name`: the job's overrides minus the sweep's
    fixed ones (the default, read from the job's .hydra/overrides.yaml and the sweep's multirun.yaml)."""
    from gptlab.run.naming import sweep_name

    run_dir = Path(run_dir)
    name = name if name is not None else sweep_name(run_dir)
    done = f"{metric} {_fmt_value(value)}" + (f" after {steps} steps" if steps is not None else "")
    done += f" in {_fmt_seconds(seconds)}" if seconds is not None else ""
    return f"[job {run_dir.name}] {name}: {done} ({_shown(run_dir)})"
