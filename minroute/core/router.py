"""LayerRoute: one router per block of a frozen decoder (with LoRA), deciding per sequence whether
the block runs.

For block i and each sequence b, with h the hidden state entering the block (B, T, d):

    m   = mean of h over the sequence's routed positions           pool_mean: (B, d), fp32
    p   = sigmoid(w_i . m + b_i)                                   soft gate, fp32
    z   = 1[p > 0.5]                                               hard gate, exactly 0 or 1
    h  <- select(z, Block(h), h) + (p - p.detach()) * (Block(h) - h).detach()      straight_through

The select gives exactly Block(h) or exactly h in any dtype; the second term is exactly zero in the
forward and carries the straight-through gradient dL/dp = <dL/dh_out, Block(h) - h>: the gradients
are those of h + g (Block(h) - h) with g = z + p - p.detach(), the paper's STE. The router learns
from sigmoid'(s) times that, plus the regulariser's gradient (update.py). Because the router's
gradient needs Block(h) - h, training computes every block for every row (`gated_hidden`); inference
(`hidden`) really skips.

Routed positions (`route_mask`, (B, T), 1 = pooled): by default the real tokens. Training and
evaluation pass the *prompt* (the context before the response), what a deployment has at prefill;
with causal attention those states do not depend on the answer, so training gates equal prefill
gates. `pool="all"` is the authors' forward in full: the routers pool every position, padding
included, and full-sequence forwards get no padding mask (causal only).

Router init (`init_routers`): w = 0; b = -1 (p = 0.269, closed) on the middle band round(L/3) <= i <
round(17L/24) (layers 8-16 of 24) and b = +1 (p = 0.731, open) elsewhere, so every row starts by
skipping the band; `uniform` opens every layer (the UniformInit ablation). docs/reference.md §3 says
where the rule comes from.

Inference (`hidden`): block i runs only on the rows whose gate is 1, not at all when every row is
closed; the decision is taken once per sequence at prefill. With a KV cache, a skipped block stores
nothing for that sequence and is never run while decoding: the cache keeps each block's rows, and
decoding runs exactly those.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .model import CausalLM, KVCache


def middle_band(n_layers: int) -> range:
    """Layers whose router starts closed: round(L/3) <= i < round(17L/24); 8..16 for L = 24, 9..19
    for 28."""
    return range(round(n_layers / 3), round(17 * n_layers / 24))


def init_routers(routers: nn.ModuleList, scheme: str = "band", bias: float = 1.0):
    """w = 0 and b = -bias on the middle band, +bias elsewhere ('band'), or +bias everywhere
    ('uniform')."""
    if scheme not in ("band", "uniform"):
        raise ValueError(f"router init {scheme!r}: expected 'band' or 'uniform'")
    band = middle_band(len(routers)) if scheme == "band" else range(0)
    with torch.no_grad():
        for i, r in enumerate(routers):
            r.weight.zero_()
            r.bias.fill_(-bias if i in band else bias)


def pool_mean(h: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T, d) -> (B, d) fp32 mean over the positions where key_mask is 1 (all T when key_mask is
    None)."""
    h = h.float()
    if key_mask is None:
        return h.mean(dim=1)
    w = key_mask.to(h.dtype)[:, :, None]  # (B, T, 1)
    return (h * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)


def straight_through(h, out, p, z):
    """The gated block output: exactly `out` = Block(h) where z, exactly h where not, in any dtype;
    its gradient w.r.t. p is <dL/dh_out, out - h> (the straight-through estimator) and no gradient
    reaches `out` where z is 0.

    p (soft gate, fp32) and z (hard gate, bool) are shaped to broadcast against h: (B, 1, 1) for (B,
    T, d).
    """
    return torch.where(z, out, h) + (p - p.detach()).to(h.dtype) * (out - h).detach()


def skip_percent(hard: torch.Tensor, is_tool: torch.Tensor) -> tuple[float, float]:
    """skip% of the tool-call rows and of the planning rows, from hard gates (N, L) (True = block
    ran).

    A row's skip% is 100 x its closed blocks / L; a step type's skip% is the mean over its rows (NaN
    for none); the differential is tool minus planning. This is the definition: the training log and
    validation call it, and eval.py's tables compute the same numbers from numpy arrays (tested
    equal, tests/test_eval.py).
    """
    row = 100.0 * (1.0 - hard.double().mean(1))  # (N,)
    tool = torch.as_tensor(is_tool, device=row.device).bool()
    pct = [float(row[sel].mean()) if sel.any() else float("nan") for sel in (tool, ~tool)]
    return pct[0], pct[1]


