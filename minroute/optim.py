"""Hand-written AdamW (decoupled weight decay, bias correction) and a pure learning-rate schedule.

AdamW matches torch.optim.AdamW (tests/test_optim.py): for each parameter with a gradient,
    p <- p (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
Param groups carry their own `weight_decay` and `lr_scale`; the loop sets `lr` for every group each step.

The step is written with `torch._foreach_*` ops: eight per param group (seven when the group's decay factor is
exactly 1), whatever the number of tensors, instead of eight per tensor (1,920 Python-issued ops for LayerRoute's
240 trainable tensors; 23 now). Each foreach op applies the same elementwise formula as the per-tensor op it
replaces, in the same order, so the values are those of the per-tensor loop (tests/test_optim.py). No step reads
anything back to the host.
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

