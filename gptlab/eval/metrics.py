"""From a task's items to its metrics, as lm-evaluation-harness defines them.

Multiple choice (`choice` tasks), per item, with ll_i the summed log-probability of choice i:
    acc       1 if argmax_i ll_i is the label (the first of equal maxima, as numpy's argmax)
    acc_norm  1 if argmax_i ll_i / len(choice_i) is the label; len counts the choice's characters
              without the delimiter (the harness's `completion_len`: its bytes for ASCII text). With
              hellaswag_style=nanogpt: ll_i / (number of tokens of choice i), build-nanogpt's rule.
Cloze (`cloze` tasks), per item, with ll the target's summed log-probability:
    acc         1 if the greedy (argmax) token at every target position is the target's token
    perplexity  exp(-mean over items of ll), the harness's `perplexity` aggregation
Each metric's value is the mean over items; its standard error is the sample standard deviation over
sqrt(items) (the harness's `mean_stderr`); for perplexity, the delta method: perplexity x the
standard error of the mean ll (the harness bootstraps it instead).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from gptlab.eval.scoring import Request, check, encode_pair, encode_split, score
from gptlab.eval.tasks import CHOICE, CLOZE, Task

Scores = list[list[tuple[float, bool, int]]]
NAMES = {CHOICE: ("acc", "acc_norm"), CLOZE: ("acc", "perplexity")}  # the metrics of each kind of task  # per item, per continuation: (ll, greedy, tokens)


def requests_for(task: Task, tokenizer) -> list[Request]:
    requests = []
    for item in task.items:
        pairs = [
            encode_split(tokenizer, item.context, task.continuation(c)) if task.style == "nanogpt"
            else encode_pair(tokenizer, item.context, task.continuation(c), tokenizer.eot_id)
            for c in item.choices
        ]
        requests.append(Request(pairs[0][0], [cont for _, cont in pairs]))
    return requests


def score_task(model, tokenizer, task: Task, batch_size: int = 16, indices: list[int] | None = None) -> Scores:
    """The scores of the task's items (those at `indices`: a rank's share under DDP)."""
    requests = requests_for(task, tokenizer)
    check(requests, model.config.block_size, task.name)
    if indices is not None:
        requests = [requests[i] for i in indices]
    return score(model, requests, batch_size)


def item_metrics(task: Task, scores: Scores) -> dict[str, list[float]]:
    """Per metric, the per-item values (cloze: `ll`, from which perplexity is aggregated)."""
    if task.kind == CHOICE:
        acc, acc_norm = [], []
        for item, item_scores in zip(task.items, scores):
            lls = np.array([s[0] for s in item_scores])
            if task.style == "nanogpt":
                lengths = np.array([float(s[2]) for s in item_scores])
            else:
                lengths = np.array([float(len(c)) for c in item.choices])
            acc.append(float(np.argmax(lls) == item.label))
            acc_norm.append(float(np.argmax(lls / lengths) == item.label))
        return {"acc": acc, "acc_norm": acc_norm}
    return {"acc": [float(s[0][1]) for s in scores], "ll": [s[0][0] for s in scores]}


def _stderr(values: list[float]) -> float | None:
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def aggregate(per_item: dict[str, list[float]]) -> dict[str, dict[str, float | None]]:
    """metric -> {value, stderr, items}."""
    out = {}
    for name, values in per_item.items():
        n = len(values)
        mean = sum(values) / n
        err = _stderr(values)
        if name == "ll":
            ppl = math.exp(-mean)
            out["perplexity"] = {"value": ppl, "stderr": None if err is None else ppl * err, "items": n}
        else:
            out[name] = {"value": mean, "stderr": err, "items": n}
    return out


def evaluate_task(model, tokenizer, task: Task, batch_size: int = 16,
                  gather: Callable[[int, Callable[[list[int]], Scores]], Scores] | None = None
                  ) -> dict[str, dict[str, float | None]]:
    """The task's metrics. `gather(n_items, score)`: every process's scores in item order, where
    `score(indices)` scores this process's share (under DDP each rank scores its share)."""
    if gather is None:
        scores = score_task(model, tokenizer, task, batch_size)
    else:
        scores = gather(len(task.items), lambda indices: score_task(model, tokenizer, task, batch_size, indices))
    return aggregate(item_metrics(task, scores))
