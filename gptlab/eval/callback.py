"""Downstream tasks scored during training (`callbacks=eval`, conf/callbacks/eval.yaml).

Every `every_n_validations`-th validation, the first `limit` items of each task (the same items each
time) are scored with the model as it is, and `eval/<task>/<metric>` is logged like val/loss: to every
tracker, to the checkpoint's metrics, and for `optimized_metric=eval/hellaswag/acc_norm` (and as
`hp/eval/<task>/<metric>`, a column of TensorBoard's HPARAMS tab). Under DDP
each rank scores every world_size-th item and the scores are gathered into item order, so the numbers
are one process's. The count of validations travels in the checkpoint: a resumed run evaluates at the
validations the uninterrupted run would have, and its earlier points stay where they were logged.

Under DDP every rank takes the same decision (gptlab.eval.ranks): a rank whose share of the scoring
raised, or that could not read its task files or encode their items, makes every rank raise at that
point, so none waits at a collective for a rank that left. Outside a distributed launch a bad task
stops the run as the callback is built, before anything is written.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from gptlab.data.tokenizers import tokenizer_from_state
from gptlab.errors import ConfigError
from gptlab.eval.metrics import NAMES, evaluate_task, requests_for
from gptlab.eval.ranks import agree, launched, shard
from gptlab.eval.scoring import check
from gptlab.eval.tasks import Task, load_task


class DownstreamEval(L.Callback):
    """Scores `tasks` (built-in names or .jsonl paths, see gptlab.eval.tasks) on their first `limit` items."""

    def __init__(self, tasks: list[str], limit: int | None = 200, every_n_validations: int = 1,
                 batch_size: int = 16, hellaswag_style: str = "harness", download: bool = True,
                 data_dir: str | None = None):
        if not tasks:
            raise ConfigError("callbacks.eval.tasks is empty: name the tasks to score, e.g. [hellaswag]")
        if not isinstance(every_n_validations, int) or every_n_validations < 1:
            raise ConfigError(f"callbacks.eval.every_n_validations={every_n_validations!r}: must be >= 1")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"callbacks.eval.batch_size={batch_size!r}: must be >= 1")
        # read (and fetch) the items now: a bad task stops the run before it trains (one rank of a
        # launch says so in setup, with the others)
        self.tasks: list[Task] = []
        self.error: Exception | None = None
        try:
            self.tasks = [load_task(str(t), limit, hellaswag_style, download, data_dir) for t in tasks]
        except Exception as e:
            if not launched():
                raise
            self.error = e
        self.every = every_n_validations
        self.batch_size = batch_size
        self.validations = 0
        self.last: tuple[int, dict[str, Any]] | None = None  # (step, task -> metrics) of the last evaluation

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Encode every item once before training: a text the tokenizer cannot take, or a choice longer
        than the model's context, stops the run now (on every rank alike), not at the first evaluation."""
        from lightning.pytorch.strategies import FSDPStrategy

        if isinstance(trainer.strategy, FSDPStrategy):  # the scorer calls the model's blocks one by one
            raise ConfigError("callbacks=eval needs the whole model on each device: use DDP (trainer=ddp), not FSDP")
        error = self.error
        if error is None and pl_module.hparams.get("tokenizer"):
            tokenizer = tokenizer_from_state(pl_module.hparams["tokenizer"])
            try:
                for task in self.tasks:
                    check(requests_for(task, tokenizer), pl_module.model.config.block_size, task.name)
            except Exception as e:
                error = e
        agree(error, trainer.world_size)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validations += 1
        if self.validations % self.every or not pl_module.hparams.get("tokenizer"):
            return
        tokenizer = tokenizer_from_state(pl_module.hparams["tokenizer"])
        split = shard(trainer.global_rank, trainer.world_size)
        self.last = (trainer.global_step, {})
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            for task in self.tasks:
                metrics = evaluate_task(pl_module.model, tokenizer, task, self.batch_size, split)
                self.last[1][task.name] = metrics
                for name, m in metrics.items():
                    # the same value on every rank (gathered): no reduction; hp/ for TensorBoard's HPARAMS tab
                    for tag in (f"eval/{task.name}/{name}", f"hp/eval/{task.name}/{name}"):
                        pl_module.log(tag, float(m["value"]), sync_dist=False)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """One line before the end-of-run block: the last evaluation's numbers."""
        if trainer.is_global_zero and self.last is not None:
            step, results = self.last
            text = "; ".join(f"{task} " + ", ".join(f"{name} {m['value']:.4f}" for name, m in metrics.items())
                             for task, metrics in results.items())
            print(f"[gptlab] eval at step {step}: {text}")

    def hparam_metrics(self) -> list[str]:
        """The hp/ tags this callback logs, declared with the hyperparameters (gptlab.run.fit)."""
        return [f"hp/eval/{task.name}/{name}" for task in self.tasks for name in NAMES[task.kind]]

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = int(state_dict.get("validations", 0))
