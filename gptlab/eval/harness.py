"""lm-evaluation-harness on a gptlab model, without exporting it: an `lm_eval.api.model.LM`.

    from gptlab.eval.harness import GptlabLM
    lm = GptlabLM.from_path("outputs/train/runs/<date>/checkpoints/last.ckpt")   # or (model, tokenizer)
    lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"])

or `python -m gptlab.eval harness_tasks=[arc_easy,piqa]`. Requests are encoded as the harness's `hf`
model encodes them (gptlab.eval.scoring.encode_pair) and scored with prefix sharing: requests with the
same context (a multiple-choice item's choices) share one context pass. `loglikelihood_rolling` uses
the harness's own rolling windows; `generate_until` decodes greedily with the KV cache
(gptlab.sampling.generate) and cuts the text at the first stop sequence.
"""

from __future__ import annotations

from typing import Any

import torch

from gptlab.errors import ConfigError

INSTALL_HINT = 'lm-eval is not installed: pip install -e ".[eval]" (the eval extra), or pip install lm-eval'
MAX_GEN_TOKS = 256


def require_lm_eval():
    """The lm_eval package, or one ConfigError line saying which extra installs it."""
    try:
        import lm_eval
        import lm_eval.api.model  # noqa: F401
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return lm_eval


def _lm_base() -> type:
    return require_lm_eval().api.model.LM


class _Adapter:
    """The methods of GptlabLM (the class itself is made on first use, so that importing this module
    does not need lm-eval)."""

    def __init__(self, model, tokenizer, batch_size: int = 16, max_gen_toks: int = MAX_GEN_TOKS):
        super().__init__()
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_gen_toks = int(batch_size), int(max_gen_toks)
        self.block_size = model.config.block_size
        self.prefix_id = tokenizer.eot_id

    @classmethod
    def from_path(cls, path: str, tokenizer: str | None = None, device: str = "auto", **kwargs):
        from gptlab.loading import load_model, pick_device

        model, tok = load_model(path, tokenizer)
        return cls(model.to(pick_device(device)), tok, **kwargs)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """`lm_eval --model gptlab --model_args ckpt_path=...,batch_size=8` (after import gptlab.eval.harness)."""
        args = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv)
        extra = {k: v for k, v in (additional_config or {}).items() if k in ("batch_size", "device") and v}
        args.update({k: str(v) for k, v in extra.items()})
        kwargs = {k: int(args[k]) for k in ("batch_size", "max_gen_toks") if k in args}
        return cls.from_path(args["ckpt_path"], args.get("tokenizer"), args.get("device", "auto"), **kwargs)

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Score (context ids, continuation ids) pairs; pairs with equal contexts share one pass."""
        from gptlab.eval.scoring import Request, score

        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, _) in enumerate(pairs):
            groups.setdefault(tuple(ctx), []).append(i)
        requests = [Request(list(ctx), [pairs[i][1] for i in members]) for ctx, members in groups.items()]
        out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        with torch.inference_mode():
            for members, results in zip(groups.values(), score(self.model, requests, self.batch_size)):
                for i, (ll, greedy, _) in zip(members, results):
                    out[i] = (ll, greedy)
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        from gptlab.eval.scoring import encode_pair

        return self._score([encode_pair(self.tokenizer, ctx, cont, self.prefix_id) for ctx, cont in
                            (r.args for r in requests)])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        if self.prefix_id is None:
            raise ConfigError("rolling log-likelihoods need an end-of-text token, which this tokenizer lacks")
        windows, owner = [], []
        for n, (text,) in enumerate(r.args for r in requests):
            for window in get_rolling_token_windows(self.tokenizer.encode(text), self.prefix_id, self.block_size, 1):
                windows.append(make_disjoint_window(window))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (ll, _) in zip(owner, self._score(windows)):
            totals[n] += ll
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from gptlab.sampling import generate

        device = next(self.model.parameters()).device
        out = []
        for context, gen_kwargs in (r.args for r in requests):
            kwargs = dict(gen_kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks") or kwargs.get("max_new_tokens") or self.max_gen_toks)
            if max_new >= self.block_size:
                raise ConfigError(f"max_gen_toks={max_new} must be below the model's block_size={self.block_size}")
            ids = (self.tokenizer.encode(context) or [self.prefix_id or 0])[-(self.block_size - max_new):]
            idx = torch.tensor([ids], dtype=torch.long, device=device)
            with torch.inference_mode():
                row = generate(self.model, idx, max_new, greedy=True, eot_id=self.prefix_id)[0, len(ids):].tolist()
            if self.prefix_id is not None and self.prefix_id in row:
                row = row[:row.index(self.prefix_id)]
            text = self.tokenizer.decode(row)
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            out.append(text)
        return out


_CLASS: type | None = None


def lm_class() -> type:
    """GptlabLM: `_Adapter` on lm-eval's LM base class, registered as the harness model `gptlab`."""
    global _CLASS
    if _CLASS is None:
        from lm_eval.api.registry import MODEL_REGISTRY, register_model

        _CLASS = type("GptlabLM", (_Adapter, _lm_base()), {"__module__": __name__})
        if "gptlab" not in MODEL_REGISTRY:
            register_model("gptlab")(_CLASS)
    return _CLASS


def __getattr__(name: str) -> Any:
    if name == "GptlabLM":
        return lm_class()
    raise AttributeError(name)


def run_harness(model, tokenizer, tasks: list[str], limit: int | None, num_fewshot: int, batch_size: int,
                include: list[str] | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """Harness tasks on `model`: task -> metric -> {value, stderr, items}."""
    lm_eval = require_lm_eval()
    from lm_eval.tasks import TaskManager

    # the harness's own index of its thousands of task configs takes long to build: only when needed
    manager = TaskManager(include_path=include, include_defaults=False) if include else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=include or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"unknown harness task(s) {unknown}; `lm_eval ls tasks` lists the harness's tasks "
                          f"(harness_include=[dir] adds task configs of your own)")
    lm = lm_class()(model, tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                  task_manager=manager, log_samples=False, bootstrap_iters=1000)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for task, metrics in out["results"].items():
        items = (out.get("n-samples") or {}).get(task, {}).get("effective")
        rows = {}
        for key, value in metrics.items():
            name, _, _ = key.partition(",")
            if name.endswith("_stderr") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            err = metrics.get(key.replace(name, name + "_stderr", 1))
            rows[name] = {"value": float(value), "stderr": err if isinstance(err, (int, float)) else None,
                          "items": items}
        results[task] = rows
    return results
