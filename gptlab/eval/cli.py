"""`python -m gptlab.eval`: load a model, score its tasks, print a table and write eval.json (conf/eval.yaml)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from gptlab.config import validate_dataclass
from gptlab.errors import ConfigError
from gptlab.files import write_json

RESULTS_FILE = "eval.json"


@dataclass
class EvalConfig:
    """conf/eval.yaml's keys and their types (checked before anything is loaded)."""

    ckpt_path: str | None = None
    tokenizer: str | None = None
    tasks: list = field(default_factory=list)
    harness_tasks: list = field(default_factory=list)
    harness_include: list = field(default_factory=list)
    num_fewshot: int = 0
    limit: int | None = None
    hellaswag_style: str = "harness"
    batch_size: int = 16
    device: str = "auto"
    dtype: str = "float32"
    download: bool = True


def check(args: EvalConfig) -> None:
    from gptlab.eval.tasks import STYLES
    from gptlab.loading import DTYPES

    if args.ckpt_path is None:
        raise ConfigError("no model: pass ckpt_path=<run>/checkpoints/last.ckpt (or a Hugging Face model directory)")
    if args.limit is not None and args.limit <= 0:
        raise ConfigError(f"limit={args.limit}: must be a positive number of items, or null for all")
    if args.batch_size < 1:
        raise ConfigError(f"batch_size={args.batch_size}: must be >= 1")
    if args.num_fewshot < 0:
        raise ConfigError(f"num_fewshot={args.num_fewshot}: must be >= 0")
    if args.dtype not in DTYPES:
        raise ConfigError(f"dtype={args.dtype!r}: choose one of {sorted(DTYPES)}")
    if args.hellaswag_style not in STYLES:
        raise ConfigError(f"hellaswag_style={args.hellaswag_style!r}: choose one of {', '.join(STYLES)}")
    if not args.tasks and not args.harness_tasks:
        raise ConfigError("nothing to evaluate: give tasks=[hellaswag,...] and/or harness_tasks=[arc_easy,...]")


def table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """The results as an aligned text table: task, metric, value, stderr, items."""
    rows = [("task", "metric", "value", "stderr", "items")]
    for task, metrics in results.items():
        for name, m in metrics.items():
            err = m.get("stderr")
            err_text = "" if err is None or (isinstance(err, float) and math.isnan(err)) else f"{err:.4f}"
            rows.append((task, name, f"{m['value']:.4f}", err_text, str(m.get("items", ""))))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def evaluate(cfg: DictConfig, out_dir: str | Path | None) -> dict[str, Any]:
    own = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "paths"])  # paths.output_dir needs Hydra's runtime
    args = validate_dataclass(OmegaConf.to_container(own, resolve=True), EvalConfig)
    check(args)
    from gptlab.eval.metrics import evaluate_task
    from gptlab.eval.tasks import load_task
    from gptlab.loading import DTYPES, load_model, pick_device

    harness = None
    if args.harness_tasks:
        from gptlab.eval.harness import require_lm_eval

        harness = require_lm_eval()  # before the model loads: a missing extra is found at once
    tasks = [load_task(str(t), args.limit, args.hellaswag_style, args.download, OmegaConf.select(cfg, "paths.data_dir"))
             for t in args.tasks]
    device = pick_device(args.device)
    model, tokenizer = load_model(args.ckpt_path, args.tokenizer)
    model.to(device=device, dtype=DTYPES[args.dtype]).eval()
    started = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    for task in tasks:
        results[task.name] = evaluate_task(model, tokenizer, task, args.batch_size)
    if harness is not None:
        from gptlab.eval.harness import run_harness

        results.update(run_harness(model, tokenizer, [str(t) for t in args.harness_tasks], args.limit,
                                   args.num_fewshot, args.batch_size, [str(p) for p in args.harness_include]))
    seconds = time.perf_counter() - started
    print(table(results))
    record = {"ckpt_path": str(args.ckpt_path), "limit": args.limit, "hellaswag_style": args.hellaswag_style,
              "seconds": round(seconds, 3), "results": results}
    if out_dir is not None:
        write_json(Path(out_dir) / RESULTS_FILE, record)
        print(f"[gptlab] wrote {Path(out_dir) / RESULTS_FILE}")
    return record


def main(cfg: DictConfig) -> dict[str, Any] | None:
    from hydra.core.hydra_config import HydraConfig

    from gptlab.run.job import Outcome, run

    out_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None

    def job():
        record = evaluate(cfg, out_dir)
        if out_dir is None:
            return record
        # the first task's first metric stands for the job (its DONE marker; a sweeper's value)
        task, metrics = next(iter(record["results"].items()))
        name, first = next(iter(metrics.items()))
        return Outcome(f"{task}/{name}", first["value"], 0, Path(out_dir), seconds=record["seconds"])

    with torch.inference_mode():
        return run(job, run_dir=out_dir)
