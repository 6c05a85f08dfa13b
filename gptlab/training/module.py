"""The LightningModule that trains any gptlab model as a next-token predictor."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from gptlab.checkpoint import COMPILE_PREFIX, strip_compile_prefix
from gptlab.errors import ConfigError, GptlabError
from gptlab.models import build_model
from gptlab.training.muon import Muon


class NonFiniteLossError(GptlabError):
    pass


@dataclass
class OptimConfig:
    name: str = "adamw"  # "adamw", or "muon": Muon for the hidden matrices, AdamW for the rest
    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    warmup_steps: int = 100
    decay_steps: int | None = None  # cosine decay ends here; None: the trainer's max_steps
    fused: bool | None = None  # None: fused AdamW on CPU and CUDA, foreach elsewhere
    muon_lr: float | None = None  # Muon's peak learning rate; None: lr (min_lr / lr scales both alike)
    momentum: float = 0.95  # Muon's (Nesterov) momentum
    ns_steps: int = 5  # Muon's Newton-Schulz iterations

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.muon_lr is not None and self.muon_lr <= 0:
            raise ConfigError(f"optim.muon_lr={self.muon_lr}: must be > 0 (or null: optim.lr)")
        if self.name not in ("adamw", "muon"):
            raise ConfigError(f"optim.name={self.name!r}: must be 'adamw' or 'muon' (optim=adamw / optim=muon)")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"optim.lr={self.lr}, optim.min_lr={self.min_lr}: need 0 <= min_lr <= lr, lr > 0")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps}: must be >= 0")


def _plain_name(name: str) -> str:
    """A parameter's name without the wrappers FSDP, activation checkpointing or torch.compile insert."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", COMPILE_PREFIX):
        name = name.replace(wrapper, "")
    return name


def lr_factor(step: int, warmup: int, decay_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to `min_ratio` at `decay_steps`, then flat."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if step >= decay_steps:
        return min_ratio
    progress = (step - warmup) / max(1, decay_steps - warmup)
    return min_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_ratio)


