"""Wall-clock measurement: warm-up, repeats, median and spread; CUDA timers synchronised.

Prefill = one forward over the prompt batch that fills a KV cache (the LM head on the last position
only, as generation does). Decode = greedy steps with the KV cache after such a prefill, reported
per token.
"""

from __future__ import annotations

import time

import numpy as np
import torch


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(fn, warmup: int = 1, repeats: int = 5, device="cpu") -> dict:
    """Run fn warmup + repeats times; ms statistics of the timed repeats."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(1000 * (time.perf_counter() - t0))
    t = np.asarray(times)
    return {
        "median_ms": float(np.median(t)),
        "p25_ms": float(np.percentile(t, 25)),
        "p75_ms": float(np.percentile(t, 75)),
        "min_ms": float(t.min()),
        "max_ms": float(t.max()),
        "n": len(t),
    }


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens (a left-padded row starts at 0), as `generate` counts
    them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def prefill(model, input_ids, attention_mask=None):
    """One forward over the prompt batch filling a KV cache; the LM head on the last position (as
    generation). Left-padded rows get `generate`'s positions, so each row's logits are its logits
    alone."""
    cache = model.new_cache(input_ids.shape[1] + 1)
    pos = None if attention_mask is None else positions(attention_mask)
    h = model.hidden(input_ids, attention_mask, pos, cache)
    return model.lm_head(h[:, -1]), cache


@torch.no_grad()
def decode_steps(model, input_ids, n_new: int, attention_mask=None):
    """Prefill (untimed by callers that pass it separately), then n_new greedy steps; returns the
    cache."""
    B, T = input_ids.shape
    cache = model.new_cache(T + n_new)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    pos = positions(mask)
    logits = model.lm_head(model.hidden(input_ids, mask, pos, cache)[:, -1])
    pos = pos[:, -1:]
    for _ in range(n_new):
        nxt = logits.argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        pos = pos + 1
        logits = model.lm_head(model.hidden(nxt, mask, pos, cache)[:, -1])
    return cache


def decode_ms_per_token(
    model,
    input_ids,
    n_new: int = 32,
    warmup: int = 1,
    repeats: int = 3,
    device="cpu",
    attention_mask=None,
) -> dict:
    """(time of prefill + n_new steps - time of prefill alone) / n_new, medians over repeats."""
    full = measure(
        lambda: decode_steps(model, input_ids, n_new, attention_mask), warmup, repeats, device
    )
    pre = measure(
        lambda: decode_steps(model, input_ids, 0, attention_mask), warmup, repeats, device
    )
    per = (full["median_ms"] - pre["median_ms"]) / n_new
    spread = (full["p75_ms"] - full["p25_ms"]) / n_new
    return {"ms_per_token": per, "iqr_ms_per_token": spread, "n_new": n_new, "n": full["n"]}