@dataclass
class RouteTrace:
    soft: torch.Tensor  # (B, L) soft gates p
    hard: torch.Tensor  # (B, L) bool, True = block ran
    rows_run: list[int]  # rows each block was computed on (training: with autograd)


class LayerRoute(nn.Module):
    """A decoder (with or without LoRA) plus one Linear(d, 1) router per block; see the module
    docstring.

    `gated_hidden` is the training forward (every block computed, straight-through gates), `hidden`
    / `forward` the inference forward (closed blocks skipped, with or without a KV cache).
    `forcing(gates)` imposes gates instead of the routers' (baselines, controls, timing).
    `self.last` keeps the latest call's gates.
    """

    def __init__(self, base: CausalLM, pool: str = "mask", init: str = "band"):
        super().__init__()
        if pool not in ("mask", "all"):
            raise ValueError(
                f"pool {pool!r}: expected 'mask' (real tokens) or 'all' (authors': padding"
                " included)"
            )
        self.base = base
        cfg = base.config
        device = base.model.embed_tokens.weight.device
        self.routers = nn.ModuleList(
            nn.Linear(cfg.hidden_size, 1, device=device, dtype=torch.float32)
            for _ in range(cfg.num_hidden_layers)
        )
        init_routers(self.routers, init)
        self.pool = pool
        # (L,) or (B, L) bool: gates imposed instead of the routers'
        self.forced: torch.Tensor | None = None
        # the same as host bools: which rows a block runs, without a device read
        self.forced_host: list | None = None
        self.last: RouteTrace | None = None

    @property
    def config(self):
        return self.base.config

    @property
    def lm_head(self):
        return self.base.lm_head

    def new_cache(self, max_len: int) -> KVCache:
        return self.base.new_cache(max_len)

    @contextlib.contextmanager
    def forcing(self, gates: torch.Tensor | None):
        """Impose gates (True = run), (L,) for every row or (B, L); all ones = the plain model (+
        LoRA)."""
        old = self.forced, self.forced_host
        device = self.routers[0].weight.device
        # copied once, not once per block
        self.forced = None if gates is None else gates.bool().to(device)
        self.forced_host = None if gates is None else self.forced.cpu().tolist()
        try:
            yield self
        finally:
            self.forced, self.forced_host = old

    def soft_gate(self, i: int, h: torch.Tensor, key_mask, pool=pool_mean) -> torch.Tensor:
        """p (B,) of router i on the hidden state h entering block i; fp32 even under autocast.
        `pool` turns h and key_mask into the (B, d) means (fast/packing.py passes its packed
        layout's)."""
        with torch.autocast(h.device.type, enabled=False):
            return torch.sigmoid(self.routers[i](pool(h, key_mask))).squeeze(-1)

    def hard_gate(self, i: int, p: torch.Tensor) -> tuple[torch.Tensor, list[bool] | None]:
        """z (B,) bool of block i: 1[p > 0.5], or the imposed gate; and, for imposed gates, which
        rows are open as host bools (known without reading the device), else None."""
        if self.forced is None:
            return p > 0.5, None
        return self.imposed_gate(i, p.shape[0])

    def imposed_gate(self, i: int, B: int) -> tuple[torch.Tensor, list[bool]]:
        """The gate `forcing` imposes on block i for B rows, on the device and as host bools."""
        f, host = self.forced, self.forced_host
        if f.dim() == 1:
            return f[i].expand(B).clone(), [host[i]] * B
        return f[:, i].clone(), [row[i] for row in host]

    def pooled_positions(self, attention_mask, route_mask):
        """What the routers average over: route_mask if given, else real tokens ('mask') or
        everything ('all')."""
        if route_mask is not None:
            return route_mask
        return None if self.pool == "all" else attention_mask

    def gated_hidden(self, input_ids, attention_mask=None, route_mask=None):
        """The training forward, as the paper writes it: every block computed for every row, with
        autograd, and h <- straight_through(h, Block(h), p, z). Returns the final-norm hidden states
        (B, T, d), soft gates (B, L) and hard gates (B, L). train.py runs fast/packing.py's
        train_forward, which equals this (tested) and skips the work whose result is multiplied by
        an exact zero."""
        attn = None if self.pool == "all" else attention_mask  # authors': causal attention only
        pooled = self.pooled_positions(attention_mask, route_mask)
        h, cos, sin, mask = self.base.prepare(input_ids, attn)
        softs, hards = [], []
        for i, block in enumerate(self.base.layers):
            p = self.soft_gate(i, h, pooled)  # (B,)
            z, _ = self.hard_gate(i, p)
            out = block(h, cos, sin, mask)  # every row: the router's gradient needs Block(h) - h
            h = straight_through(h, out, p[:, None, None], z[:, None, None])
            softs.append(p)
            hards.append(z)
        soft, hard = torch.stack(softs, 1), torch.stack(hards, 1)
        self.last = RouteTrace(soft.detach(), hard, [input_ids.shape[0]] * len(softs))
        return self.base.model.norm(h), soft, hard

    @torch.no_grad()
    def hidden(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        cache: KVCache | None = None,
        route_mask=None,
    ):
        """Inference forward with real skipping; CausalLM.hidden's signature (so `generate` takes
        either).

        At prefill (no cache, or an empty one) each block's gates come from its router on the routed
        positions (`route_mask`, default: the real tokens of the call); a cache then keeps them, and
        later calls run each block only on the rows that ran it at prefill.
        """
        B, T = input_ids.shape
        attn = None if self.pool == "all" and cache is None else attention_mask
        h, cos, sin, mask = self.base.prepare(input_ids, attn, position_ids, cache)
        decoding = cache is not None and cache.length > 0
        real = None if attention_mask is None else attention_mask[:, -T:]
        # generating (a cache), the routers pool the prompt's real tokens whatever `pool`: the
        # authors generated one unpadded row at a time, where 'all positions' are exactly those
        if cache is not None:
            key_mask = route_mask if route_mask is not None else real
        else:
            key_mask = self.pooled_positions(real, route_mask)
        softs, hards, rows_run = [], [], []
        for i, block in enumerate(self.base.layers):
            if decoding:
                rows = cache.rows[i]
                # no row ran this block at prefill: nothing to do, nothing cached
                if cache.k[i] is None:
                    rows_run.append(0)
                    continue
            else:
                if self.forced is None:
                    p = self.soft_gate(i, h, key_mask)
                    z = p > 0.5
                    rows = z.nonzero().squeeze(1)  # (n,) rows whose gate is open
                else:  # imposed gates: no router to run, and the host knows which rows are open
                    p = torch.full((B,), float("nan"), device=h.device)
                    z, host = self.imposed_gate(i, B)
                    rows = torch.tensor([b for b, o in enumerate(host) if o], device=h.device)
                softs.append(p)
                hards.append(z)
                if rows.numel() == 0:  # every row closed: the block is not computed at all
                    rows_run.append(0)
                    continue
                rows = None if rows.numel() == B else rows
                if cache is not None:
                    cache.rows[i] = rows
            if rows is None:  # every row runs: no gather
                h = block(h, cos, sin, mask, cache)
                rows_run.append(B)
            else:
                sub_mask = mask if mask is None or mask.shape[0] == 1 else mask[rows]
                h[rows] = block(h[rows], cos[rows], sin[rows], sub_mask, cache)
                rows_run.append(rows.numel())
        if cache is not None:
            if not decoding:
                cache.gates = torch.stack(hards, 1)
            cache.length += T
        if decoding:
            self.last = RouteTrace(self.last.soft if self.last else None, cache.gates, rows_run)
        else:
            self.last = RouteTrace(torch.stack(softs, 1), torch.stack(hards, 1), rows_run)
        return self.base.model.norm(h)

    def forward(
        self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None
    ):
        """fp32 logits (B, T, vocab) with real skipping (inference)."""
        return self.lm_head(self.hidden(input_ids, attention_mask, position_ids, cache)).float()
