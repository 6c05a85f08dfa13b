"""Callbacks gptlab adds to Lightning's own (checkpointing, LR monitor, progress bar, throughput)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.loggers import TensorBoardLogger

from gptlab.compat import set_logging_step, set_peak_flops
from gptlab.data.tokenizers import tokenizer_from_state
from gptlab.sampling import MaxNewTokens, Temperature, TopK, generate, start_ids
from gptlab.schema import Positive, check_args
from gptlab.training.spikes import validation_ok


class StepAxis(L.Callback):
    """Keeps the loggers' step axis on the optimizer step across a resume. Lightning restores its
    logging counter one short when the checkpoint was written by a stop between validation intervals
    (max_steps, max_time), so the resumed run would log its first step over the last one's. It goes
    first among the callbacks: the LR monitor logs in the same hook."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        set_logging_step(trainer, trainer.global_step)


class TextSample(L.Callback):
    """Generates a text sample at each validation and writes it to TensorBoard's TEXT tab.

    `prompt`: the text to continue; None starts from one token of the vocabulary (see `start_ids`)."""

    def __init__(
        self,
        prompt: str | None = None,
        max_new_tokens: MaxNewTokens = 200,
        temperature: Temperature = 0.8,
        top_k: TopK = 200,
        seed: int = 1337,
    ):
        check_args(TextSample, locals())
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.seed = seed

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not pl_module.hparams.get("tokenizer"):
            return
        tokenizer = tokenizer_from_state(pl_module.hparams["tokenizer"])
        ids = start_ids(tokenizer, self.prompt)
        idx = torch.tensor([ids], dtype=torch.long, device=pl_module.device)
        # every rank generates (a sharded model needs all of them), rank 0 writes
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        # under the run's autocast, as validation: FSDP's mixed precision keeps bf16 copies of the
        # Block weights that float32 activations cannot multiply
        with trainer.precision_plugin.forward_context():
            # a diverged model (non-finite val loss or logits): the run's spike rule decides, not multinomial
            with torch.no_grad():
                if not validation_ok(trainer, pl_module, pl_module.model(idx)[:, -1], "logits of the text sample"):
                    return
            out = generate(
                pl_module.model, idx, self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                generator=generator,
            )
        if not trainer.is_global_zero:
            return
        text = tokenizer.decode(out[0].tolist())
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                # four-space indent: a Markdown code block keeps line breaks and spacing
                body = "\n".join("    " + line for line in text.splitlines())
                # the step Lightning gives this validation's metrics (one less than global_step)
                logger.experiment.add_text("samples", body, global_step=max(0, trainer.global_step - 1))


def _batch_size(batch: Any) -> int:
    return batch[0].size(0)


def _batch_tokens(batch: Any) -> int:
    return batch[0].numel()


class TokenThroughput(ThroughputMonitor):
    """Lightning's ThroughputMonitor for token batches: logs `train/device/items_per_sec` (tokens/s per
    device), `train/items_per_sec` (all devices), `train/device/flops_per_sec` and, when the peak is
    known, `train/device/mfu` (model FLOPs utilisation); the same under `validate/` for validation.

    FLOPs per token come from the model (`flops_per_token`: 6N + 12 L H Q T for forward and backward,
    a third of it for validation's forward pass), counted once before any sharding or compiling.
    Lightning knows the peak FLOP/s of common GPUs (at the training precision); elsewhere (CPUs,
    unlisted GPUs) give `available_flops`, the peak FLOP/s of one device, to get MFU.

    Args:
        available_flops: peak FLOP/s of one device; None: Lightning's table (None on CPU: no MFU).
        window_size: batches in the rolling average (rates appear once the window is full).
    """

    def __init__(self, available_flops: float | None = None, window_size: Positive = 50, **kwargs: Any):
        check_args(TokenThroughput, {"available_flops": available_flops, "window_size": window_size})
        # lengths count tokens (B x T) per batch, so `items_per_sec` reads as tokens per second
        super().__init__(batch_size_fn=_batch_size, length_fn=_batch_tokens, window_size=window_size, **kwargs)
        self.peak_flops = available_flops
        self.flops_per_token: float | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.peak_flops:
            set_peak_flops(self, float(self.peak_flops))
        model = getattr(pl_module, "model", None)
        if self.flops_per_token is None and hasattr(model, "flops_per_token"):
            # now, while the parameters are whole (FSDP shards them later)
            self.flops_per_token = float(model.flops_per_token(model.config.block_size))

    def _batch_flops(self, pl_module: L.LightningModule, batch: Any, forward_only: bool) -> None:
        """ThroughputMonitor reads the FLOPs of each batch from the module's `flops_per_batch`."""
        flops = None
        if self.flops_per_token is not None:
            flops = self.flops_per_token * _batch_tokens(batch) / (3 if forward_only else 1)
        pl_module.flops_per_batch = flops

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           *args: Any) -> None:
        self._batch_flops(pl_module, batch, forward_only=False)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, *args)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                *args: Any, **kwargs: Any) -> None:
        self._batch_flops(pl_module, batch, forward_only=True)  # a third of forward + backward
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, *args, **kwargs)
