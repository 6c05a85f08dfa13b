"""Test-only callbacks for the health statistics and the spike guard (tests/test_health.py): they provoke a
spike at a chosen step and record what the run did, each rank to <run dir>/health_probe_rank<r>.json.

    +callbacks.probe._target_=health_probes.Probe  +callbacks.probe.corrupt_step=12   (PYTHONPATH=tests)
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import lightning as L
import torch


def flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


def hooks_left(module: torch.nn.Module) -> int:
    """Forward hooks, and attention layers whose `qkv` is wrapped (an instance attribute), in `module`."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + ("qkv" in vars(m)) for m in module.modules())


class Probe(L.Callback):
    """corrupt_step: that optimizer step's batch costs ten times its loss (on rank `corrupt_rank` only). lr_spike_step: that step's update uses
    `lr_factor` times the learning rate: the weights blow up and the next steps' loss spikes.
    nan_weights_at_validation: before that validation, a weight becomes NaN."""

    def __init__(self, corrupt_step: int = -1, corrupt_rank: int = 0, lr_spike_step: int = -1,
                 lr_factor: float = 1e4, nan_weights_at_validation: bool = False):
        self.corrupt_step, self.corrupt_rank = corrupt_step, corrupt_rank
        self.lr_spike_step, self.lr_factor = lr_spike_step, lr_factor
        self.nan_weights = nan_weights_at_validation
        self.record: dict = {"steps": [], "next_batch": [], "lr": [], "scheduler_epoch": []}
        self.before: torch.Tensor | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        self.record["steps"].append(step)
        self.record["next_batch"].append(trainer.datamodule.next_train_batch)  # the batch index + 1
        self.record["lr"].append(trainer.optimizers[0].param_groups[0]["lr"])
        self.record["scheduler_epoch"].append(trainer.lr_scheduler_configs[0].scheduler.last_epoch)
        self.before = flat(pl_module)
        if step == self.corrupt_step and trainer.global_rank == self.corrupt_rank:
            # a batch that costs ten times the loss (its gradient too), for this step only
            pl_module.loss = lambda b: type(pl_module).loss(pl_module, b) * 10

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        pl_module.__dict__.pop("loss", None)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.lr_spike_step:
            for group in optimizer.param_groups:
                group["lr"] *= self.lr_factor

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step - 1  # the step just taken
        hooks = hooks_left(pl_module)
        self.record.setdefault("hooks_after", []).append(hooks)
        if step == self.corrupt_step or step in [e["step"] for e in self._events(trainer)]:
            self.record.setdefault("unchanged", {})[str(step)] = bool(torch.equal(self.before, flat(pl_module)))
            self.record.setdefault("weights_after", {})[str(step)] = flat(pl_module).tolist()

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.nan_weights and not trainer.sanity_checking:
            with torch.no_grad():
                next(pl_module.model.parameters()).view(-1)[0] = float("nan")

    @staticmethod
    def _events(trainer) -> list[dict]:
        from gptlab.training.spikes import find_guard

        guard = find_guard(trainer)
        return guard.events if guard else []

    def on_train_end(self, trainer, pl_module) -> None:
        self.record.update(rank=trainer.global_rank, events=self._events(trainer), final=flat(pl_module).tolist())
        out = Path(trainer.default_root_dir) / f"health_probe_rank{trainer.global_rank}.json"
        out.write_text(json.dumps(self.record))


class NormProbe(L.Callback):
    """Records, per step, the gradients before clipping and after (once the optimizer has stepped), and
    the parameters before and after the update, for reference computations in the test."""

    last: NormProbe | None = None  # the in-process test reads it back

    def __init__(self) -> None:
        NormProbe.last = self
        self.pre: list[list[torch.Tensor]] = []
        self.post: list[list[torch.Tensor]] = []
        self.params: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        self.hooks_after: list[int] = []
        self.sampled: dict[int, dict[str, float]] = {}  # step -> act_rms/attn_logit_max of each block, recomputed
        self._handles: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if (step + 1) % next(c.interval for c in trainer.callbacks if hasattr(c, "histogram_every")) == 0:
            for i, block in enumerate(pl_module.model.transformer.h):
                self._handles.append(block.register_forward_hook(partial(self._reference, step, i)))

    def _reference(self, step, i, block, args, output) -> None:
        """The block's output RMS, and its largest causal attention score from the queries and keys
        recomputed in float64 (the class's qkv: past any wrapper)."""
        with torch.no_grad():
            x = block.ln_1(args[0])
            q, k, _ = type(block.attn).qkv(block.attn, x, args[1] if len(args) > 1 else None)
            scores = q.double() @ k.double().transpose(-2, -1) / q.size(-1) ** 0.5
            keep = torch.ones(q.size(2), q.size(2), dtype=torch.bool).tril()
            self.sampled.setdefault(step, {})[f"attn_logit_max/block{i}"] = scores.masked_fill(~keep, -torch.inf).max().item()
            self.sampled[step][f"act_rms/block{i}"] = output.double().square().mean().sqrt().item()

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def on_train_start(self, trainer, pl_module) -> None:
        optimizer = trainer.optimizers[0]
        params = [p for g in optimizer.param_groups for p in g["params"]]

        def post_step(opt, args, kwargs):  # (Lightning runs forward and backward inside optimizer.step)
            self.post.append([p.grad.clone() for p in params])
            self.params[-1][1].extend(p.detach().clone() for p in params)

        optimizer.register_step_post_hook(post_step)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.pre.append([p.grad.clone() for p in params])
        self.params.append(([p.detach().clone() for p in params], []))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.hooks_after.append(hooks_left(pl_module))
