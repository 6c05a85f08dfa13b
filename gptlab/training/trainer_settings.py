"""What gptlab holds Lightning's Trainer settings to beyond the types its signature declares: the ranges
below (Lightning checks some only once a run has started, after its directory exists), and
trainer.max_time read as Lightning's Timer reads it (the time budget that resume and the LR schedule follow)."""

from __future__ import annotations

from typing import Annotated, Any

from omegaconf import DictConfig, OmegaConf

from gptlab.errors import ConfigError
from gptlab.schema import Range, hints

RANGES: dict[str, Range] = {
    "max_steps": Range(-1),  # -1: no step limit (trainer.max_time alone)
    "val_check_interval": Range(0, low_open=True),
    "accumulate_grad_batches": Range(1),
    "log_every_n_steps": Range(1),
    "gradient_clip_val": Range(0.0),
    "num_nodes": Range(1),
    "num_sanity_val_steps": Range(-1),  # -1: the whole validation set
}


def trainer_hints() -> dict[str, Any]:
    """lightning.pytorch.Trainer's annotations with the ranges above."""
    from lightning.pytorch import Trainer

    found = hints(Trainer)
    return {**found, **{k: Annotated[found.get(k, Any), r] for k, r in RANGES.items()}}


def budget_seconds(max_time: Any) -> float | None:
    """trainer.max_time in seconds (None: no time budget), read as Lightning's Timer reads it."""
    from lightning.pytorch.callbacks import Timer
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    if max_time is None:
        return None
    if isinstance(max_time, DictConfig):
        max_time = OmegaConf.to_container(max_time)
    try:
        seconds = Timer(duration=max_time).time_remaining()  # a Timer not started: its whole duration
    except (MisconfigurationException, TypeError, AttributeError):
        seconds = None
    if seconds is None or seconds <= 0:
        raise ConfigError(f"trainer.max_time={max_time!r}: expected a duration > 0, DD:HH:MM:SS (00:00:10:00) "
                          f"or a mapping ({{minutes: 10}}, {{hours: 1, minutes: 30}})")
    return seconds
