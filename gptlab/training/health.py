"""Training health statistics, to every tracker (docs/health.md says what each curve means).

Every logged step (cheap: the norm is computed once per step and reused by clipping):
    train/grad_norm       the global gradient norm before clipping (also on the console bar)
    train/clip_fraction   the share of the steps since the last logged one whose norm was clipped
Every `interval` steps (a sampled step), per block (`block<i>`, `other`: embeddings, final norm, head)
and per optimizer group (`group_<name>`):
    grad_norm/<part>, param_norm/<part>
    update_ratio/<part>   RMS of the step's update / RMS of the weights (AdamW's and Muon's groups alike)
    act_rms/block<i>      RMS of each block's output
    attn_logit_max/block<i>  the largest pre-softmax attention score of each layer
Activations come from forward hooks, attention scores from each layer's own queries and keys (its `qkv`
wrapped), both on the sampled step only and removed when its forward pass ends; other steps pay nothing
for them and never wait for the device.
Weight and gradient histograms go to TensorBoard every `histograms_every_n_validations` validations.
"""

from __future__ import annotations

import math
import re
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from gptlab.models.block import CausalSelfAttention
from gptlab.schema import Positive, check_args
from gptlab.training.optim import plain_name
from gptlab.training.parallel import local_part, shard_copies

_BLOCK = re.compile(r"(?:^|\.)h\.(\d+)(?:\.|$)")


def logged_step(trainer: L.Trainer, step: int) -> bool:
    """Whether the loggers write optimizer step `step` (1-based: the step being taken)."""
    return step % max(1, trainer.log_every_n_steps) == 0 or step == trainer.max_steps


