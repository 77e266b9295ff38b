"""Causal-LM cross-entropy through the frozen LM head, without (batch, seq, vocab) logits.

Only positions whose next token counts (label != -100) go through the head, `chunk` rows at a time. The
head is frozen, so the loss needs a gradient for the hidden states only, and that gradient is known as soon
as a chunk's logits are: d CE_i / d h_i = (softmax(z_i) - onehot(y_i)) W. `TokenCE` computes it in the
forward pass and keeps only it (N x d), so the (N x vocab) logits are never stored nor recomputed: one
head matmul fewer than activation checkpointing, two fewer softmax passes, and memory of one chunk of
logits. Logits are upcast to fp32 before the softmax, as HF's loss does.

The counted positions can come precomputed from the host (`counted_positions`, which `data.collate` runs on the
CPU batch): then the loss gathers them by index and reads nothing back from the device (a boolean mask would cost
a host sync for its size). The per-sequence sums place each token's CE back on the (B, T) grid (unique indices,
no accumulation) and sum each row: deterministic on CUDA, where `index_add` adds in whatever order the atomics
land and a kill-and-resume would not be bitwise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class TokenCE(torch.autograd.Function):
    """Per-token CE (N,) of hidden states h (N, d) under a frozen head weight (V, d), targets y (N,)."""

    @staticmethod
    def forward(ctx, h, weight, y, chunk: int):
        losses = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if h.requires_grad else None
        for a in range(0, h.shape[0], chunk):
            b = min(a + chunk, h.shape[0])
            logits = F.linear(h[a:b], weight).float()  # (n, V)
            target = logits.gather(1, y[a:b, None]).squeeze(1)
            top = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(top).exp_()  # unnormalised softmax, in place: no second (n, V) buffer
            total = probs.sum(dim=-1, keepdim=True)
            losses[a:b] = (top + total.log()).squeeze(1) - target  # logsumexp - target logit
            if grad_h is not None:
                probs.div_(total)[torch.arange(b - a, device=h.device), y[a:b]] -= 1.0  # softmax - onehot
                grad_h[a:b] = (probs.to(weight.dtype) @ weight).to(h.dtype)  # (n, d)
        ctx.save_for_backward(grad_h)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_losses[:, None].to(grad_h.dtype), None, None, None


def counted_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, target) of the positions whose next token counts (label != -100): index into the flattened (B * T)
    positions of the batch, in row-major order, and the token each predicts. Run it on the host (CPU labels)."""
    T = labels.shape[1]
    b, t = (labels[:, 1:] != -100).nonzero(as_tuple=True)  # position t predicts token t + 1
    return b * T + t, labels[b, t + 1]


def lm_loss_per_sample(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                       chunk: int = 512, counted: tuple[torch.Tensor, torch.Tensor] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed CE and counted tokens per sequence, (B,) each. hidden (B, T, d) predicts labels shifted by one.

    counted: `counted_positions(labels)` already on hidden's device (else computed here, one host sync)."""
    if lm_head_weight.requires_grad:
        raise ValueError("lm_loss assumes a frozen LM head (the gradient is taken w.r.t. the hidden states only)")
    B, T, d = hidden.shape
    index, target = counted_positions(labels) if counted is None else counted
    ce = TokenCE.apply(hidden.reshape(B * T, d)[index], lm_head_weight, target, chunk)  # (N,)
    sums = ce.new_zeros(B * T).index_put((index,), ce).view(B, T).sum(dim=1)  # unique indices: deterministic
    return sums, (labels[:, 1:] != -100).sum(dim=1)


def lm_loss(hidden, lm_head_weight, labels, chunk: int = 512) -> torch.Tensor:
    """Token-mean CE over every counted token of the batch."""
    sums, counts = lm_loss_per_sample(hidden, lm_head_weight, labels, chunk)
    return sums.sum() / counts.sum().clamp(min=1)
