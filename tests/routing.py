"""Helpers shared by the router tests (tests/test_router.py: the spec) and the fast-path tests
(tests/test_fast.py)."""

import pytest
import torch

from minroute import load_model
from minroute.core.lora import add_lora, lora_layers
from minroute.core.router import LayerRoute


def routed(d, seed=0, lora=True, pool="mask", init="band"):
    base = load_model(d)
    if lora:
        add_lora(base, dropout=0.0)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in lora_layers(base).values():
                m.lora_B.copy_(0.05 * torch.randn(m.lora_B.shape, generator=g))
    return LayerRoute(base, pool=pool, init=init).eval()


def set_routers(model, seed=0, scale=3.0):
    """Random router weights so that gates differ between rows (some open, some closed)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in model.routers:
            r.weight.copy_(scale * torch.randn(r.weight.shape, generator=g))
            r.bias.copy_(torch.randn(r.bias.shape, generator=g))


def batch(vocab, B=6, T=20, seed=0, pad=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if pad:
        for b in range(1, B, 2):
            mask[b, T - 3 * b :] = 0  # right padding of different lengths
    return ids, mask


def mixed_routers(model, ids, mask, tries=50):
    """Find router weights whose gates are mixed across the batch in several layers."""
    for seed in range(tries):
        set_routers(model, seed)
        model.gated_hidden(ids, mask)
        hard = model.last.hard
        mixed = [(0 < c < hard.shape[0]) for c in hard.sum(0).tolist()]
        # mixed layers, and one layer closed for every row
        if sum(mixed) >= 3 and (~hard).all(0).any():
            return hard
    pytest.fail("no router seed gave mixed gates")


def set_gates(m, ids, mask, gates: str):
    """Routers whose gates are mixed across rows, or all open, or all closed."""
    if gates == "mixed":
        mixed_routers(m, ids, mask)
    else:
        set_routers(m, 1, scale=0.0)
        with torch.no_grad():
            for r in m.routers:
                r.bias.fill_(2.0 if gates == "open" else -2.0)
