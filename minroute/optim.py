"""Hand-written AdamW (decoupled weight decay, bias correction) and a pure learning-rate schedule.

AdamW matches torch.optim.AdamW (tests/test_optim.py): for each parameter with a gradient,
    p <- p (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
Param groups carry their own `weight_decay` and `lr_scale`; the loop sets `lr` for every group each step.
"""
from __future__ import annotations

import math

import torch


def get_lr(step: int, max_lr: float, t_max: int, warmup: int = 0, min_lr: float = 1e-6) -> float:
    """LR for the optimizer update with index `step` (0-based): linear warmup over `warmup` updates, then
    cosine from max_lr to min_lr over the remaining t_max - warmup updates, min_lr after that.

    With warmup 0 this is torch's CosineAnnealingLR(T_max=t_max, eta_min=min_lr) stepped once per update.
    """
    if step < warmup:
        return max_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, t_max - warmup))
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class AdamW:
    def __init__(self, param_groups: list[dict], lr: float = 2e-4, betas=(0.9, 0.999), eps: float = 1e-8):
        self.param_groups = [{"lr": lr, "weight_decay": 0.0, **g, "params": list(g["params"])} for g in param_groups]
        self.betas, self.eps = betas, eps
        self.t = 0  # updates done
        self.state = {p: {"m": torch.zeros_like(p, memory_format=torch.preserve_format),
                          "v": torch.zeros_like(p, memory_format=torch.preserve_format)}
                      for g in self.param_groups for p in g["params"]}

    def set_lr(self, lr: float):
        for g in self.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

    @torch.no_grad()
    def step(self):
        self.t += 1
        b1, b2 = self.betas
        bc1, bc2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for g in self.param_groups:
            lr, wd = g["lr"], g["weight_decay"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                s = self.state[p]
                p.mul_(1 - lr * wd)
                s["m"].lerp_(p.grad, 1 - b1)
                s["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (s["v"].sqrt() / math.sqrt(bc2)).add_(self.eps)
                p.addcdiv_(s["m"], denom, value=-lr / bc1)

    def zero_grad(self):
        for g in self.param_groups:
            for p in g["params"]:
                p.grad = None

    def state_tensors(self, names: dict) -> dict[str, torch.Tensor]:
        """Moments keyed by parameter name (names: param -> name), for a safetensors file."""
        out = {}
        for p, s in self.state.items():
            out[f"m.{names[p]}"], out[f"v.{names[p]}"] = s["m"], s["v"]
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], names: dict, t: int):
        for p, s in self.state.items():
            for k in ("m", "v"):
                key = f"{k}.{names[p]}"
                if key not in tensors or tensors[key].shape != p.shape:
                    raise ValueError(f"optimizer state '{key}' missing or misshapen in the checkpoint")
                s[k].copy_(tensors[key])
        self.t = t

