"""Downstream evaluation: multiple-choice and cloze tasks scored natively (and equal to
lm-evaluation-harness on the same weights), every harness task through an adapter, and a training
callback. docs/evaluation.md has the commands and the metrics' definitions.

    tasks     built-in tasks, task file formats, reading items, downloading official files
    scoring   harness-exact encoding; batched log-likelihoods with one context pass per item
    metrics   acc, acc_norm, perplexity and their standard errors
    cli       python -m gptlab.eval (conf/eval.yaml)
    harness   the lm_eval.api.model.LM adapter (pip install -e ".[eval]")
    callback  scoring tasks during training (conf/callbacks/eval.yaml)
    ranks     its split of the items under DDP, and one decision for every rank when one fails
"""

from gptlab.eval.metrics import evaluate_task, score_task
from gptlab.eval.tasks import BUILTIN, Item, Task, load_task

__all__ = ["BUILTIN", "Item", "Task", "evaluate_task", "load_task", "score_task"]
