"""LayerRoute: a per-block router with a straight-through hard gate, on a frozen Qwen2 (+ LoRA).

For block i and each sequence b, with h the hidden state entering the block (B, T, d):

    m   = mean of h over the routed positions of the sequence (see below)
    p   = sigmoid(w_i . m + b_i)                                          soft gate, fp32
    z   = 1[p > 0.5]                                                      hard gate, exactly 0 or 1
    h  <- select(z, Block(h), h) + (p - p.detach()) * (Block(h) - h).detach()

The select gives exactly Block(h) or exactly h in any dtype (in bf16, `h + z * (Block(h) - h)` would round
twice); the second term is exactly zero in the forward and carries the straight-through gradient
dL/dp = <dL/dh_out, Block(h) - h>, so the router learns from sigma'(s) times that plus the regulariser's
gradient. Gradients are those of h + g (Block(h) - h) with g = z + p - p.detach().

Routed positions (`route_mask`, (B, T), 1 = pooled): by default the real tokens (attention mask). Training
and evaluation pass the *prompt* (the context before the response) to route on what a deployment sees at
prefill; with causal attention those states do not depend on the answer, so training gates = prefill
gates. `pool="all"` is the authors' forward in full: the router pools over every position, padding
included, and full-sequence forwards get no padding mask in attention (causal only; with right padding
real tokens are unchanged and pad positions attend to everything before them, as in their code).
Generation with a KV cache keeps the padding mask and pools the prompt's real tokens (the authors generated
one unpadded row at a time, where the two agree).

Training (`gated_hidden`) still computes Block(h) for closed rows, because the router's gradient needs
Block(h) - h; but a closed row's block output is multiplied by an exact zero, so no gradient flows back
through it: closed rows run their block without autograd (no activations kept, no backward), open rows
with it (gather, block, scatter). `dense=True` runs every row with autograd (the reference path, same
gradients). The split costs one host read per block (how many rows are open: shapes depend on it), and none
when the gates are imposed (`forcing`: known on the host) or all rows run alike (`dense`, no autograd).
Given the rows' lengths (right padding; train.py passes collate's), training packs the rows end to end without
their padding, so no block computes a padded position (`_Packed`; model.Segments keeps attention within a row).
Inference (`hidden`) really skips: block i runs only on the rows whose gate is 1, not at all when every row
is closed, and the decision is taken once per sequence at prefill; in KV-cache decoding
a skipped block is never run and holds no cache for that sequence.

Router init (REFERENCE.md §3): w = 0; b = -1 (p = 0.269, closed) on the middle band
round(L/3) <= i < round(17L/24) (layers 8-16 of 24), b = +1 (p = 0.731, open) elsewhere; `init="uniform"`
opens every layer (the UniformInit ablation). `self.last` keeps the gates of the latest call:
soft (B, L), hard (B, L) and the number of rows each block ran on (with autograd, in training).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .model import CausalLM, KVCache, Segments


def middle_band(n_layers: int) -> range:
    """Layers whose router starts closed: round(L/3) <= i < round(17L/24); 8..16 for L = 24, 9..19 for 28."""
    return range(round(n_layers / 3), round(17 * n_layers / 24))


def init_routers(routers: nn.ModuleList, scheme: str = "band", bias: float = 1.0):
    """w = 0 and b = -bias on the middle band, +bias elsewhere ('band'), or +bias everywhere ('uniform')."""
    if scheme not in ("band", "uniform"):
        raise ValueError(f"router init {scheme!r}: expected 'band' or 'uniform'")
    band = middle_band(len(routers)) if scheme == "band" else range(0)
    with torch.no_grad():
        for i, r in enumerate(routers):
            r.weight.zero_()
            r.bias.fill_(-bias if i in band else bias)


def pool_mean(h: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T, d) -> (B, d) fp32 mean over the positions where key_mask is 1 (all T when key_mask is None)."""
    h = h.float()
    if key_mask is None:
        return h.mean(dim=1)
    w = key_mask.to(h.dtype)[:, :, None]  # (B, T, 1)
    return (h * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)


def straight_through(p: torch.Tensor, hard: torch.Tensor | None = None) -> torch.Tensor:
    """Hard gate (default 1[p > 0.5]) in the forward, exactly 0.0 or 1.0; gradient of p in the backward.

    The bracket (p - p.detach()) is exactly zero, so the forward value is the hard gate bit for bit.
    """
    hard = p > 0.5 if hard is None else hard
    return hard.to(p.dtype) + (p - p.detach())


