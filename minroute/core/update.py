"""One optimizer update of LayerRoute: the objective CE + lambda R, its parameter groups, get_lr and
AdamW.

    loss = CE + lambda * R,    R = mean soft gate over layers and sequences (target 0)

CE is the causal-LM cross-entropy through the frozen head (`lm_loss_per_sample`, logits in fp32,
labels shifted inside, -100 not counted). How an update averages it is a setting
(`micro_batch_loss`): 'update' (minroute's default) divides the summed CE of every micro-batch by
the update's counted tokens, so the update's CE is one token mean however its sequences are cut into
micro-batches and processes; 'micro' (the authors' code) averages each micro-batch's own token mean.
The BCE ablation replaces R by BCE(p, step-type label) on every layer.

AdamW is decoupled weight decay with bias correction, torch.optim.AdamW's formula
(tests/test_optim.py):

    p <- p (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

and `get_lr` is a pure function of the update index: linear warmup, cosine to a floor.
fast/kernels.py's ForeachAdamW takes the same step with one op per group instead of one per tensor
(bitwise equal, tested).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def lm_loss_per_sample(hidden, lm_head_weight, labels):
    """Summed CE and counted tokens per sequence, (B,) each; hidden (B, T, d) predicts labels
    shifted by one.

    The plain form: (B, T, vocab) fp32 logits. fast/kernels.py's lm_loss_per_sample computes the
    same per-token losses through the frozen head without keeping the logits (tested equal)."""
    # (B, T-1, V): position t predicts token t + 1
    logits = F.linear(hidden[:, :-1], lm_head_weight).float()
    targets = labels[:, 1:]  # (B, T-1)
    # (B, T-1)
    ce = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    return ce.sum(dim=1), (targets != -100).sum(dim=1)


def gate_regulariser(soft: torch.Tensor) -> torch.Tensor:
    """R = mean soft gate over layers and batch (target 0): the paper's and the authors'
    regulariser."""
    return soft.mean()


def bce_gate_loss(soft: torch.Tensor, is_tool: torch.Tensor, target: str = "open") -> torch.Tensor:
    """LayerRoute-BCE ablation: BCE(p, label) on every layer, the label from the step type.

    target 'open': tool = 1 (gates open on tool calls; the paper's text, the authors' `bce_naive`);
    'skip': tool = 0 (tool calls skip; the authors' `bce_corrected`).
    """
    if target not in ("open", "skip"):
        raise ValueError(f"bce target {target!r}: expected 'open' or 'skip'")
    label = is_tool.float() if target == "open" else 1.0 - is_tool.float()  # (B,)
    return F.binary_cross_entropy(
        soft.clamp(1e-6, 1 - 1e-6), label[:, None].expand_as(soft).to(soft.dtype)
    )


def micro_batch_loss(
    ce_sums,
    counts,
    soft,
    is_tool,
    *,
    lam: float,
    ce_mean: str,
    accum: int,
    n_tokens: int,
    n_seqs: int,
    bce_target: str | None = None,
):
    """One micro-batch's share of its update's loss, so that the sum over the update's micro-batches
    (and processes) is the update's loss. Returns (loss, ce, reg), each scaled alike.

    ce_sums, counts: lm_loss_per_sample's; soft: the (B, L) soft gates. ce_mean 'update': CE summed
    here / the update's counted tokens (n_tokens), R weighted by this micro-batch's share of the
    update's n_seqs sequences; 'micro' (the authors'): (this micro-batch's token-mean CE + lambda R)
    / accum. bce_target: the BCE ablation.
    """
    reg = gate_regulariser(soft) if bce_target is None else bce_gate_loss(soft, is_tool, bce_target)
    if ce_mean == "update":
        ce, reg = ce_sums.sum() / n_tokens, reg * (soft.shape[0] / n_seqs)
    else:
        ce, reg = ce_sums.sum() / counts.sum().clamp(min=1) / accum, reg / accum
    return ce + lam * reg, ce, reg


def param_groups(route, weight_decay: float, decay_biases: bool) -> list[dict]:
    """What trains: LoRA A/B, router weights, router biases (weight decay on the biases only when
    decay_biases, as the authors' code does: it decays every tensor). Everything else is frozen, and
    so are routers set not to train (requires_grad False: the LoRA-only baseline)."""
    lora = [p for n, p in route.named_parameters() if n.endswith((".lora_A", ".lora_B"))]
    groups = [
        {"params": lora, "weight_decay": weight_decay, "name": "lora"},
        {
            "params": [r.weight for r in route.routers],
            "weight_decay": weight_decay,
            "name": "router_weight",
        },
        {
            "params": [r.bias for r in route.routers],
            "weight_decay": weight_decay if decay_biases else 0.0,
            "name": "router_bias",
        },
    ]
    return [
        {**g, "params": [p for p in g["params"] if p.requires_grad]}
        for g in groups
        if any(p.requires_grad for p in g["params"])
    ]


def get_lr(step: int, max_lr: float, t_max: int, warmup: int = 0, min_lr: float = 1e-6) -> float:
    """LR for the optimizer update with index `step` (0-based): linear warmup over `warmup` updates,
    then cosine from max_lr to min_lr over the remaining t_max - warmup updates, min_lr after that.

    With warmup 0 this is torch's CosineAnnealingLR(T_max=t_max, eta_min=min_lr) stepped once per
    update.
    """
    if step < warmup:
        return max_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, t_max - warmup))
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class AdamW:
    """AdamW over param groups; each carries its `weight_decay`."""

    def __init__(
        self, param_groups: list[dict], lr: float = 2e-4, betas=(0.9, 0.999), eps: float = 1e-8
    ):
        self.param_groups = [
            {"lr": lr, "weight_decay": 0.0, **g, "params": list(g["params"])} for g in param_groups
        ]
        self.betas, self.eps = betas, eps
        self.t = 0  # updates done
        self.state = {
            p: {
                "m": torch.zeros_like(p, memory_format=torch.preserve_format),
                "v": torch.zeros_like(p, memory_format=torch.preserve_format),
            }
            for g in self.param_groups
            for p in g["params"]
        }

    def set_lr(self, lr: float):
        for g in self.param_groups:
            g["lr"] = lr

    @torch.no_grad()
    def step(self):
        self.t += 1
        b1, b2 = self.betas
        bc1, bc2 = 1 - b1**self.t, 1 - b2**self.t
        for g in self.param_groups:
            lr, wd = g["lr"], g["weight_decay"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                m, v = self.state[p]["m"], self.state[p]["v"]
                p.mul_(1 - lr * wd)  # decoupled weight decay
                m.lerp_(p.grad, 1 - b1)  # m <- b1 m + (1 - b1) g
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = v.sqrt().div_(math.sqrt(bc2)).add_(self.eps)
                p.addcdiv_(m, denom, value=-lr / bc1)

    def zero_grad(self):
        for g in self.param_groups:
            for p in g["params"]:
                p.grad = None
