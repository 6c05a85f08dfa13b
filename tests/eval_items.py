"""Made-up task items for the evaluation tests (tests/test_eval.py, tests/test_ddp.py), and scoring a
checkpoint on them in one process."""

from __future__ import annotations

import json
from pathlib import Path

# made-up items in tiny Shakespeare's characters (the char model's vocabulary)
TRAIN_CHOICE = [{"context": "ROMEO: I love", "choices": ["thee, my lord.", "the king", "no man"], "label": 0},
                {"context": "JULIET: O Romeo,", "choices": ["Romeo!", "wherefore art thou?"], "label": 1},
                {"context": "First Citizen: We are", "choices": ["accounted poor citizens.", "rich"], "label": 0}]
TRAIN_CLOZE = [{"text": "What light through yonder window breaks"}, {"text": "To be or not to be, that is the question"},
               {"text": "Now is the winter of our discontent"}]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def native(ckpt: Path, tasks: list[Path]) -> dict[str, dict]:
    """Each task's metrics for a checkpoint, scored in this one process."""
    from gptlab.eval import load_task
    from gptlab.eval.metrics import evaluate_task
    from gptlab.loading import load_model

    model, tok = load_model(ckpt)
    return {p.stem: evaluate_task(model, tok, load_task(str(p)), batch_size=3) for p in tasks}


def rank_of_a_failing_eval(rank: int, world: int, store: str, task: str, out: str) -> None:
    """One rank of a gloo group (started by tests/test_ddp.py) where rank 1 alone fails, as a rank of
    `callbacks=eval` under DDP would: first its task file is missing (read as the callback is built,
    decided together in its setup), then its share of the scoring raises. Writes what this rank raised
    at each step, and the items a last, clean gather joined, to <out>/rank<r>.json."""
    from datetime import timedelta

    import torch.distributed as dist

    from gptlab.errors import DataError
    from gptlab.eval.ranks import agree, shard
    from gptlab.eval.tasks import load_task

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    seen = []

    def step(fn) -> None:
        try:
            fn()
            seen.append(None)
        except Exception as e:
            seen.append(f"{type(e).__name__}: {e}")

    built = None
    try:
        load_task(task if rank == 0 else task + ".missing")
    except DataError as e:
        built = e
    step(lambda: agree(built, world))

    def score(indices: list[int]) -> list:
        if rank == 1:
            raise DataError("a share that cannot be scored")
        return [[(float(i), True, 1)] for i in indices]

    gather = shard(rank, world)
    step(lambda: gather(5, score))
    joined = gather(5, lambda indices: [[(float(i), True, 1)] for i in indices])  # the group still works
    dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps({"seen": seen, "joined": [s[0][0] for s in joined]}))