@dataclass
class RouteTrace:
    soft: torch.Tensor  # (B, L) soft gates p
    hard: torch.Tensor  # (B, L) bool, True = block ran
    rows_run: list[int]  # rows each block was computed on (training: always B)


class LayerRoute(nn.Module):
    """Qwen2 (with or without LoRA) plus one Linear(d, 1) router per block; see the module docstring."""

    def __init__(self, base: CausalLM, pool: str = "mask", init: str = "band"):
        super().__init__()
        if pool not in ("mask", "all"):
            raise ValueError(f"pool {pool!r}: expected 'mask' (real tokens) or 'all' (authors': padding included)")
        self.base = base
        cfg = base.config
        device = base.model.embed_tokens.weight.device
        self.routers = nn.ModuleList(nn.Linear(cfg.hidden_size, 1, device=device, dtype=torch.float32)
                                     for _ in range(cfg.num_hidden_layers))
        init_routers(self.routers, init)
        self.pool = pool
        self.forced: torch.Tensor | None = None  # (L,) or (B, L) bool: gates imposed instead of the routers'
        self._forced_on: dict = {}  # the imposed gates per device, copied there once
        self._forced_host: list | None = None  # the imposed gates as host bools: rows open per block, no sync
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
        """Impose gates (True = run) for baselines and controls: all ones = the plain model (+LoRA)."""
        old = self.forced, self._forced_on, self._forced_host
        self.forced = None if gates is None else gates.bool()
        self._forced_on = {} if gates is None else {self.forced.device: self.forced}
        self._forced_host = None if gates is None else self.forced.cpu().tolist()  # once per forcing, not per block
        try:
            yield self
        finally:
            self.forced, self._forced_on, self._forced_host = old

    def soft_gate(self, i: int, h: torch.Tensor, key_mask: torch.Tensor | None, layout=None) -> torch.Tensor:
        """p (B,) of router i on the hidden state h (B, T, d) entering block i; fp32 even under autocast.
        With a packed layout (gated_hidden), h is (1, N, d) and key_mask its (B, N) averaging weights."""
        with torch.autocast(h.device.type, enabled=False):
            return torch.sigmoid(self.routers[i]((layout or _Padded).pool(h, key_mask))).squeeze(-1)

    def _pooled_positions(self, attention_mask, route_mask):
        """What the routers average over: route_mask if given, else real tokens ('mask') or everything ('all')."""
        if route_mask is not None:
            return route_mask
        return None if self.pool == "all" else attention_mask

    def _hard(self, i: int, p: torch.Tensor) -> tuple[torch.Tensor, list[bool] | None]:
        """Hard gates (B,) of block i on p's device, and which rows are open as host bools when the host knows it
        (imposed gates) without reading the device, else None."""
        if self.forced is None:
            return p > 0.5, None
        f = self._forced_on.get(p.device)
        if f is None:  # imposed gates elsewhere than the model: copied once per forcing, not once per block
            f = self.forced
            if p.device.type == "cuda" and f.device.type == "cpu":  # pinned: a copy the host does not wait on
                f = f.pin_memory().to(p.device, non_blocking=True)
            self._forced_on[p.device] = f = f.to(p.device)
        host = self._forced_host
        open_rows = [host[i]] * p.shape[0] if f.dim() == 1 else [row[i] for row in host]
        return (f[i].expand_as(p) if f.dim() == 1 else f[:, i]).clone(), open_rows

    def gated_hidden(self, input_ids, attention_mask=None, route_mask=None, dense: bool = False,
                     padded: bool | None = None, lengths: list[int] | None = None):
        """Training forward: h <- select(z, Block(h), h) + STE term, every block computed for every row.

        Closed rows run their block without autograd (their output only feeds the router's gradient);
        `dense=True` runs all rows with autograd instead (the reference; same values and gradients).
        padded: whether attention_mask has any 0 when the host knows it (data.collate says), else None (read
        from the device). lengths: each row's real tokens, when the rows are right-padded and the host knows it
        (data.collate's `Batch.lengths`): the rows are then packed end to end without their padding (model.Segments)
        and every block works on real tokens only; pool 'all' (the authors' forward, which computes and pools the
        padding) never packs. With lengths, attention_mask must be each row's first lengths[b] positions and
        route_mask 0 at the padding (collate's are; checking would cost a device read). Returns the final-norm
        hidden states (B, T, d; zeros at padding when packed), soft gates (B, L) and hard gates (B, L).
        """
        attn = None if self.pool == "all" else attention_mask  # authors': causal attention only
        pooled = self._pooled_positions(attention_mask, route_mask)
        B, T = input_ids.shape
        if lengths is not None and (len(lengths) != B or max(lengths) > T):
            raise ValueError(f"lengths {lengths}: expected {B} row lengths of at most {T} tokens")
        if attn is not None and lengths is not None and padded is not False and sum(lengths) < B * T \
                and min(lengths) > 0:
            layout = _Packed(lengths, T, input_ids.device)
            h, cos, sin, _ = self.base.prepare(layout.pack(input_ids), position_ids=layout.positions)
            mask, weights = layout.segments, layout.averager(pooled)
        else:
            layout = _Padded()
            h, cos, sin, mask = self.base.prepare(input_ids, attn, padded=padded)
            weights = pooled
        softs, hards, rows_run = [], [], []
        for i, block in enumerate(self.base.layers):
            p = self.soft_gate(i, h, weights, layout)  # (B,)
            hard, open_rows = self._hard(i, p)
            n_open = None if open_rows is None else sum(open_rows)
            if dense or not torch.is_grad_enabled():
                out, n_open = block(h, cos, sin, mask), B
            else:
                if n_open is None:
                    open_rows = hard.tolist()  # the block's one host read: which rows need autograd
                    n_open = sum(open_rows)
                if n_open == B:
                    out = block(h, cos, sin, mask)
                elif n_open == 0:  # every row closed: no autograd, no gather
                    with torch.no_grad():
                        out = block(h, cos, sin, mask)
                else:
                    out = layout.open_rows_with_grad(block, h, cos, sin, mask, hard, open_rows)
            rows_run.append(n_open)
            ste = (p - p.detach()).to(h.dtype)  # exactly 0 in the forward
            h = torch.where(layout.per_token(hard), out, h) + layout.per_token(ste) * (out - h).detach()
            softs.append(p)
            hards.append(hard)
        soft, hard = torch.stack(softs, 1), torch.stack(hards, 1)
        self.last = RouteTrace(soft.detach(), hard, rows_run)
        return layout.unpack(self.base.model.norm(h)), soft, hard

    @torch.no_grad()
    def hidden(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None,
               route_mask=None):
        """Inference forward with real skipping; same signature as CausalLM.hidden (so `generate` takes either).

        At prefill (no cache, or an empty one) each block's gates come from its router on the routed
        positions (`route_mask`, default: the real tokens of the call); a cache then keeps them, and later
        calls run each block only on the rows that ran it at prefill.
        """
        B, T = input_ids.shape
        attn = None if self.pool == "all" and cache is None else attention_mask
        h, cos, sin, mask = self.base.prepare(input_ids, attn, position_ids, cache)
        decoding = cache is not None and cache.length > 0
        real = None if attention_mask is None else attention_mask[:, -T:]
        # with a cache (generation) the routers pool the prompt's real tokens whatever `pool`: the authors generated
        # one unpadded row at a time, where 'all positions' are exactly those
        key_mask = (route_mask if route_mask is not None else real) if cache is not None else \
            self._pooled_positions(real, route_mask)
        softs, hards, rows_run = [], [], []
        for i, block in enumerate(self.base.layers):
            if decoding:
                rows = cache.rows[i]
                if cache.k[i] is None:  # no row ran this block at prefill: nothing to do, nothing cached
                    rows_run.append(0)
                    continue
            else:
                p = self.soft_gate(i, h, key_mask)
                hard, _ = self._hard(i, p)
                softs.append(p)
                hards.append(hard)
                rows = hard.nonzero().squeeze(1)  # (n,) rows whose gate is open
                if rows.numel() == 0:
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

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None):
        """fp32 logits (B, T, vocab) with real skipping (inference)."""
        return self.lm_head(self.hidden(input_ids, attention_mask, position_ids, cache)).float()

    def router_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"routers.{k}": v for k, v in self.routers.state_dict().items()}


