"""LoRA on a frozen linear layer, and adapters that PEFT reads and writes.

    y = x W^T + b + (alpha / r) * B A dropout(x)        A: (r, in)  B: (out, r)

computed as B ((A (m * x)) * (alpha / r) / (1 - p)) with m the dropout's 0/1 mask: the scales act on
r columns, not on the full width (equal to PEFT's order up to rounding; exactly equal without
dropout when alpha / r is a power of two, as 16 / 8 is).

Dropout (`LoRADropout`) is PEFT's in distribution: each element of x kept with probability 1 - p and
scaled by 1 / (1 - p), independently per element and per layer. The mask comes from one 31-bit
integer draw per element compared with round(p * 2^31) (p exact to 2^-32): on this project's CPU,
4-6 ms for a 2,048 x 576 input against 15 ms for nn.Dropout's `bernoulli_` (whose draws were an
eighth of a SmolLM2-shape training update).

A starts kaiming-uniform with a = sqrt(5) (= U(+-1/sqrt(in)), PEFT's and the authors' default), B
starts at zero, so a fresh adapter leaves the model unchanged. A and B are kept in fp32 whatever the
base dtype, so small updates are not rounded away in bf16. `merge()` folds the update into W for
inference and `unmerge()` restores the exact original W; both are idempotent.

Parameter names stay Hugging Face's: `...self_attn.q_proj.weight/bias` (frozen) plus
`...self_attn.q_proj.lora_A` and `.lora_B`; run/peft.py writes and reads them as a PEFT adapter.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class LoRADropout(nn.Dropout):
    """nn.Dropout(p) with a cheaper mask draw: keep = (uniform integer in [0, 2^31)) >= round(p *
    2^31)."""

    def keep(self, x: torch.Tensor) -> torch.Tensor | None:
        """The bool mask of kept elements for x in training, None when nothing is dropped (eval, p =
        0)."""
        if not self.training or self.p == 0:
            return None
        # uniform on [0, 2^31)
        draw = torch.empty(x.shape, dtype=torch.int32, device=x.device).random_()
        # capped: int32 compare (p within 2^-31 of 1)
        return draw >= min(round(self.p * 2**31), 2**31 - 1)

    def forward(self, x):
        keep = self.keep(x)
        return x if keep is None else torch.where(keep, x, 0.0) * (1.0 / (1.0 - self.p))


class LoRALinear(nn.Linear):
    """A frozen nn.Linear (same weight and bias tensors, same names) plus a trainable low-rank
    update."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.05):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # shared with the base model, frozen
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        if not 0 <= dropout < 1:
            raise ValueError(f"LoRA dropout {dropout}: expected a probability in [0, 1)")
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        device = base.weight.device
        self.lora_A = nn.Parameter(
            torch.empty(r, self.in_features, device=device, dtype=torch.float32)
        )
        self.lora_B = nn.Parameter(
            torch.zeros(self.out_features, r, device=device, dtype=torch.float32)
        )
        if device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = LoRADropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        # False: behave as the base layer (the "base model" rows of eval tables)
        self.enabled = True
        self._original_weight: torch.Tensor | None = None

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged or not self.enabled:
            return y
        a, scale = x.to(self.lora_A.dtype), self.scaling
        # Identity (p = 0), or a module someone put there
        if not isinstance(self.dropout, LoRADropout):
            a = self.dropout(a)
        # its 1 / (1 - p) joins alpha / r on the rank-r side
        elif (keep := self.dropout.keep(a)) is not None:
            a, scale = torch.where(keep, a, 0.0), scale / (1.0 - self.dropout.p)
        return y + F.linear(F.linear(a, self.lora_A) * scale, self.lora_B).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) * B A, the update to W, in fp32."""
        return (self.lora_B @ self.lora_A) * self.scaling

    @torch.no_grad()
    def merge(self):
        """W <- W + (alpha/r) BA (no-op if already merged); the original W is kept to unmerge
        exactly."""
        if not self.merged:
            self._original_weight = self.weight.detach().clone()
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Restore the exact original W (no-op if not merged)."""
        if self.merged:
            self.weight.copy_(self._original_weight)
            self._original_weight = None
            self.merged = False

    def extra_repr(self):
        return (
            f"{self.in_features}, {self.out_features}, r={self.r}, alpha={self.alpha},"
            f" merged={self.merged}"
        )


def add_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.05,
    targets: tuple[str, ...] = TARGETS,
) -> nn.Module:
    """Wrap every nn.Linear whose name ends in one of `targets`; freeze everything else. Returns
    model."""
    model.requires_grad_(False)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                setattr(module, child_name, LoRALinear(child, r, alpha, dropout))
    if not lora_layers(model):
        raise ValueError(f"add_lora: no nn.Linear named {targets} in the model")
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, by their model names (`...q_proj.lora_A`, `...q_proj.lora_B`)."""
    return {
        name: p for name, p in model.named_parameters() if name.endswith((".lora_A", ".lora_B"))
    }


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """Run the base model: every LoRA layer returns its frozen layer's output (unmerged layers
    only)."""
    layers = lora_layers(model).values()
    if any(m.merged for m in layers):
        raise RuntimeError("lora_disabled: unmerge the LoRA layers first")
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True


def merge_lora(model: nn.Module):
    for m in lora_layers(model).values():
        m.merge()


def unmerge_lora(model: nn.Module):
    for m in lora_layers(model).values():
        m.unmerge()
