"""Every gate setting an evaluation reports, in one forward over the eval rows, sharing what they
share.

A *setting* is one way to run LayerRoute on a row: the routers decide (pooling the prompt, as at
prefill, or the whole row, teacher-forced), or gates are imposed (all open, a static mask, random
masks); with LoRA or without. Two settings of one row compute the same hidden states until the first
block where their gates differ, so `run_settings` keeps one state per (row, gate history): at block
i each state asks the settings that share it for their gate, runs the block once for the states
whose gate is open, and splits a state in two only where its settings disagree. Then the final norm
and the per-token CE through the LM head run once per distinct final state, on the counted positions
only (labels != -100), and give both the all-token and the assistant-only sums from the same
per-token losses.

The cost is one forward per distinct (row, gate prefix, block) instead of one per (row, setting,
block): at most the sum of the settings' own forwards (the *floor* eval.py reports), less wherever
they agree. Rows are batched in length order, so a batch pads to similar lengths; results come back
in split order. Each state's block runs on exactly the rows and positions the plain inference
forward (core.router.LayerRoute.hidden) would run it on, with the same attention mask and RoPE, so
the numbers are that forward's (tests compare every setting with a separate pass).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from minroute.core.lora import lora_disabled
from minroute.core.router import pool_mean
from minroute.fast.kernels import TokenCE
from minroute.run.data import TokenSplit, collate


@dataclass(frozen=True)
class Setting:
    """One gate setting. gates: (L,) or (N, L) bool imposed (True = run), None = the routers decide
    on the `route_on` positions ('prompt' or 'sequence'); lora False = the base model; loss False =
    gates only.
    """

    name: str
    gates: np.ndarray | None = None
    route_on: str = "prompt"
    lora: bool = True
    loss: bool = True


@dataclass
class SettingResult:
    ce_sum: np.ndarray  # (N,) summed token CE (NaN when the setting has no loss)
    n_counted: np.ndarray  # (N,)
    asst_sum: np.ndarray | None  # (N,) summed CE over assistant-output tokens
    asst_counted: np.ndarray | None
    # (N, L) router p on the setting's routed positions (what the routers think, even if imposed)
    soft: np.ndarray
    hard: np.ndarray  # (N, L) bool, True = block ran


def length_order(split: TokenSplit, batch_size: int, pad_to: int | None) -> list[np.ndarray]:
    """Batches of row indices, rows sorted by length (fixed padding: file order, nothing gained)."""
    n = len(split)
    order = np.arange(n) if pad_to else np.argsort(split.lengths(), kind="stable")
    return [order[a : a + batch_size] for a in range(0, n, batch_size)]


@torch.no_grad()
def run_settings(
    route,
    split: TokenSplit,
    pad_id: int,
    settings: list[Setting],
    batch_size: int = 8,
    device="cpu",
    autocast=contextlib.nullcontext,
    pad_to: int | None = None,
    chunk: int = 1024,
) -> dict[str, SettingResult]:
    """Evaluate every setting on every row of `split` (see the module docstring); {name:
    SettingResult}."""
    route.eval()
    N, L = len(split), route.config.num_hidden_layers
    out = {
        s.name: SettingResult(
            np.full(N, np.nan),
            np.zeros(N, np.int64),
            np.full(N, np.nan),
            np.zeros(N, np.int64),
            np.zeros((N, L), np.float32),
            np.zeros((N, L), bool),
        )
        for s in settings
    }
    for lora in (True, False):
        group = [s for s in settings if s.lora == lora]
        if not group:
            continue
        ctx = contextlib.nullcontext() if lora else lora_disabled(route.base)
        with ctx, autocast():
            for idx in length_order(split, batch_size, pad_to):
                _run_batch(route, split, idx, pad_id, group, out, pad_to, chunk, device)
    for r in out.values():
        if r.asst_sum is not None and np.isnan(r.asst_sum).all() and r.asst_counted.sum() == 0:
            r.asst_sum = r.asst_counted = None
    return out


def _gates_of(setting: Setting, rows: np.ndarray, layer: int) -> torch.Tensor | None:
    if setting.gates is None:
        return None
    g = np.asarray(setting.gates, dtype=bool)
    return torch.from_numpy(
        np.broadcast_to(g[layer], len(rows)).copy() if g.ndim == 1 else g[rows, layer].copy()
    )


def _run_batch(route, split, idx, pad_id, settings, out, pad_to, chunk, device):
    batch = {
        k: v.to(device) for k, v in collate(split, idx, pad_id, pad_to, route_on="prompt").items()
    }
    B = len(idx)
    attn = batch["attention_mask"]
    pools = {"prompt": batch["route_mask"], "sequence": None if route.pool == "all" else attn}
    h, cos, sin, mask = route.base.prepare(
        batch["input_ids"], None if route.pool == "all" else attn
    )
    state_row = torch.arange(B, device=device)  # batch row of each state
    # state of each row, per setting
    where = {s.name: torch.arange(B, device=device) for s in settings}
    for i, block in enumerate(route.base.layers):
        wanted = {}  # setting -> (B,) bool gate
        soft_cache = {}
        for s in settings:
            key = s.route_on
            # p of every state on these positions (cheap: a pool and a dot product)
            if key not in soft_cache:
                pm = pools[key]
                soft_cache[key] = route.soft_gate(i, h, None if pm is None else pm[state_row])
            p = soft_cache[key][where[s.name]]
            out[s.name].soft[idx, i] = p.float().cpu().numpy()
            forced = _gates_of(s, idx, i)
            wanted[s.name] = (p > 0.5) if forced is None else forced.to(device)
        # a state whose settings disagree splits: the closed branch gets a copy of h, the open one
        # keeps it
        n_states = h.shape[0]
        vote_open = torch.zeros(n_states, dtype=torch.bool, device=device)
        vote_closed = torch.zeros(n_states, dtype=torch.bool, device=device)
        for s in settings:
            vote_open[where[s.name][wanted[s.name]]] = True
            vote_closed[where[s.name][~wanted[s.name]]] = True
        split_states = (vote_open & vote_closed).nonzero().squeeze(1)
        if split_states.numel():
            copy_of = torch.full((n_states,), -1, dtype=torch.long, device=device)
            copy_of[split_states] = n_states + torch.arange(split_states.numel(), device=device)
            h = torch.cat([h, h[split_states]])
            state_row = torch.cat([state_row, state_row[split_states]])
            for s in settings:
                w, g = where[s.name], wanted[s.name]
                moved = (~g) & (copy_of[w] >= 0)
                where[s.name] = torch.where(moved, copy_of[w], w)
            vote_open = torch.cat(
                [vote_open, torch.zeros(split_states.numel(), dtype=torch.bool, device=device)]
            )
        run = vote_open.nonzero().squeeze(1)
        for s in settings:
            out[s.name].hard[idx, i] = wanted[s.name].cpu().numpy()
        if run.numel() == h.shape[0]:
            h = block(h, cos[state_row], sin[state_row], _rows_of(mask, state_row))
        elif run.numel():
            rows = state_row[run]
            h[run] = block(h[run], cos[rows], sin[rows], _rows_of(mask, rows))
    _losses(route, h, state_row, where, batch, idx, settings, out, chunk)


def _rows_of(mask, rows):
    """The attention mask for these batch rows (None and a batch-free (1, 1, T, K) mask apply to
    all)."""
    return mask if mask is None or mask.shape[0] == 1 else mask[rows]


def _losses(route, h, state_row, where, batch, idx, settings, out, chunk):
    """Final norm and per-token CE of every distinct final state a loss-reporting setting ends in
    (once each)."""
    needed = sorted({int(j) for s in settings if s.loss for j in where[s.name].tolist()})
    if not needed:
        return
    states = torch.tensor(needed, device=h.device)
    rows = state_row[states]
    hs = route.base.model.norm(h[states])[:, :-1]  # (S, T-1, d): position t predicts token t + 1
    labels = batch["labels"][rows, 1:]
    asst = batch.get("assistant_labels")
    asst = asst[rows, 1:] if asst is not None else None
    counted = labels != -100
    either = counted if asst is None else counted | (asst != -100)
    target = torch.where(labels != -100, labels, asst if asst is not None else labels)
    # (n,) per counted position
    ce = TokenCE.apply(hs[either], route.lm_head.weight, target[either], chunk)
    tok = torch.zeros(either.shape, dtype=torch.float64, device=ce.device)  # sums in fp64
    tok[either] = ce.double()
    ce_sum, n_counted = (tok * counted).sum(1), counted.sum(1)
    a_sum = (tok * (asst != -100)).sum(1) if asst is not None else None
    a_counted = (asst != -100).sum(1) if asst is not None else None
    pos = {j: k for k, j in enumerate(needed)}
    for s in settings:
        if not s.loss:
            continue
        k = torch.tensor([pos[int(j)] for j in where[s.name].tolist()], device=h.device)
        r = out[s.name]
        r.ce_sum[idx] = ce_sum[k].double().cpu().numpy()
        r.n_counted[idx] = n_counted[k].cpu().numpy()
        if a_sum is not None:
            r.asst_sum[idx] = a_sum[k].double().cpu().numpy()
            r.asst_counted[idx] = a_counted[k].cpu().numpy()


__all__ = ["Setting", "SettingResult", "run_settings", "length_order", "pool_mean"]


@torch.no_grad()
def floor_seconds(
    route,
    split: TokenSplit,
    pad_id: int,
    settings: list[Setting],
    results: dict[str, SettingResult],
    batch_size: int = 8,
    device="cpu",
    autocast=contextlib.nullcontext,
    pad_to: int | None = None,
    chunk: int = 1024,
    every: int = 1,
) -> dict[str, float]:
    """The floor: each setting's own plain forward (LayerRoute's inference forward, which really
    skips, with the setting's final gates imposed; then the LM head on the counted tokens if the
    setting reports a loss), timed over every `every`-th length-ordered batch and scaled to all rows
    by their real tokens. {name: seconds}.
    """
    import time

    from minroute.evaluation.timing import _sync
    from minroute.fast.kernels import lm_loss_per_sample

    route.eval()
    batches = length_order(split, batch_size, pad_to)[::every]
    lengths = split.lengths()
    scale = float(lengths.sum()) / max(1, sum(int(lengths[b].sum()) for b in batches))
    out = {}
    for s in settings:
        hard = torch.from_numpy(results[s.name].hard)
        ctx = contextlib.nullcontext() if s.lora else lora_disabled(route.base)
        _sync(device)
        t0 = time.perf_counter()
        with ctx, autocast():
            for idx in batches:
                b = {
                    k: v.to(device)
                    for k, v in collate(split, idx, pad_id, pad_to, route_on=s.route_on).items()
                }
                with route.forcing(hard[torch.as_tensor(idx)]):
                    h = route.hidden(
                        b["input_ids"], b["attention_mask"], route_mask=b.get("route_mask")
                    )
                if s.loss:
                    lm_loss_per_sample(h, route.lm_head.weight, b["labels"], chunk)
        _sync(device)
        out[s.name] = (time.perf_counter() - t0) * scale
    return out
