"""The LightningModule that trains any gptlab model as a next-token predictor."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, SumMetric

from gptlab.checkpoint import FORMAT, strip_compile_prefix
from gptlab.data.tokenizers import tokenizer_from_state
from gptlab.errors import NonFiniteLossError
from gptlab.models import build_model
from gptlab.training.health import logged_step
from gptlab.training.optim import (
    OptimConfig,
    ParamRoles,
    build_optimizer,
    build_schedule,
    fused_by_default,
    param_groups,
)
from gptlab.training.parallel import ModelParallel, clip_grads_with_norm, global_grad_norm


def time_budget(trainer: L.Trainer | None):
    """The fraction of `trainer.max_time` spent so far, as a function (None without a time budget).
    Lightning's Timer keeps the clock (validation included) and carries it through a resume; with
    several processes rank 0's clock rules, as it does for Lightning's stop, so that every rank steps
    with the same learning rate."""
    from lightning.pytorch.callbacks import Timer

    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None) if trainer else None
    if timer is None or timer.time_remaining() is None:
        return None
    budget = timer.time_elapsed() + timer.time_remaining()
    if trainer.world_size == 1:
        return lambda: timer.time_elapsed() / budget
    return lambda: trainer.strategy.broadcast(timer.time_elapsed() / budget, src=0)


class LanguageModel(L.LightningModule):
    """Wraps a model built from `model` (a plain dict: arch, shape and vocab_size).

    The hyperparameters saved with every checkpoint are plain containers (model config, optimizer
    config, tokenizer state), so a checkpoint alone is enough to sample and loads with
    `weights_only=True`.
    """

    def __init__(
        self,
        model: dict[str, Any],
        optim: dict[str, Any] | None = None,
        tokenizer: dict[str, Any] | None = None,
        seed: int = 1337,
        compile: bool | str = False,
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        # `compile` and `activation_checkpointing` are how this run executes, not what the checkpoint holds
        self.save_hyperparameters(ignore=["compile", "activation_checkpointing"], logger=False)
        self.model = build_model(dict(model))
        self.model.activation_checkpointing = bool(activation_checkpointing)
        self.optim = OptimConfig(**(optim or {}))
        self.compile_model = bool(compile)
        # compile: true uses the default backend (inductor); a string names another (e.g. aot_eager)
        self.compile_backend = compile if isinstance(compile, str) else "inductor"
        self.seed = seed
        self.val_loss = MeanMetric()
        self.val_nats, self.val_bytes = SumMetric(), SumMetric()  # for val/bpb, summed over all ranks
        self._token_bytes: torch.Tensor | None = None
        self._val_names: list[str] | None = None  # a mixture's sources, validated one by one
        self._per_source: torch.Tensor | None = None  # per source: window losses, windows, nats, bytes
        # progress counters that travel in the checkpoint
        self.tokens_seen = 0
        self.micro_step = 0  # micro-batches trained on (optimizer steps x accumulation)
        self.best_val_loss = float("inf")
        self.validation_seconds = 0.0  # wall-clock spent validating (reported by train.py)
        self._validation_started = 0.0
        self._compiled = False
        self._grad_norm: torch.Tensor | None = None  # this optimizer step's, computed once (grad_norm)
        # True when a SpikeGuard callback judges every step's loss, finite or not (gptlab.training.spikes)
        self.loss_guarded = False
        self.last_loss: torch.Tensor | None = None  # the last micro-batch's training loss
        self._roles = ParamRoles.of(self.model)  # now: FSDP later turns the matrices into flat 1-D shards

    # -- setup ------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, ModelParallel) and not self._compiled:
            # FSDP2 / tensor parallel; names are kept, but c_attn becomes c_attn.q/k/v: roles again
            strategy.parallelize(self.model, self.compile_backend if self.compile_model else None)
            self._roles = ParamRoles.of(self.model)
            self._compiled = True
        if self.compile_model and not self._compiled:
            # Module.compile() compiles forward in place: the parameters keep their names, so
            # checkpoints carry no `_orig_mod.` prefixes and load into eager or compiled models alike.
            self.model.compile(backend=self.compile_backend)
            self._compiled = True

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch[0], batch[1]
        logits = self.model(x)
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.reshape(-1))

    # -- training ---------------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Dropout draws from torch's global RNG. Seeding it from (seed, rank, micro-batch) makes every
        # step reproducible on its own, so a resumed run replays exactly what an uninterrupted one
        # would have, and ranks draw different masks.
        # (the data-parallel rank: the ranks of a tensor-parallel group draw the same masks)
        seed = int(np.random.SeedSequence([self.seed, self._data_parallel()[0], self.micro_step]).generate_state(1)[0])
        torch.default_generator.manual_seed(seed)  # ~100x cheaper than torch.manual_seed
        if self.device.type == "cuda":
            torch.cuda.default_generators[self.device.index or 0].manual_seed(seed)
        self._grad_norm = None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        if not self.loss_guarded and not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite training loss ({loss.item()}) at step {self.global_step}; stopping. The last "
                f"good checkpoint is intact; lower optim.lr, raise warmup or use trainer.precision=32-true"
            )
        self.last_loss = loss.detach()  # for the spike guard
        self.micro_step += 1
        self.tokens_seen += batch[0].numel() * self._data_parallel()[1]
        # Only on the steps the logger writes: each self.log call costs ~0.5 ms of Python (Lightning
        # moves its result record to the value's device every time), 2% of a small CPU model's step.
        if logged_step(self.trainer, self.global_step + 1):
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
            self.log("train/tokens", float(self.tokens_seen), on_step=True, on_epoch=False)
            counts = getattr(self.trainer.datamodule, "counts", None)
            for name, value in (counts.metrics() if counts is not None else {}).items():
                self.log(name, value, on_step=True, on_epoch=False)  # train/tokens/<source>, train/epochs/<source>
        return loss

    def _data_parallel(self) -> tuple[int, int]:
        """(rank, size) among the ranks that read different batches."""
        kwargs = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) or {}
        return kwargs.get("rank", self.global_rank), kwargs.get("num_replicas", self.trainer.world_size)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Stopping through `should_stop` at max_steps makes Lightning validate (and so checkpoint)
        # at the final step too, whether or not max_steps is a multiple of val_check_interval.
        if 0 < self.trainer.max_steps <= self.global_step:
            self.trainer.should_stop = True

    def on_validation_epoch_start(self) -> None:
        self._validation_started = time.perf_counter()
        if self._token_bytes is None and self.hparams.get("tokenizer"):
            # UTF-8 bytes of each token's text (0 for special tokens): the unit of val/bpb
            sizes = tokenizer_from_state(self.hparams["tokenizer"]).token_bytes()
            self._token_bytes = torch.as_tensor(sizes, dtype=torch.long, device=self.device)
        self._val_names = getattr(self.trainer.datamodule, "val_names", None) if self.trainer.datamodule else None
        if self._val_names:
            self._per_source = torch.zeros(len(self._val_names), 4, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        logits = self.model(x)
        losses = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.reshape(-1), reduction="none")
        self.val_loss.update(losses.mean(), weight=x.size(0))
        if self._token_bytes is not None:
            size = self._token_bytes.to(y.device)[y.reshape(-1)]
            self.val_nats.update((losses * (size > 0)).sum())
            self.val_bytes.update(size.sum())
        if self._val_names and len(batch) > 2:  # (x, y, source of each window)
            rows = torch.stack([losses.view(x.size(0), -1).mean(1), torch.ones(x.size(0), device=x.device)], 1)
            if self._token_bytes is not None:
                nats, size = (losses * (size > 0)).view(x.size(0), -1).sum(1), size.view(x.size(0), -1).sum(1)
                rows = torch.cat([rows, torch.stack([nats, size.to(nats.dtype)], 1)], 1)
            self._per_source[:, : rows.size(1)].index_add_(0, batch[2].to(x.device), rows.double())

    def on_validation_epoch_end(self) -> None:
        value = self.val_loss.compute()  # averaged over all windows and all ranks
        self.val_loss.reset()
        self.validation_seconds += time.perf_counter() - self._validation_started
        if self.trainer.sanity_checking:
            return
        self.best_val_loss = min(self.best_val_loss, float(value))
        self.log("val/loss", value, prog_bar=True, sync_dist=False)
        if self._token_bytes is not None:
            # bits per UTF-8 byte of the text the windows cover: one axis for every tokenizer
            nats, size = self.val_nats.compute(), self.val_bytes.compute()
            self.log("val/bpb", nats / math.log(2) / size.clamp(min=1), sync_dist=False)
        self.val_nats.reset()
        self.val_bytes.reset()
        if self._val_names:  # val/loss/<source>, val/bpb/<source>: summed over all ranks first
            sums = self.trainer.strategy.reduce(self._per_source, reduce_op="sum")
            for name, (loss, windows, nats, size) in zip(self._val_names, sums.tolist()):
                self.log(f"val/loss/{name}", loss / max(windows, 1), sync_dist=False)
                if self._token_bytes is not None:
                    self.log(f"val/bpb/{name}", nats / math.log(2) / max(size, 1), sync_dist=False)
        self.log("val/ppl", torch.exp(value))
        self.log("hp/best_val_loss", self.best_val_loss)

    # -- optimizer --------------------------------------------------------------------------------
    def configure_optimizers(self):
        cfg = self.optim
        groups = param_groups(list(self.model.named_parameters()), self._roles, cfg)
        try:
            trainer = self.trainer
        except RuntimeError:  # configure_optimizers called outside a Trainer
            trainer = None
        fused = cfg.fused
        if fused is None:
            fused = fused_by_default(self.device, *((trainer.precision, trainer.gradient_clip_val) if trainer else ()))
        optimizer = build_optimizer(groups, cfg, fused)
        scheduler = build_schedule(optimizer, cfg, trainer.max_steps if trainer else None, time_budget(trainer))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"}}

    def _sharded(self) -> bool:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return isinstance(self.trainer.strategy.model, FullyShardedDataParallel)

    def _model_parallel(self) -> bool:
        return isinstance(self.trainer.strategy, ModelParallel)

    def grad_norm(self) -> torch.Tensor:
        """The global L2 norm of this optimizer step's gradients before clipping, on the device (no host
        sync). Computed once per step: the health statistics, the spike guard and clipping share it."""
        if self._grad_norm is None:
            # the optimizer's order, as torch's clip_grad_norm_ would sum them: the same number to the last bit
            grads = [p.grad for g in self.trainer.optimizers[0].param_groups for p in g["params"] if p.grad is not None]
            if self._model_parallel():
                norm = global_grad_norm(grads)
            else:
                norm = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else torch.zeros((), device=self.device)
            if self._sharded():  # each rank holds a shard of every gradient
                norm = self.trainer.strategy.reduce(norm.square(), reduce_op="sum").sqrt()
            self._grad_norm = norm
        return self._grad_norm

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # FSDP shards the gradients: their norm is one over all shards, which only the FSDP root module
        # computes (Lightning refuses torch's clip_grad_norm_ under FSDP)
        by_norm = gradient_clip_val and gradient_clip_algorithm in (None, "norm")
        if by_norm and self._sharded():
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
        elif by_norm and self._model_parallel():  # DTensors on up to two meshes
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            clip_grads_with_norm(grads, gradient_clip_val, self.grad_norm())
        elif by_norm and self._grad_norm is not None:  # the norm is known already: one pass over the gradients
            params = [p for g in optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, self._grad_norm, foreach=True)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # -- checkpoint -------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # update, not replace: the TrackerRunIds callback (gptlab.run.trackers) adds "trackers"
        checkpoint.setdefault("gptlab", {}).update({
            "format": FORMAT,
            "tokens_seen": self.tokens_seen,
            "micro_step": self.micro_step,
            "best_val_loss": self.best_val_loss,
            # the last logged values: a finished run that is resumed (a requeue) reports them
            "metrics": {k: float(v) for k, v in self.trainer.callback_metrics.items() if v.numel() == 1},
        })
        # Flush the event files first, so that what a checkpoint claims was logged is on disk.
        for logger in self.loggers:
            logger.save()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("gptlab", {})
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.micro_step = int(state.get("micro_step", 0))
        self.best_val_loss = float(state.get("best_val_loss", float("inf")))
        # accept checkpoints of compiled models saved by other tools (`model._orig_mod.x`); a sharded
        # checkpoint's weights went straight into the model (ModelParallelStrategy.load_checkpoint)
        if "state_dict" in checkpoint:
            checkpoint["state_dict"] = strip_compile_prefix(checkpoint["state_dict"])
