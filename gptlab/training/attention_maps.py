"""Attention pictures: every head of every layer for a fixed prompt, one image in TensorBoard's IMAGES tab.

The picture comes from a separate pass of the model with an explicit softmax (`model(idx, attention=[])`),
so training keeps scaled_dot_product_attention, which never materialises the probabilities.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from gptlab.data.tokenizers import tokenizer_from_state
from gptlab.errors import ConfigError, GptlabError
from gptlab.models.gpt import GPT
from gptlab.sampling import start_ids
from gptlab.schema import Positive, check_args
from gptlab.training.spikes import validation_ok

# viridis at 0, 1/4, 1/2, 3/4 and 1 (perceptually uniform, readable in grey); linear in between
VIRIDIS = torch.tensor(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=torch.float32
) / 255
GAP = 0.5  # grey between the maps


def colormap(values: torch.Tensor) -> torch.Tensor:
    """RGB (3, *shape) in [0, 1] of values in [0, 1] (clamped), through VIRIDIS."""
    x = values.float().clamp(0, 1) * (len(VIRIDIS) - 1)
    lo = x.floor().long().clamp(max=len(VIRIDIS) - 2)
    frac = (x - lo)[..., None]
    rgb = VIRIDIS[lo] * (1 - frac) + VIRIDIS[lo + 1] * frac
    return rgb.movedim(-1, 0)


def attention_grid(probs: torch.Tensor, scale: int = 1, gap: int = 2) -> torch.Tensor:
    """One RGB image (3, H, W) of attention maps `probs` (layers, heads, T, T): a row per layer, a
    column per head; in each map row i is query token i and column j key token j; colour is the
    probability on a fixed 0..1 scale, so pictures compare across steps and runs."""
    n_layer, n_head, T, _ = probs.shape
    cell = T * scale
    image = torch.full((3, n_layer * (cell + gap) - gap, n_head * (cell + gap) - gap), GAP)
    maps = probs.detach().float().cpu().repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    for layer in range(n_layer):
        for head in range(n_head):
            y, x = layer * (cell + gap), head * (cell + gap)
            image[:, y : y + cell, x : x + cell] = colormap(maps[layer, head])
    return image


@torch.no_grad()
def attention_probs(model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """Attention probabilities (layers, heads, T, T) of the first sequence of `idx` (B, T), in eval mode."""
    was_training = model.training
    model.eval()
    try:
        probs: list[torch.Tensor] = []
        model(idx, attention=probs)
    finally:
        model.train(was_training)
    return torch.stack([p[0] for p in probs])


class AttentionMaps(L.Callback):
    """At every `every_n_validations`-th validation, the attention maps of `prompt` (its last
    `max_tokens` tokens, at most block_size) as one image, tag `tag`, in TensorBoard's IMAGES tab.

    Every rank runs the pass (a sharded model needs all of them), rank 0 writes. Without a TensorBoard
    logger, or for a model without attention (the bigram), it does nothing.
    """

    def __init__(
        self,
        prompt: str | None = None,
        max_tokens: Positive = 32,
        every_n_validations: Positive = 1,
        cell_pixels: Positive = 96,
        tag: str = "attention",
    ):
        check_args(AttentionMaps, locals())  # (gptlab/config.py checks a run's config against the same)
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.every_n_validations = every_n_validations
        self.cell_pixels = cell_pixels
        self.tag = tag
        self.validations = 0  # counted in the checkpoint, so a resumed run keeps the rhythm

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validations += 1
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        model = getattr(pl_module, "model", None)
        if (not loggers or (self.validations - 1) % self.every_n_validations
                or not pl_module.hparams.get("tokenizer") or not isinstance(model, GPT)):
            return
        ids = self._ids(trainer, pl_module)[-min(self.max_tokens, model.config.block_size):]
        with trainer.precision_plugin.forward_context():  # as validation runs (FSDP keeps bf16 weight copies)
            probs = attention_probs(model, torch.tensor([ids], dtype=torch.long, device=pl_module.device))
        # a diverged model: the run's spike rule decides (gptlab.training.spikes), the picture is not drawn
        if not validation_ok(trainer, pl_module, probs, "attention probabilities") or not trainer.is_global_zero:
            return
        image = attention_grid(probs, scale=max(1, self.cell_pixels // len(ids)))
        for logger in loggers:
            # the step Lightning gives this validation's metrics (one less than global_step)
            logger.experiment.add_image(self.tag, image, global_step=max(0, trainer.global_step - 1),
                                        dataformats="CHW")

    def _ids(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[int]:
        """The prompt's tokens; with no prompt, the start of the validation split (in every vocabulary)."""
        if self.prompt is None:
            val = getattr(trainer.datamodule, "val_tokens", None) if trainer.datamodule is not None else None
            if val is not None and len(val):
                return [int(t) for t in val[: self.max_tokens]]
        tokenizer = tokenizer_from_state(pl_module.hparams["tokenizer"])
        return start_ids(tokenizer, self.prompt)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.prompt is not None and pl_module.hparams.get("tokenizer"):  # fail now, not at the first validation
            try:
                tokenizer_from_state(pl_module.hparams["tokenizer"]).encode(self.prompt)
            except GptlabError as e:
                raise ConfigError(f"callbacks.attention_maps.prompt: {e}") from None

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = int(state_dict.get("validations", 0))
