"""`train_forward` = core.router.LayerRoute.gated_hidden, without the work whose result cannot
matter.

Two savings, each leaving the values and gradients of the plain forward (tests/test_fast.py):

- **Closed rows without autograd.** A closed row's block output is multiplied by an exact zero in
  straight_through, so no gradient flows back through it; only the router needs Block(h) - h, as a
  constant. Closed rows therefore run their block under no_grad (no activations kept, no backward),
  open rows with autograd, and the outputs are put back in row order. Which rows are open is one
  host read per block (shapes depend on it), none when the gates are imposed (`forcing`: known on
  the host).
- **No work on padding.** Given each right-padded row's length (run/data.collate knows them on the
  host), the rows are packed end to end into one (1, N) sequence of real tokens: every block works
  on real tokens only, and attention is each row's own fused causal SDPA (`Segments`), which is
  exactly what the padding mask leaves of a padded row. The routers' per-row mean becomes one (B, N)
  averaging matrix times the states. Pool 'all' (the authors' forward, which computes and pools the
  padding) never packs.

Packed and padded agree to fp32 rounding (a matmul over other shapes sums in another order), not
bitwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minroute.core.router import RouteTrace, pool_mean, straight_through


class Segments:
    """Rows packed end to end along the sequence (padding dropped): a (1, N) call whose first
    lengths[0] tokens are row 0, the next lengths[1] row 1, and so on. Passed to a block where a
    mask goes, it makes attention causal within each row and blind across rows (core.model.Attention
    calls `attend`)."""

    def __init__(self, lengths: list[int]):
        self.lengths = list(lengths)
        ends = [sum(self.lengths[: i + 1]) for i in range(len(self.lengths))]
        self.bounds = [(e - n, e) for e, n in zip(ends, self.lengths)]  # [start, end) of each row

    def attend(self, q, k, v):
        """q (1, H, N, D), k and v (1, Hkv, N, D) -> (1, H, N, D): each row's own fused causal
        attention."""
        rows = [
            F.scaled_dot_product_attention(
                q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True, enable_gqa=True
            )
            for a, b in self.bounds
        ]
        return torch.cat(rows, dim=2)

    def take(self, x: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """The tokens (dim 1) of these rows of a packed (1, N, ...) tensor, packed, in the order
        given."""
        return torch.cat([x[:, a:b] for a, b in (self.bounds[r] for r in rows)], dim=1)

    def subset(self, rows: list[int]) -> Segments:
        return Segments([self.lengths[r] for r in rows])


class Padded:
    """train_forward's layout for (B, T, d) states, padding included."""

    pool = staticmethod(pool_mean)  # (B, T, d) -> (B, d) fp32

    @staticmethod
    def per_token(v: torch.Tensor) -> torch.Tensor:
        return v[:, None, None]  # (B,) -> (B, 1, 1)

    @staticmethod
    def unpack(h: torch.Tensor) -> torch.Tensor:
        return h

    @staticmethod
    def open_rows_with_grad(block, h, cos, sin, mask, hard, open_rows: list[bool]):
        """Block(h) for every row: the open rows (hard True) with autograd, the closed rows without.

        The row split is computed on the device (a stable sort: open rows first, each part in row
        order), so knowing how many are open on the host is all it takes; no nonzero()."""
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


