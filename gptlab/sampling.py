"""Autoregressive generation with a key/value cache, and the next-token rules (temperature, top-k, top-p)."""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.schema import Positive, Range, check_args

# the rules of the next-token settings, for every caller that takes them (sample.py, TextSample)
MaxNewTokens = Positive
Temperature = Annotated[float, Range(0.0)]  # 0: greedy
TopK = Annotated[int | None, Range(1)]  # None: no cut
TopP = Annotated[float | None, Range(0.0, 1.0, low_open=True, high_open=False)]  # None: no cut


def next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token id (B, 1) from the last position's logits (B, vocab)."""
    if greedy or temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens ranked above it already cover top_p (the first always stays)
        drop = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.no_grad()
def generate(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: MaxNewTokens,
    temperature: Temperature = 1.0,
    top_k: TopK = None,
    top_p: TopP = None,
    greedy: bool = False,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    eot_id: int | None = None,
) -> torch.Tensor:
    """Extend `idx` (B, T) by `max_new_tokens` tokens.

    Without a cache every step reruns the model on the last `block_size` tokens. With the cache each
    step feeds only the newest token. Past `block_size` the two policies differ by position kind:

    * RoPE (`model.sliding_cache`): the cache slides. The newest key/value overwrites the oldest and
      positions keep growing; RoPE's scores depend on distances only, so every layer attends over the
      last `block_size` tokens, as the full sequence would with a sliding-window mask
      (`model(seq, window=block_size)`). With one layer that equals recomputing the last
      `block_size` tokens; deeper, a cached key also remembers what its token saw before the window.
    * Learned positions: the window cannot slide, so the cache is rebuilt from the last
      `block_size // 2` tokens (one prefill), after which decoding is incremental again for the next
      `block_size // 2` tokens.

    Until the sequence first outgrows `block_size` all paths compute the same logits.
    """
    check_args(generate, dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p))
    was_training = model.training
    model.eval()
    block = model.config.block_size
    cache = model.new_cache(idx.size(0)) if use_cache and hasattr(model, "new_cache") else None
    slides = getattr(model, "sliding_cache", False)
    keep = max(1, block // 2)
    pos = 0  # position of the next token fed with the cache; 0: prefill
    try:
        for step in range(max_new_tokens):
            if cache is None:
                logits = model(idx[:, -block:])
            elif pos == 0 or (pos >= block and not slides):
                window = idx[:, -(block if step == 0 else keep):]
                logits = model(window, cache=cache, pos=0)  # prefill
                pos = window.size(1)
            else:
                logits = model(idx[:, -1:], cache=cache, pos=pos)
                pos += 1
            nxt = next_token(logits[:, -1, :], temperature, top_k, top_p, greedy, generator)
            idx = torch.cat((idx, nxt), dim=1)
            if eot_id is not None and bool((nxt == eot_id).all()):
                break
    finally:
        model.train(was_training)
    return idx


def start_ids(tokenizer, prompt: str | None) -> list[int]:
    """The prompt's token ids; with no prompt (or an empty one), one token every vocabulary has: the
    end-of-text token where there is one, else a newline if the corpus had one, else the first token."""
    ids = tokenizer.encode(prompt) if prompt else []
    if ids:
        return ids
    if tokenizer.eot_id is not None:
        return [tokenizer.eot_id]
    try:
        return tokenizer.encode("\n") or [0]
    except Exception:  # a character vocabulary without a newline
        return [0]
