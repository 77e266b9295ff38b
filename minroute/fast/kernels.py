"""Faster forms of three core computations, each equal to the plain one (tests/test_fast.py):

- `lm_loss_per_sample` = core.update.lm_loss_per_sample, without (batch, seq, vocab) logits. Only
  positions whose next token counts (label != -100) go through the head, `chunk` rows at a time. The
  head is frozen, so the loss needs a gradient for the hidden states only, and that gradient is
  known as soon as a chunk's logits are: d CE_i / d h_i = (softmax(z_i) - onehot(y_i)) W. `TokenCE`
  computes it in the forward and keeps only it (N x d): one head matmul fewer than activation
  checkpointing, two fewer softmax passes, and one chunk of logits in memory. Logits are upcast to
  fp32 before the softmax, as HF's loss does. The counted positions can come precomputed from the
  host (`counted_positions`, which run/data.collate runs on the CPU batch), so the loss reads
  nothing back from the device; the per-sequence sums place each token's CE back on the (B, T) grid
  (unique indices: deterministic on CUDA, where `index_add` adds in whatever order the atomics
  land).
- `FusedMLP` = core.model.MLP, keeping two of SwiGLU's three (T, intermediate) activations for the
  backward and taking silu' in torch's fused `silu_backward` (one pass instead of six).
  `fuse_swiglu(model)` swaps it in.
- `ForeachAdamW` = core.update.AdamW, each step with `torch._foreach_*` ops: eight per param group
  (seven when the decay factor is exactly 1), whatever the number of tensors, instead of eight per
  tensor (1,920 Python-issued ops for LayerRoute's 240 trainable tensors; 23 here). Each foreach op
  applies the per-tensor op's formula in the same order, so the values are bitwise the plain step's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from minroute.core.model import MLP
from minroute.core.update import AdamW


class TokenCE(torch.autograd.Function):
    """Per-token CE (N,) of hidden states h (N, d) under a frozen head weight (V, d), targets y
    (N,)."""

    @staticmethod
    def forward(ctx, h, weight, y, chunk: int):
        losses = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if h.requires_grad else None
        for a in range(0, h.shape[0], chunk):
            b = min(a + chunk, h.shape[0])
            logits = F.linear(h[a:b], weight).float()  # (n, V)
            target = logits.gather(1, y[a:b, None]).squeeze(1)
            top = logits.amax(dim=-1, keepdim=True)
            # unnormalised softmax, in place: no second (n, V) buffer
            probs = logits.sub_(top).exp_()
            total = probs.sum(dim=-1, keepdim=True)
            losses[a:b] = (top + total.log()).squeeze(1) - target  # logsumexp - target logit
            if grad_h is not None:
                # softmax - onehot
                probs.div_(total)[torch.arange(b - a, device=h.device), y[a:b]] -= 1.0
                grad_h[a:b] = (probs.to(weight.dtype) @ weight).to(h.dtype)  # (n, d)
        ctx.save_for_backward(grad_h)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_losses[:, None].to(grad_h.dtype), None, None, None


def counted_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, target) of the positions whose next token counts (label != -100): index into the
    flattened (B * T) positions of the batch, in row-major order, and the token each predicts. Run
    it on the host (CPU labels).
    """
    T = labels.shape[1]
    b, t = (labels[:, 1:] != -100).nonzero(as_tuple=True)  # position t predicts token t + 1
    return b * T + t, labels[b, t + 1]


def lm_loss_per_sample(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk: int = 512,
    counted: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Equals core.update.lm_loss_per_sample (summed CE and counted tokens per sequence, (B,) each;
    hidden (B, T, d) predicts labels shifted by one), through TokenCE: no (B, T, vocab) logits kept.

    counted: `counted_positions(labels)` already on hidden's device (else computed here, one host
    sync).
    """
    if lm_head_weight.requires_grad:
        raise ValueError(
            "lm_loss assumes a frozen LM head (the gradient is taken w.r.t. the hidden states only)"
        )
    B, T, d = hidden.shape
    index, target = counted_positions(labels) if counted is None else counted
    ce = TokenCE.apply(hidden.reshape(B * T, d)[index], lm_head_weight, target, chunk)  # (N,)
    # unique indices: deterministic
    sums = ce.new_zeros(B * T).index_put((index,), ce).view(B, T).sum(dim=1)
    return sums, (labels[:, 1:] != -100).sum(dim=1)


def lm_loss(hidden, lm_head_weight, labels, chunk: int = 512) -> torch.Tensor:
    """Token-mean CE over every counted token of the batch."""
    sums, counts = lm_loss_per_sample(hidden, lm_head_weight, labels, chunk)
    return sums.sum() / counts.sum().clamp(min=1)


# ----------------------------------------------------------------------------- SwiGLU


class SwiGLU(torch.autograd.Function):
    """silu(g) * u, bitwise as written out, keeping only g and u for the backward (autograd would
    also keep silu(g)); silu'(g) = s (1 + g (1 - s)), s = sigmoid(g), by torch's fused
    silu_backward."""

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return F.silu(g) * u

    @staticmethod
    def backward(ctx, grad):
        g, u = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad * u, g), grad * F.silu(g)


class FusedMLP(MLP):
    """core.model.MLP (the same three projections, the same names) with the fused SwiGLU."""

    def __init__(self, mlp: MLP):
        nn.Module.__init__(self)
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def forward(self, x):
        return self.down_proj(SwiGLU.apply(self.gate_proj(x), self.up_proj(x)))


def fuse_swiglu(model: nn.Module) -> nn.Module:
    """Replace every core.model.MLP of `model` by a FusedMLP sharing its weights (parameter names
    unchanged)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is MLP:
                setattr(module, name, FusedMLP(child))
    return model


# ----------------------------------------------------------------------------- AdamW


class ForeachAdamW(AdamW):
    """core.update.AdamW's step in foreach ops; no step reads anything back to the host."""

    @torch.no_grad()
    def step(self):
        self.t += 1
        b1, b2 = self.betas
        bc1, bc2 = 1 - b1**self.t, 1 - b2**self.t
        for g in self.param_groups:
            lr, wd = g["lr"], g["weight_decay"]
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            m = [self.state[p]["m"] for p in params]
            v = [self.state[p]["v"] for p in params]
            if 1 - lr * wd != 1.0:  # x * 1.0 is x: skipping it changes no bit
                torch._foreach_mul_(params, 1 - lr * wd)
            torch._foreach_lerp_(m, grads, 1 - b1)
            torch._foreach_mul_(v, b2)
            torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, math.sqrt(bc2))
            torch._foreach_add_(denom, self.eps)
            torch._foreach_addcdiv_(params, m, denom, value=-lr / bc1)
