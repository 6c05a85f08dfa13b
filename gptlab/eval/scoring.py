"""Log-likelihoods of continuations, batched, each context run once for all of its continuations.

Encoding follows lm-evaluation-harness's `hf` model, so that the numbers are the harness's: trailing
spaces of the context move to the continuation, the whole string and the context are encoded, and the
continuation's tokens are `whole[len(context):]`; an empty context is the end-of-text token. The
model sees at most `block_size` tokens: the last `block_size + 1` tokens of context + continuation,
without the last one, as the harness cuts them (from the left).

Prefix sharing: one item's context and all its continuations go into one packed sequence,

    context c0..cn-1 | continuation 1 minus its last token | continuation 2 ... | ...

with each continuation token at the position it would have after the context and an attention mask
that lets it see the whole context and its own continuation only. One forward pass gives every
continuation's log-probabilities, so a 4-way item costs a context plus four endings rather than four
contexts plus four endings. An item whose longest continuation would push it past `block_size` is
scored one continuation at a time, each with its own left-cut context, exactly as the harness would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from gptlab.errors import DataError
from gptlab.models.gpt import GPT


@dataclass
class Request:
    """An item's context and candidate continuations, as token ids."""

    context: list[int]
    continuations: list[list[int]]


def encode_pair(tokenizer, context: str, continuation: str, prefix_id: int | None) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as the harness's `hf` model makes them."""
    if context == "":
        cont = tokenizer.encode(continuation)
        if prefix_id is None:
            raise DataError("an item has an empty context and the tokenizer has no end-of-text token to stand in")
        return ([prefix_id], cont) if cont[:1] != [prefix_id] else (cont[:1], cont[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


def encode_split(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """build-nanogpt's encoding: context and continuation each on its own."""
    return tokenizer.encode(context), tokenizer.encode(continuation)


@dataclass
class _Group:
    """One packed sequence: a context and the continuations (index into the request's) that share it."""

    request: int
    context: list[int]
    which: list[int]
    conts: list[list[int]]

    def tokens(self) -> tuple[list[int], list[int], list[int]]:
        """(packed ids, positions, segment: 0 for the context, i + 1 for continuation i)."""
        n = len(self.context)
        ids, pos, seg = list(self.context), list(range(n)), [0] * n
        for i, cont in enumerate(self.conts):
            ids += cont[:-1]
            pos += range(n, n + len(cont) - 1)
            seg += [i + 1] * (len(cont) - 1)
        return ids, pos, seg


def check(requests: list[Request], block: int, task: str = "the task") -> None:
    """DataError for a continuation the model cannot score: no tokens, or more than block_size of them.
    (Under DDP every rank checks all items, before taking its share: all ranks stop together.)"""
    for r, req in enumerate(requests):
        for i, cont in enumerate(req.continuations):
            if not cont:
                raise DataError(f"{task}, item {r}: choice {i} encodes to no tokens")
            if len(cont) > block:
                raise DataError(f"{task}, item {r}: choice {i} has {len(cont)} tokens, more than block_size={block}")


def _groups(requests: list[Request], block: int) -> list[_Group]:
    check(requests, block)
    groups = []
    for r, req in enumerate(requests):
        longest = max(len(c) for c in req.continuations)
        if len(req.context) + longest <= block + 1:
            groups.append(_Group(r, req.context, list(range(len(req.continuations))), req.continuations))
        else:  # too long to share a context: each continuation with its own left-cut context (the harness's cut)
            for i, cont in enumerate(req.continuations):
                groups.append(_Group(r, req.context[-(block + 1 - len(cont)):], [i], [cont]))
    return groups


def packed_logits(model: GPT, idx: torch.Tensor, pos: torch.Tensor, allowed: torch.Tensor, at: torch.Tensor
                  ) -> torch.Tensor:
    """Logits at the flat indices `at` of the (B, T) batch `idx`, each token at position `pos` and
    attending where `allowed` (B, T, T) is true: GPT.forward with explicit positions and mask."""
    tr = model.transformer
    x = tr.wte(idx)
    rope = None
    if model.config.pos == "learned":
        x = x + tr.wpe(pos)
    else:  # (B, 1, T, head_dim): broadcast over the heads
        rope = (model.rope_cos[pos][:, None], model.rope_sin[pos][:, None])
    x = tr.drop(x)
    mask = allowed[:, None]
    for block in tr.h:
        x = block(x, rope, None, 0, mask, None)
    x = tr.ln_f(x).flatten(0, 1)[at]  # the head only where a continuation token is predicted
    return model.lm_head(x)


@torch.no_grad()
def score(model: nn.Module, requests: list[Request], batch_size: int = 16, block_size: int | None = None
          ) -> list[list[tuple[float, bool, int]]]:
    """For each request, for each continuation: (summed log-probability, whether every token is the
    greedy choice, number of tokens)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    block = block_size or model.config.block_size
    out: list[list[tuple[float, bool, int] | None]] = [[None] * len(r.continuations) for r in requests]
    groups = sorted(_groups(requests, block), key=lambda g: -len(g.tokens()[0]))
    packed = isinstance(model, GPT)
    try:
        for start in range(0, len(groups), batch_size):
            chunk = groups[start:start + batch_size]
            for g, results in zip(chunk, _run(model, chunk, device) if packed else _run_plain(model, chunk, device)):
                for i, result in zip(g.which, results):
                    out[g.request][i] = result
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def _targets(chunk: list[_Group], T: int) -> tuple[list[int], list[int], list[tuple[int, int, int]]]:
    """(flat indices of the predicting positions, their target ids, per continuation (group, start, length))."""
    at, targets, spans = [], [], []
    for b, g in enumerate(chunk):
        start = len(g.context)
        for cont in g.conts:
            # the last context token predicts the first continuation token, then each token the next
            where = [len(g.context) - 1] + list(range(start, start + len(cont) - 1))
            spans.append((b, len(at), len(cont)))
            at += [b * T + w for w in where]
            targets += cont
            start += len(cont) - 1
    return at, targets, spans


def _collect(logits: torch.Tensor, targets: list[int], spans, chunk: list[_Group]):
    # log_softmax at the targets only (no second vocabulary-wide tensor); argmax of the logits is greedy
    logits = logits.float()
    tgt = torch.tensor(targets, device=logits.device)
    token_lp = (logits.gather(1, tgt[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)).tolist()
    greedy = (logits.argmax(dim=-1) == tgt).tolist()
    results: list[list[tuple[float, bool, int]]] = [[] for _ in chunk]
    for b, s, n in spans:
        results[b].append((sum(token_lp[s:s + n]), all(greedy[s:s + n]), n))
    return results


def _run(model: GPT, chunk: list[_Group], device: torch.device):
    packed = [g.tokens() for g in chunk]
    T = max(len(ids) for ids, _, _ in packed)
    idx = torch.zeros(len(chunk), T, dtype=torch.long)
    pos = torch.zeros(len(chunk), T, dtype=torch.long)
    seg = torch.full((len(chunk), T), -1, dtype=torch.long)  # -1: padding
    for b, (ids, p, s) in enumerate(packed):
        idx[b, :len(ids)], pos[b, :len(ids)], seg[b, :len(ids)] = torch.tensor(ids), torch.tensor(p), torch.tensor(s)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    same = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])  # [b, query, key]
    allowed = (causal & same & (seg[:, :, None] >= 0)) | torch.eye(T, dtype=torch.bool)  # padding sees itself
    at, targets, spans = _targets(chunk, T)
    logits = packed_logits(model, idx.to(device), pos.to(device), allowed.to(device), torch.tensor(at, device=device))
    return _collect(logits, targets, spans, chunk)


def _run_plain(model: nn.Module, chunk: list[_Group], device: torch.device):
    """Models other than GPT: each continuation as its own sequence (right-padded; causal models
    ignore what follows)."""
    flat = [_Group(g.request, g.context, [i], [c]) for g in chunk for i, c in zip(g.which, g.conts)]
    T = max(len(g.context) + len(g.conts[0]) - 1 for g in flat)
    idx = torch.zeros(len(flat), T, dtype=torch.long)
    for b, g in enumerate(flat):
        ids = g.tokens()[0]
        idx[b, :len(ids)] = torch.tensor(ids)
    at, targets, spans = _targets(flat, T)
    logits = model(idx.to(device)).flatten(0, 1)[torch.tensor(at, device=device)]
    per_seq = _collect(logits, targets, spans, flat)
    results, k = [], 0
    for g in chunk:
        results.append([per_seq[k + j][0] for j in range(len(g.conts))])
        k += len(g.conts)
    return results
