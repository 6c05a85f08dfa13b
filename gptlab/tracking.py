"""Trackers (Lightning loggers): hyperparameters."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf


def flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The run's config as flat scalar hyperparameters for TensorBoard's HPARAMS tab."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if not str(k).startswith("_"):
                    walk(v, f"{prefix}{k}/" if prefix or k else "")
        elif isinstance(node, (int, float, str, bool)) or node is None:
            out[prefix.rstrip("/")] = "null" if node is None else node
        else:
            out[prefix.rstrip("/")] = str(node)

    container = OmegaConf.to_container(cfg, resolve=True)
    for group in ("model", "optim", "data", "trainer"):
        walk(container.get(group, {}), f"{group}/")
    out["seed"] = container.get("seed")
    return out