class LanguageModel(L.LightningModule):
    """Wraps a model built from `model` (a plain dict: arch, shape, vocab_size, compile, ...).

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
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.model = build_model(dict(model))
        self.optim = OptimConfig(**(optim or {}))
        self.compile_model = bool(model.get("compile", False))
        # compile: true uses the default backend (inductor); a string names another (e.g. aot_eager)
        self.compile_backend = model["compile"] if isinstance(model.get("compile"), str) else "inductor"
        self.seed = seed
        self.val_loss = MeanMetric()
        # progress counters that travel in the checkpoint
        self.tokens_seen = 0
        self.micro_step = 0  # micro-batches trained on (optimizer steps x accumulation)
        self.best_val_loss = float("inf")
        self.validation_seconds = 0.0  # wall-clock spent validating (reported by train.py)
        self._validation_started = 0.0
        self._compiled = False
        # which parameters are matrices, decided now: FSDP later turns them into flat 1-D shards
        self._matrix_params = {name for name, p in self.model.named_parameters() if p.dim() >= 2}
        # Muon's share: the matrices of hidden layers, not the embeddings nor the output head
        embeddings = {id(m.weight) for m in self.model.modules() if isinstance(m, torch.nn.Embedding)}
        head = getattr(self.model, "lm_head", None)
        self._hidden_matrices = {
            name for name, p in self.model.named_parameters()
            if p.dim() == 2 and id(p) not in embeddings and (head is None or p is not head.weight)
        }

    # -- setup ------------------------------------------------------------------------------------
    def configure_model(self) -> None:
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
        seed = int(np.random.SeedSequence([self.seed, self.global_rank, self.micro_step]).generate_state(1)[0])
        torch.default_generator.manual_seed(seed)  # ~100x cheaper than torch.manual_seed
        if self.device.type == "cuda":
            torch.cuda.default_generators[self.device.index or 0].manual_seed(seed)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite training loss ({loss.item()}) at step {self.global_step}; stopping. The last "
                f"good checkpoint is intact; lower optim.lr, raise warmup or use trainer.precision=32-true"
            )
        self.micro_step += 1
        self.tokens_seen += batch[0].numel() * self.trainer.world_size
        # Only on the steps the logger writes: each self.log call costs ~0.5 ms of Python (Lightning
        # moves its result record to the value's device every time), 2% of a small CPU model's step.
        step = self.global_step + 1
        if step % max(1, self.trainer.log_every_n_steps) == 0 or step == self.trainer.max_steps:
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
            self.log("train/tokens", float(self.tokens_seen), on_step=True, on_epoch=False)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Stopping through `should_stop` at max_steps makes Lightning validate (and so checkpoint)
        # at the final step too, whether or not max_steps is a multiple of val_check_interval.
        if 0 < self.trainer.max_steps <= self.global_step:
            self.trainer.should_stop = True

    def on_validation_epoch_start(self) -> None:
        self._validation_started = time.perf_counter()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.val_loss.update(self.loss(batch), weight=batch[0].size(0))

    def on_validation_epoch_end(self) -> None:
        value = self.val_loss.compute()  # averaged over all windows and all ranks
        self.val_loss.reset()
        self.validation_seconds += time.perf_counter() - self._validation_started
        if self.trainer.sanity_checking:
            return
        self.best_val_loss = min(self.best_val_loss, float(value))
        self.log("val/loss", value, prog_bar=True, sync_dist=False)
        self.log("val/ppl", torch.exp(value))
        self.log("hp/best_val_loss", self.best_val_loss)

    # -- optimizer --------------------------------------------------------------------------------
    def configure_optimizers(self):
        cfg = self.optim
        named = [(_plain_name(n), p) for n, p in self.model.named_parameters() if p.requires_grad]
        # weight decay on matrices (Linear weights, embeddings) only, not on biases and LayerNorms
        muon = cfg.name == "muon"
        hidden = self._hidden_matrices if muon else set()
        groups = [
            {"params": [p for n, p in named if n in self._matrix_params and n not in hidden],
             "weight_decay": cfg.weight_decay, "name": "decay"},
            {"params": [p for n, p in named if n not in self._matrix_params], "weight_decay": 0.0,
             "name": "no_decay"},
        ]
        if muon:
            # last, so that group 0 keeps optim.lr whichever the optimizer
            groups.append({"params": [p for n, p in named if n in hidden], "weight_decay": cfg.weight_decay,
                           "name": "muon", "muon": True, "lr": cfg.muon_lr or cfg.lr})
            try:
                optimizer = Muon(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, momentum=cfg.momentum,
                                 ns_steps=cfg.ns_steps)
            except ValueError as e:  # e.g. FSDP's flat shards instead of matrices
                raise ConfigError(f"optim=muon: {e}; use DDP (trainer=ddp) or optim=adamw") from e
        else:
            fused = cfg.fused if cfg.fused is not None else self._fused_by_default()
            optimizer = torch.optim.AdamW(
                groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **({"fused": True} if fused else {"foreach": True})
            )
        decay_steps = cfg.decay_steps or self.trainer.max_steps
        if decay_steps is None or decay_steps < 0:
            raise ConfigError("set trainer.max_steps (or optim.decay_steps): the LR schedule is step-based")
        ratio = cfg.min_lr / cfg.lr
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, cfg.warmup_steps, decay_steps, ratio)
        )
        # stepped after every optimizer step (not every epoch, not every micro-batch)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"}}

    def _fused_by_default(self) -> bool:
        # The fused kernel makes one pass over all parameters: on the CPU its step is 3x (0.8M params)
        # to 5x (10.8M) faster than foreach. Lightning refuses gradient clipping with a fused optimizer
        # under mixed precision (it would unscale gradients itself), so there foreach it is.
        try:
            trainer = self.trainer
        except RuntimeError:  # configure_optimizers called outside a Trainer
            trainer = None
        if trainer is not None and "mixed" in str(trainer.precision) and trainer.gradient_clip_val:
            return False
        return self.device.type in ("cpu", "cuda")

    # -- checkpoint -------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from gptlab.tracking import run_ids

        checkpoint["gptlab"] = {
            "tokens_seen": self.tokens_seen,
            "micro_step": self.micro_step,
            "best_val_loss": self.best_val_loss,
            # the W&B/MLflow runs a resume continues; ids of trackers this session does not use are kept
            "trackers": {**getattr(self, "tracker_ids", {}), **run_ids(self.loggers)},
        }
        # Flush the event files first, so that what a checkpoint claims was logged is on disk.
        for logger in self.loggers:
            logger.save()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("gptlab", {})
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.micro_step = int(state.get("micro_step", 0))
        self.best_val_loss = float(state.get("best_val_loss", float("inf")))
        self.tracker_ids = dict(state.get("trackers") or {})
        # accept checkpoints of compiled models saved by other tools (`model._orig_mod.x`)
        checkpoint["state_dict"] = strip_compile_prefix(checkpoint["state_dict"])
