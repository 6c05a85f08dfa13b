"""Callbacks gptlab adds to Lightning's own (checkpointing, LR monitor, progress bar, throughput)."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from gptlab.data.tokenizers import tokenizer_from_state
from gptlab.sampling import generate


class TextSample(L.Callback):
    """Generates a text sample at each validation and writes it to TensorBoard's TEXT tab."""

    def __init__(
        self,
        prompt: str = "\n",
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = 200,
        seed: int = 1337,
    ):
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.seed = seed

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not pl_module.hparams.get("tokenizer"):
            return
        tokenizer = tokenizer_from_state(pl_module.hparams["tokenizer"])
        ids = tokenizer.encode(self.prompt) or [tokenizer.eot_id or 0]
        idx = torch.tensor([ids], dtype=torch.long, device=pl_module.device)
        # every rank generates (a sharded model needs all of them), rank 0 writes
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
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