class _Padded:
    """gated_hidden's layout for (B, T, d) states, padding included."""

    @staticmethod
    def pool(h: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        return pool_mean(h, key_mask)  # (B, d) fp32

    @staticmethod
    def per_token(v: torch.Tensor) -> torch.Tensor:
        return v[:, None, None]  # (B,) -> (B, 1, 1)

    @staticmethod
    def unpack(h: torch.Tensor) -> torch.Tensor:
        return h

    @staticmethod
    def open_rows_with_grad(block, h, cos, sin, mask, hard, open_rows: list[bool]):
        """Block(h) for every row: the open rows (hard True) with autograd, the closed rows without.

        The row split is computed on the device (a stable sort: open rows first, each part in row order), so knowing
        how many are open on the host is all it takes; no nonzero()."""
        n_open = sum(open_rows)
        order = torch.argsort((~hard).to(torch.uint8), stable=True)
        open_idx, closed = order[:n_open], order[n_open:]

        def run(rows):
            sub_mask = mask if mask is None or mask.shape[0] == 1 else mask[rows]
            return block(h[rows], cos[rows], sin[rows], sub_mask)
        with torch.no_grad():
            out_closed = run(closed)
        out_open = run(open_idx)
        inverse = torch.argsort(order)
        return torch.cat([out_open, out_closed])[inverse]


class _Packed:
    """gated_hidden's layout for right-padded rows packed end to end: (B, T) positions -> (1, N) real tokens.

    Every block then works on the N = sum(lengths) real tokens only; attention is causal within each row
    (model.Segments). The routers' mean over a row is one (B, N) averaging matrix times the states."""

    def __init__(self, lengths: list[int], T: int, device):
        self.segments, self.T = Segments(lengths), T
        self.row = torch.cat([torch.full((n,), b, dtype=torch.long, device=device) for b, n in enumerate(lengths)])
        self.positions = torch.cat([torch.arange(n, device=device) for n in lengths])[None]  # (1, N)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (1, N, ...): each row's first lengths[b] positions, end to end."""
        return torch.cat([x[b, :n] for b, n in enumerate(self.segments.lengths)])[None]

    def unpack(self, h: torch.Tensor) -> torch.Tensor:
        """(1, N, d) -> (B, T, d), zeros at the padding."""
        return torch.stack([F.pad(h[0, a:b], (0, 0, 0, self.T - (b - a))) for a, b in self.segments.bounds])

    def averager(self, pooled: torch.Tensor | None) -> torch.Tensor:
        """(B, N) fp32: row b holds 1 / (its pooled tokens) on its pooled tokens (pooled (B, T), 1 = pooled;
        None = all its tokens), 0 elsewhere; times the (N, d) states it is the routers' per-row mean."""
        n_tok = self.row.shape[0]
        weights = torch.ones(n_tok, device=self.row.device) if pooled is None else self.pack(pooled)[0].float()
        out = torch.zeros(len(self.segments.lengths), n_tok, device=self.row.device)
        for b, (s, e) in enumerate(self.segments.bounds):
            w = weights[s:e]
            out[b, s:e] = w / w.sum().clamp(min=1.0)
        return out

    @staticmethod
    def pool(h: torch.Tensor, averager: torch.Tensor) -> torch.Tensor:
        return averager @ h[0].float()  # (B, N) @ (N, d): each row's mean, (B, d) fp32

    def per_token(self, v: torch.Tensor) -> torch.Tensor:
        return v[self.row][None, :, None]  # (B,) -> (1, N, 1)

    def open_rows_with_grad(self, block, h, cos, sin, mask, hard, open_rows: list[bool]):
        """Block(h) for every token: the open rows' tokens with autograd, the closed rows' without; the split and
        the merge are slices the host knows (which rows are open), no device index."""
        seg = self.segments
        opened = [b for b, o in enumerate(open_rows) if o]
        closed = [b for b, o in enumerate(open_rows) if not o]

        def run(rows):
            return block(seg.take(h, rows), seg.take(cos, rows), seg.take(sin, rows), seg.subset(rows))
        with torch.no_grad():
            out_closed = run(closed)
        out_open = run(opened)
        pieces, at = {}, {"o": 0, "c": 0}
        for rows, out, key in ((opened, out_open, "o"), (closed, out_closed, "c")):
            for b in rows:
                n = seg.lengths[b]
                pieces[b] = out[:, at[key]:at[key] + n]
                at[key] += n
        return torch.cat([pieces[b] for b in range(len(open_rows))], dim=1)


def gate_regulariser(soft: torch.Tensor) -> torch.Tensor:
    """R = mean soft gate over layers and batch (target 0): the paper's and authors' regulariser."""
    return soft.mean()


def bce_gate_loss(soft: torch.Tensor, is_tool: torch.Tensor, target: str = "open") -> torch.Tensor:
    """LayerRoute-BCE ablation: BCE(p, label) on every layer, label from the step type.

    target 'open': tool = 1 (gates open on tool calls), the authors' `bce_naive`; 'skip': tool = 0
    (tool calls skip), the authors' `bce_corrected`.
    """
    if target not in ("open", "skip"):
        raise ValueError(f"bce target {target!r}: expected 'open' or 'skip'")
    label = is_tool.float() if target == "open" else 1.0 - is_tool.float()  # (B,)
    return F.binary_cross_entropy(soft.clamp(1e-6, 1 - 1e-6), label[:, None].expand_as(soft).to(soft.dtype))
