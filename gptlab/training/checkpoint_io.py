"""Lightning checkpoint IO through gptlab's checkpoint module: atomic writes, weights_only reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from gptlab import checkpoint
from gptlab.files import remove_stale


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes through `gptlab.checkpoint.save` (a crash or a full disk mid-write leaves the previous
    checkpoint intact) and reads through `gptlab.checkpoint.load` (`weights_only=True`). The first
    write of a run removes temporary files that killed runs left in the checkpoint directory."""

    def __init__(self) -> None:
        super().__init__()
        self._swept: set[Path] = set()

    def save_checkpoint(self, checkpoint_dict: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        if path.parent not in self._swept:
            remove_stale(path.parent, (".*.tmp",))
            self._swept.add(path.parent)
        checkpoint.save(checkpoint_dict, path)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        return checkpoint.load(path, map_location=map_location or "cpu")