class Packed:
    """train_forward's layout for right-padded rows packed end to end: (B, T) positions -> (1, N)
    real tokens."""

    def __init__(self, lengths: list[int], T: int, device):
        self.segments, self.T = Segments(lengths), T
        self.row = torch.cat(
            [torch.full((n,), b, dtype=torch.long, device=device) for b, n in enumerate(lengths)]
        )
        # (1, N)
        self.positions = torch.cat([torch.arange(n, device=device) for n in lengths])[None]

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (1, N, ...): each row's first lengths[b] positions, end to end."""
        return torch.cat([x[b, :n] for b, n in enumerate(self.segments.lengths)])[None]

    def unpack(self, h: torch.Tensor) -> torch.Tensor:
        """(1, N, d) -> (B, T, d), zeros at the padding."""
        return torch.stack(
            [F.pad(h[0, a:b], (0, 0, 0, self.T - (b - a))) for a, b in self.segments.bounds]
        )

    def averager(self, pooled: torch.Tensor | None) -> torch.Tensor:
        """(B, N) fp32: row b holds 1 / (its pooled tokens) on its pooled tokens (pooled (B, T), 1 =
        pooled; None = all its tokens), 0 elsewhere; times the (N, d) states it is the routers'
        per-row mean.
        """
        n_tok = self.row.shape[0]
        weights = (
            torch.ones(n_tok, device=self.row.device)
            if pooled is None
            else self.pack(pooled)[0].float()
        )
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
        """Block(h) for every token: the open rows' tokens with autograd, the closed rows' without;
        the split and the merge are slices the host knows (which rows are open), no device index."""
        seg = self.segments
        opened = [b for b, o in enumerate(open_rows) if o]
        closed = [b for b, o in enumerate(open_rows) if not o]

        def run(rows):
            return block(
                seg.take(h, rows), seg.take(cos, rows), seg.take(sin, rows), seg.subset(rows)
            )

        with torch.no_grad():
            out_closed = run(closed)
        out_open = run(opened)
        pieces, at = {}, {"o": 0, "c": 0}
        for rows, out, key in ((opened, out_open, "o"), (closed, out_closed, "c")):
            for b in rows:
                n = seg.lengths[b]
                pieces[b] = out[:, at[key] : at[key] + n]
                at[key] += n
        return torch.cat([pieces[b] for b in range(len(open_rows))], dim=1)


def train_forward(
    route,
    input_ids,
    attention_mask=None,
    route_mask=None,
    padded: bool | None = None,
    lengths: list[int] | None = None,
):
    """LayerRoute's training forward (core.router.LayerRoute.gated_hidden's values and gradients),
    faster.

    padded: whether attention_mask has any 0, when the host knows it (collate's `Batch.padded`),
    else None (read from the device). lengths: each row's real tokens, when the rows are
    right-padded (collate's `Batch.lengths`): the rows are then packed. With lengths, attention_mask
    must be each row's first lengths[b] positions and route_mask 0 at the padding (collate's are;
    checking would cost a device read). Returns the final-norm hidden states (B, T, d; zeros at
    padding when packed), soft gates (B, L) and hard gates (B, L).
    """
    attn = None if route.pool == "all" else attention_mask  # authors': causal attention only
    pooled = route.pooled_positions(attention_mask, route_mask)
    B, T = input_ids.shape
    if lengths is not None and (len(lengths) != B or max(lengths) > T):
        raise ValueError(f"lengths {lengths}: expected {B} row lengths of at most {T} tokens")
    packs = (
        lengths is not None and padded is not False and sum(lengths) < B * T and min(lengths) > 0
    )
    if attn is not None and packs:
        layout = Packed(lengths, T, input_ids.device)
        h, cos, sin, _ = route.base.prepare(layout.pack(input_ids), position_ids=layout.positions)
        mask, weights = layout.segments, layout.averager(pooled)
    else:
        layout = Padded()
        h, cos, sin, mask = route.base.prepare(input_ids, attn, padded=padded)
        weights = pooled
    softs, hards, rows_run = [], [], []
    for i, block in enumerate(route.base.layers):
        p = route.soft_gate(i, h, weights, pool=layout.pool)  # (B,)
        hard, open_rows = route.hard_gate(i, p)
        n_open = None if open_rows is None else sum(open_rows)
        if not torch.is_grad_enabled():
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
        h = straight_through(h, out, layout.per_token(p), layout.per_token(hard))
        softs.append(p)
        hards.append(hard)
    soft, hard = torch.stack(softs, 1), torch.stack(hards, 1)
    route.last = RouteTrace(soft.detach(), hard, rows_run)
    return layout.unpack(route.base.model.norm(h)), soft, hard
