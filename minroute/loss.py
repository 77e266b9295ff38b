"""Causal-LM cross-entropy that never materialises (batch, seq, vocab) logits.

Only positions whose next token counts (label != -100) go through the LM head, in chunks; each chunk's
logits are recomputed in the backward pass (activation checkpointing) instead of being kept, so peak
memory is one chunk of logits (chunk x vocab x 4 bytes) rather than B x T x vocab. Logits are upcast to
fp32 before the softmax, as HF's loss does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _token_ce(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(h, weight).float(), y, reduction="none")


def lm_loss_per_sample(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                       chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed CE and counted tokens per sequence, (B,) each. hidden (B, T, d) predicts labels shifted by one."""
    B = hidden.shape[0]
    h, y = hidden[:, :-1], labels[:, 1:]  # position t predicts token t + 1
    valid = y != -100  # (B, T-1)
    rows = valid.nonzero()[:, 0]  # sample of each counted token
    h, y = h[valid], y[valid]  # (N, d), (N,)
    sums = torch.zeros(B, dtype=torch.float32, device=hidden.device)
    for a in range(0, h.shape[0], chunk):
        hc, yc = h[a:a + chunk], y[a:a + chunk]
        ce = checkpoint(_token_ce, hc, lm_head_weight, yc, use_reentrant=False) if hc.requires_grad \
            else _token_ce(hc, lm_head_weight, yc)
        sums = sums.index_add(0, rows[a:a + chunk], ce)
    return sums, valid.sum(dim=1)


def lm_loss(hidden, lm_head_weight, labels, chunk: int = 1024) -> torch.Tensor:
    """Token-mean CE over every counted token of the batch."""
    sums, counts = lm_loss_per_sample(hidden, lm_head_weight, labels, chunk)
    return sums.sum() / counts.sum().clamp(min=1)
