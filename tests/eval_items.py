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