def max_attention_logit(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The largest causal q.k / sqrt(d) of queries (B, n_head, T, d) and keys (B, n_kv_head, T, d), as float32.
    The query heads that share a key head are stacked along time, so keys are never repeated, and the
    causal mask is added inside the product (baddbmm): one pass over the scores, in slices of the batch."""
    B, H, T, d = q.shape
    groups, rep = k.size(1), H // k.size(1)
    q = q.reshape(B * groups, rep * T, d)
    k = k.reshape(B * groups, T, d).transpose(1, 2)
    hidden = torch.full((T, T), -math.inf, dtype=q.dtype, device=q.device).triu(1).repeat(rep, 1)
    chunk = max(1, (1 << 24) // (rep * T * T))  # at most ~16M scores at once
    best = [torch.baddbmm(hidden, q[i:i + chunk], k[i:i + chunk], alpha=1 / math.sqrt(d)).amax()
            for i in range(0, q.size(0), chunk)]
    return torch.stack(best).amax().float()


class TrainingHealth(L.Callback):
    """Args:
        interval: the per-block and per-group statistics every this many optimizer steps.
        histograms_every_n_validations: weight and gradient histograms (TensorBoard) every N
            validations; null: none.
    """

    def __init__(self, interval: Positive = 50, histograms_every_n_validations: Positive | None = 4):
        check_args(TrainingHealth, locals())  # (gptlab/config.py checks a run's config against the same)
        self.interval = interval
        self.histogram_every = histograms_every_n_validations
        self.validations = 0  # in the checkpoint: a resumed run keeps the rhythm
        self._histograms_due = False
        self._clipped: torch.Tensor | None = None
        self._steps = 0
        self._hooks: list[Any] = []
        self._found: dict[str, torch.Tensor] = {}
        self._before: list[torch.Tensor] | None = None
        self._parts: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.validations = int(state.get("validations", 0))

    def _sampled(self, trainer: L.Trainer) -> bool:
        return (trainer.global_step + 1) % self.interval == 0

    def _index(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """The optimizer's parameters, with the block and the group each belongs to."""
        if self._parts is None:
            names = {id(p): plain_name(n) for n, p in pl_module.named_parameters()}
            params, blocks, groups, block_names = [], [], [], []
            for g, group in enumerate(trainer.optimizers[0].param_groups):
                for p in group["params"]:
                    match = _BLOCK.search(names.get(id(p), ""))
                    label = f"block{int(match.group(1))}" if match else "other"
                    if label not in block_names:
                        block_names.append(label)
                    params.append(p)
                    blocks.append(block_names.index(label))
                    groups.append(g)
            device = pl_module.device
            group_names = [f"group_{g.get('name', i)}" for i, g in enumerate(trainer.optimizers[0].param_groups)]
            self._parts = {"params": params, "names": block_names + group_names,
                           "block": torch.tensor(blocks, device=device),
                           "group": torch.tensor(groups, device=device) + len(block_names),
                           # FSDP2 / tensor parallel: each rank's shards, summed over the ranks, count once
                           "copies": torch.tensor([shard_copies(p) for p in params], dtype=torch.float32, device=device)
                           if pl_module._model_parallel() else None}
        return self._parts

    def _per_part(self, pl_module: L.LightningModule, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Summed squares of `tensors` (one per parameter, or its shard on this rank) per block, then per group."""
        parts = self._parts
        squares = torch.stack(torch._foreach_norm([local_part(t) for t in tensors])).float().square()
        if parts["copies"] is not None:
            squares = squares / parts["copies"]
        out = torch.zeros(len(parts["names"]), device=squares.device)
        out.index_add_(0, parts["block"], squares).index_add_(0, parts["group"], squares)
        if pl_module._sharded() or parts["copies"] is not None:  # every rank holds a shard of each parameter
            out = pl_module.trainer.strategy.reduce(out, reduce_op="sum")
        return out

    # -- sampled steps: hooks on the forward pass ------------------------------------------------
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._sampled(trainer) or self._hooks or getattr(pl_module, "compile_model", False):
            return  # (a compiled model would recompile for hooks that come and go)
        blocks = [(int(m.group(1)), mod) for name, mod in pl_module.named_modules()
                  if (m := _BLOCK.search(name)) and name.endswith(f"h.{m.group(1)}")]
        for i, block in blocks:
            self._hooks.append(block.register_forward_hook(self._activation_hook(f"act_rms/block{i}")))
            attn = next((a for a in block.modules() if isinstance(a, CausalSelfAttention)), None)
            if attn is not None:
                self._wrap_qkv(attn, f"attn_logit_max/block{i}")

    def _activation_hook(self, key: str):
        def hook(module, args, output):
            out = local_part(output.detach())  # its mean square here, the root once the ranks are averaged
            self._found[key] = torch.linalg.vector_norm(out, dtype=torch.float32).square() / out.numel()
        return hook

    def _wrap_qkv(self, attn: CausalSelfAttention, key: str) -> None:
        """For this forward pass, the layer's queries and keys go to `max_attention_logit`: the scores
        come from the projection the layer computes anyway (a forward hook would have to redo it)."""
        qkv = attn.qkv

        def wrapped(x, rope=None):
            q, k, v = qkv(x, rope)
            with torch.no_grad():
                self._found[key] = max_attention_logit(q.detach(), k.detach())
            return q, k, v

        attn.qkv = wrapped  # an instance attribute: it hides the method until remove_hooks deletes it
        self._hooks.append(attn)

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            if isinstance(hook, CausalSelfAttention):
                vars(hook).pop("qkv", None)
            else:
                hook.remove()
        self._hooks.clear()

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self.remove_hooks()  # the forward pass is over (activation checkpointing would rerun it in backward)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.remove_hooks()  # a run that failed inside a sampled forward pass leaves a plain model behind

    # -- every step: the gradient norm; sampled steps: norms and a snapshot for the update ratio --
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        self._steps += 1
        if trainer.gradient_clip_val:  # (clipping reuses the norm: no extra pass over the gradients)
            clipped = pl_module.grad_norm() > trainer.gradient_clip_val
            self._clipped = clipped if self._clipped is None else self._clipped + clipped
        if logged_step(trainer, trainer.global_step + 1):
            pl_module.log("train/grad_norm", pl_module.grad_norm(), on_step=True, on_epoch=False, prog_bar=True)
        if self._histograms_due:
            self._histograms(trainer, pl_module)
        if not self._sampled(trainer):
            return
        parts = self._index(trainer, pl_module)
        params = [p for p in parts["params"]]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        self._found["grad"], self._found["param"] = self._per_part(pl_module, grads), self._per_part(pl_module, params)
        self._before = [local_part(p.detach()).clone() for p in params]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step  # the step just taken; Lightning logs its metrics at step - 1
        self.remove_hooks()
        if logged_step(trainer, step) and self._steps and trainer.gradient_clip_val and trainer.is_global_zero:
            fraction = float(self._clipped) / self._steps
            for logger in trainer.loggers:
                logger.log_metrics({"train/clip_fraction": fraction}, step=step - 1)
        if logged_step(trainer, step):
            self._clipped, self._steps = None, 0
        if self._before is None:
            return
        metrics = self._sampled_metrics(trainer, pl_module)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step - 1)

    def _sampled_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        parts, found = self._parts, self._found
        names, values = [], []
        dropped = any(getattr(c, "dropped_step", None) == trainer.global_step - 1 for c in trainer.callbacks)
        if not dropped:  # a skipped or rolled-back step has no update of its own
            delta = torch._foreach_sub([local_part(p.detach()) for p in parts["params"]], self._before)
            ratio = (self._per_part(pl_module, delta) / found["param"].clamp(min=1e-30)).sqrt()
            names += [f"update_ratio/{n}" for n in parts["names"]]
            values.append(ratio)
        names += [f"grad_norm/{n}" for n in parts["names"]] + [f"param_norm/{n}" for n in parts["names"]]
        values += [found.pop("grad").sqrt(), found.pop("param").sqrt()]
        for prefix, reduce_op in (("act_rms/", "mean"), ("attn_logit_max/", "max")):
            keys = [k for k in found if k.startswith(prefix)]
            if keys:  # over all ranks: their batches (DDP, FSDP) or their heads (tensor parallel)
                value = torch.stack([found[k] for k in keys])
                if trainer.world_size > 1:
                    value = trainer.strategy.reduce(value, reduce_op=reduce_op)
                names += keys
                values.append(value.sqrt() if prefix == "act_rms/" else value)
        self._before = None
        self._found = {}
        return dict(zip(names, torch.cat([v.flatten() for v in values]).tolist()))

    # -- histograms ------------------------------------------------------------------------------
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self.validations += 1
        if self.histogram_every and (self.validations - 1) % self.histogram_every == 0:
            self._histograms_due = True  # at the next step, which has gradients

    def _histograms(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._histograms_due = False
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers or not trainer.is_global_zero:
            return
        for name, p in pl_module.named_parameters():
            for kind, value in (("weights", p), ("grads", p.grad)):
                if value is not None:
                    for logger in loggers:
                        tag = f"{kind}/{plain_name(name).removeprefix('model.')}"
                        logger.experiment.add_histogram(tag, value.detach().float().cpu(),
                                                        global_step=trainer.global_step)
