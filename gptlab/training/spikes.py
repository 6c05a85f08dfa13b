"""Loss spikes: a running mean and deviation of the training loss (and, optionally, of the gradient
norm) flag a step whose loss lies above mean + k deviations, or is not finite, and a policy decides:

    warn      log it and count it (a non-finite loss still stops the run: it must never be applied)
    skip      discard that step's update: no optimizer step, no scheduler step; the data moves on
    rollback  reload the newest good checkpoint's weights and optimizer state in the running process,
              keep going with the batches after the spike, the learning rate scaled by `lr_scale`
    stop      end the run with one line; the last good checkpoint is intact

The decision is taken after backward and before the optimizer step, from the loss averaged over all
ranks (one all-reduce and one host sync per step), so every rank takes the same one. The running
statistics, the events and the rollback bookkeeping travel in the checkpoint: a resumed run decides as
the uninterrupted one would. A non-finite validation loss, or non-finite logits met by a callback
(`validation_ok`), go through the same rule before anything else can fail on them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import lightning as L
import torch

from gptlab.errors import LossSpikeError, NonFiniteLossError
from gptlab.schema import Positive, Range, check_args

Policy = Literal["warn", "skip", "rollback", "stop"]
Above0 = Annotated[float, Range(0.0, low_open=True)]
AtLeast0 = Annotated[int, Range(0)]
ADVICE = "lower optim.lr, raise optim.warmup_steps or use trainer.precision=32-true"


class RunningStat:
    """Exponential moving mean and variance over about `window` values."""

    def __init__(self, window: int):
        self.beta = 1.0 - 1.0 / max(1, window)
        self.n, self.mean, self.var = 0, 0.0, 0.0

    def update(self, x: float) -> None:
        if self.n == 0:
            self.mean = x
        else:
            d = x - self.mean
            self.mean += (1.0 - self.beta) * d
            self.var = self.beta * (self.var + (1.0 - self.beta) * d * d)
        self.n += 1

    def threshold(self, k: float) -> float:
        return self.mean + k * math.sqrt(self.var)


def _fmt(x: float | None) -> str:
    return "nan" if x is None else f"{x:.4g}"


class SpikeGuard(L.Callback):
    """Args:
        policy: what a spike does: warn, skip, rollback or stop (see the module's docstring).
        k: a loss above the running mean + k running deviations is a spike.
        warmup: steps whose loss only feeds the statistics (only non-finite losses count before).
        window: steps the running mean and deviation remember (an exponential moving average).
        grad_norm_k: also a spike: a gradient norm above its mean + grad_norm_k deviations; null: no.
        max_consecutive: skips or rollbacks in a row allowed; the next spike in a row ends the run.
        lr_scale: each rollback multiplies the learning rate (all groups, the whole schedule) by it.
    """

    def __init__(self, policy: Policy = "warn", k: Above0 = 6.0, warmup: AtLeast0 = 50, window: Positive = 30,
                 grad_norm_k: Above0 | None = None, max_consecutive: AtLeast0 = 20, lr_scale: Above0 = 1.0):
        check_args(SpikeGuard, locals())  # (gptlab/config.py checks a run's config against the same)
        self.policy, self.k, self.warmup, self.grad_norm_k = policy, k, warmup, grad_norm_k
        self.max_consecutive, self.lr_scale = max_consecutive, lr_scale
        self.loss_stat, self.grad_stat = RunningStat(window), RunningStat(window)
        self.events: list[dict[str, Any]] = []  # one per spike: step, kind, loss, grad_norm, action
        self.consecutive = 0  # skips/rollbacks since the last healthy step
        self.rollback_limit: int | None = None  # a rollback in a row goes to a checkpoint before this step
        self.poisoned: list[tuple[int, int]] = []  # (lo, hi]: steps of checkpoints written from spiked weights
        self.dropped_step: int | None = None  # the step whose update was discarded (read by TrainingHealth)
        self._losses: list[torch.Tensor] = []
        self._held: tuple[int, list[float], list[float]] | None = None  # the scheduler before a skipped step
        self._said_no_checkpoint = False
        self._unlogged = False
        self._val_verdicts: dict[int, bool] = {}

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"loss": [self.loss_stat.n, self.loss_stat.mean, self.loss_stat.var],
                "grad_norm": [self.grad_stat.n, self.grad_stat.mean, self.grad_stat.var],
                "events": self.events, "consecutive": self.consecutive, "rollback_limit": self.rollback_limit,
                "poisoned": [list(p) for p in self.poisoned]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for stat, key in ((self.loss_stat, "loss"), (self.grad_stat, "grad_norm")):
            stat.n, stat.mean, stat.var = int(state[key][0]), float(state[key][1]), float(state[key][2])
        self.events = [dict(e) for e in state.get("events", [])]
        self.consecutive = int(state.get("consecutive", 0))
        self.rollback_limit = state.get("rollback_limit")
        self.poisoned = [(int(lo), int(hi)) for lo, hi in state.get("poisoned", [])]

    # -- training steps --------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.loss_guarded = True  # the module leaves non-finite losses to this callback

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self._losses.append(pl_module.last_loss)  # unscaled (AMP scales the `loss` given here)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        losses = self._losses or [pl_module.last_loss]
        values = torch.stack([torch.stack(losses).mean().float(), pl_module.grad_norm().float()])
        self._losses.clear()
        if trainer.world_size > 1:  # every rank judges the same numbers
            values = trainer.strategy.reduce(values, reduce_op="mean")
        loss, norm = values.tolist()  # the one host sync per step
        kind = self._judge(trainer, loss, norm)
        if kind is None:
            self.consecutive, self.rollback_limit = 0, None
            self.loss_stat.update(loss)
            self.grad_stat.update(norm)
            return
        finite = kind != "non-finite"
        action = "stop" if not finite and self.policy == "warn" else self.policy
        if action in ("skip", "rollback") and self.consecutive >= self.max_consecutive:
            raise LossSpikeError(f"{self.consecutive + 1} loss spikes in a row (the last at step {trainer.global_step}, "
                                 f"loss {_fmt(loss if finite else None)}); stopping after "
                                 f"callbacks.spikes.max_consecutive={self.max_consecutive}. {ADVICE}")
        event = {"step": trainer.global_step, "kind": kind, "loss": loss if math.isfinite(loss) else None,
                 "grad_norm": norm if math.isfinite(norm) else None, "threshold": self.loss_stat.threshold(self.k)}
        if not finite:
            event["what"] = "training loss" if not math.isfinite(loss) else "gradient norm"
        if action == "rollback":
            target = self._rollback(trainer, pl_module, optimizer, trainer.global_step)
            action = "rollback" if target else "skip"
            event["checkpoint"] = target
        event["action"] = action
        self._record(trainer, event)
        if action == "stop":
            error = LossSpikeError if finite else NonFiniteLossError
            what = "loss spike" if finite else f"non-finite {event['what']}"
            value = norm if event.get("what") == "gradient norm" else loss
            raise error(f"{what} ({_fmt(value)}) at step {trainer.global_step}; stopping. The last good checkpoint is "
                        f"intact; {ADVICE}")
        if action == "warn":
            self.loss_stat.update(loss)
            self.grad_stat.update(norm)
            return
        self.consecutive += 1
        self.dropped_step = trainer.global_step
        for group in optimizer.param_groups:  # an optimizer skips parameters without a gradient
            for p in group["params"]:
                p.grad = None
        if action == "skip":
            scheduler = trainer.lr_scheduler_configs[0].scheduler if trainer.lr_scheduler_configs else None
            if scheduler is not None:
                self._held = (scheduler.last_epoch, [g["lr"] for g in optimizer.param_groups], list(scheduler._last_lr))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._held is not None:  # undo the scheduler step Lightning took after a skipped update
            scheduler = trainer.lr_scheduler_configs[0].scheduler
            scheduler.last_epoch, lrs, scheduler._last_lr = self._held
            for group, lr in zip(trainer.optimizers[0].param_groups, lrs):
                group["lr"] = lr
            self._held = None
        step = trainer.global_step  # after the step; Lightning logs this step's metrics at step - 1
        if trainer.is_global_zero and (self._unlogged or step % max(1, trainer.log_every_n_steps) == 0):
            for logger in trainer.loggers:
                logger.log_metrics({"train/spikes": float(len(self.events))}, step=step - 1)
        self._unlogged = False

    def _judge(self, trainer: L.Trainer, loss: float, norm: float) -> str | None:
        # under fp16 mixed precision the grad scaler owns overflowing gradients (it skips that step itself)
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        if not math.isfinite(loss) or (not math.isfinite(norm) and not scaled):
            return "non-finite"
        judged = self.loss_stat.n >= max(2, self.warmup)  # a deviation needs a few values
        if judged and loss > self.loss_stat.threshold(self.k):
            return "spike"
        if judged and self.grad_norm_k and norm > self.grad_stat.threshold(self.grad_norm_k):
            return "spike"
        return None

    def _record(self, trainer: L.Trainer, event: dict[str, Any]) -> None:
        self.events.append(event)
        if not trainer.is_global_zero:
            return
        what = {"warn": "kept", "skip": "update skipped", "stop": "stopping",
                "rollback": f"rolled back to {Path(str(event.get('checkpoint'))).name}"}[event["action"]]
        if event["kind"] == "spike":
            why = f"loss {_fmt(event['loss'])} > {_fmt(event['threshold'])}"
        else:
            why = f"non-finite {event['what']}"
        print(f"[gptlab] spike at step {event['step']}: {why}; {what}", flush=True)
        self._unlogged = True  # train/spikes goes to the trackers at the end of this step

    # -- rollback --------------------------------------------------------------------------------
    def _checkpoint_before(self, trainer: L.Trainer, limit: int) -> tuple[str | None, int]:
        """The newest checkpoint of this run written before step `limit` from healthy weights."""
        from gptlab import checkpoint
        from gptlab.errors import CheckpointError

        best: tuple[int, int, str] | None = None
        dirs = {Path(c.dirpath) for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)}
        for path in (p for d in dirs if d.is_dir() for p in d.glob("*.ckpt")):
            try:
                step = checkpoint.info(path).step
            except CheckpointError:
                continue
            if step < limit and not any(lo < step <= hi for lo, hi in self.poisoned):
                key = (step, path.stat().st_mtime_ns, str(path))
                best = max(best, key) if best else key
        return (best[2], best[0]) if best else (None, -1)

    def _rollback(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer, step: int) -> str | None:
        """Load the newest good checkpoint's weights and optimizer state; the step counter, the schedule
        and the data go on. A rollback right after a rollback goes one checkpoint further back."""
        limit = self.rollback_limit if self.consecutive and self.rollback_limit is not None else step
        found = self._checkpoint_before(trainer, limit) if trainer.is_global_zero else None
        path, ckpt_step = trainer.strategy.broadcast(found, src=0)
        if path is None:
            if not self._said_no_checkpoint and trainer.is_global_zero:
                print("[gptlab] rollback: no checkpoint before this step yet; skipping the update instead", flush=True)
            self._said_no_checkpoint = True
            return None
        ckpt = trainer.strategy.load_checkpoint(path)
        trainer.strategy.load_model_state_dict(ckpt, strict=True)
        lrs = [(g["lr"], g.get("initial_lr")) for g in optimizer.param_groups]
        trainer.strategy.load_optimizer_state_dict(ckpt)  # the moments of then; the learning rates of now
        for group, (lr, initial) in zip(optimizer.param_groups, lrs):
            group["lr"] = lr * self.lr_scale
            if initial is not None:
                group["initial_lr"] = initial
        for config in trainer.lr_scheduler_configs:
            config.scheduler.base_lrs = [b * self.lr_scale for b in config.scheduler.base_lrs]
        self.poisoned.append((ckpt_step, step))
        self.rollback_limit = ckpt_step
        return path

    # -- validation ------------------------------------------------------------------------------
    def judge_validation(self, trainer: L.Trainer, pl_module: L.LightningModule, bad: bool, what: str) -> bool:
        """The rule for a non-finite validation loss or logits: roll back under `rollback` (when a
        checkpoint allows), stop otherwise. True: the outputs of this validation may be made."""
        step = trainer.global_step
        if not bad or self._val_verdicts.get(step) is False:  # one verdict per validation: one rollback
            return self._val_verdicts.get(step, True)
        event = {"step": step, "kind": "non-finite", "what": what, "loss": None, "grad_norm": None}
        target = None
        if self.policy == "rollback" and trainer.state.fn == "fit":  # (trainer.validate() has no optimizer)
            target = self._rollback(trainer, pl_module, trainer.optimizers[0], step)
        event["action"], event["checkpoint"] = ("rollback" if target else "stop"), target
        self._record(trainer, event)
        if target is None:
            raise NonFiniteLossError(f"non-finite {what} at step {step}; stopping. The last good checkpoint is "
                                     f"intact; {ADVICE}")
        self.consecutive += 1
        self._val_verdicts = {step: False}
        return False


def spikes_line(events: list[dict[str, Any]]) -> str:
    """`3 (step 120 skip, step 340 rollback, step 351 warn)`: the guard's events, the last few."""
    shown = ", ".join(f"step {e['step']} {e['action']}" for e in events[-5:])
    return f"{len(events)}" + (f" ({'..., ' if len(events) > 5 else ''}{shown})" if events else "")


def find_guard(trainer: L.Trainer) -> SpikeGuard | None:
    return next((c for c in trainer.callbacks if isinstance(c, SpikeGuard)), None)


def validation_ok(trainer: L.Trainer, pl_module: L.LightningModule, logits: torch.Tensor | None = None,
                  what: str = "logits") -> bool:
    """For the callbacks that use the model at a validation (text samples, attention maps, evals): False
    when they must not go on. A non-finite validation loss, or non-finite `logits`, goes through the run's
    spike rule first (without a SpikeGuard: NonFiniteLossError, one line); every rank decides alike."""
    value = trainer.callback_metrics.get("val/loss")
    bad_loss = value is not None and not trainer.sanity_checking and not bool(torch.isfinite(value).all())
    bad = bad_loss or (logits is not None and not bool(torch.isfinite(logits).all()))
    bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
    label = "validation loss" if bad_loss else what
    guard = find_guard(trainer)
    if guard is not None:
        return guard.judge_validation(trainer, pl_module, bad, label)
    if bad:
        raise NonFiniteLossError(f"non-finite {label} at step {trainer.global_step}; stopping. {ADVICE}")
    return True
