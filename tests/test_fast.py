"""minroute/fast/ equals the plain forms in minroute/core/: the training forward (closed rows
without autograd, rows packed without padding) against core.router.LayerRoute.gated_hidden, and the
fused SwiGLU against core.model.MLP. (The fused CE: tests/test_loss.py; foreach AdamW:
tests/test_optim.py.)"""

import pytest
import torch
from routing import batch, routed, set_gates, set_routers

from minroute.core.model import MLP, ModelConfig
from minroute.core.update import gate_regulariser
from minroute.fast.kernels import FusedMLP, SwiGLU, fuse_swiglu
from minroute.fast.packing import Segments, train_forward


def grads_of(m, ids, mask, dense, route_mask=None, seed=0, lengths=None):
    """Values and gradients of a loss on the real positions (padding left out: a packed forward has
    none), through core's gated_hidden (dense) or fast's train_forward."""
    m.zero_grad(set_to_none=True)
    if dense:  # the spec: core's forward, every row through every block with autograd, padded
        assert lengths is None
        h, soft, hard = m.gated_hidden(ids, mask, route_mask=route_mask)
    else:
        h, soft, hard = train_forward(m, ids, mask, route_mask, lengths=lengths)
    target = torch.randn(h.shape, generator=torch.Generator().manual_seed(seed)) * mask[:, :, None]
    ((h * target).sum() + 0.5 * gate_regulariser(soft)).backward()
    # a tensor no row reached with autograd has no .grad; train.py steps it with a zero gradient, as
    # dense would
    g = {
        n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        for n, p in m.named_parameters()
        if p.requires_grad
    }
    return h.detach(), soft.detach(), hard, g


@pytest.mark.parametrize("gates", ["mixed", "open", "closed"])
def test_closed_rows_skip_backward_same_gradients(deep_dir, gates):
    """Closed rows run their block without autograd: values and every LoRA / router gradient equal
    the dense path."""
    m = routed(deep_dir)
    m.train()
    ids, mask = batch(m.config.vocab_size, B=6)
    set_gates(m, ids, mask, gates)
    h_d, s_d, hard_d, g_d = grads_of(m, ids, mask, dense=True)
    h_s, s_s, hard_s, g_s = grads_of(m, ids, mask, dense=False)
    assert torch.equal(hard_d, hard_s) and torch.equal(s_d, s_s)
    assert (h_d - h_s).abs().max().item() <= 1e-6
    assert set(g_d) == set(g_s)
    lora_b = [n for n in g_d if n.endswith("lora_B")]
    if gates == "closed":  # nothing ran with autograd: no gradient reaches any LoRA tensor
        assert all(g_s[n].abs().max() == 0 for n in lora_b) and all(
            g_d[n].abs().max() == 0 for n in lora_b
        )
    for n in g_d:
        scale = max(g_d[n].abs().max().item(), 1e-12)
        rel = (g_d[n] - g_s[n]).abs().max().item() / scale
        assert rel <= 1e-6, (
            f"{n}: skipping-backward gradient differs from dense by {rel:.3g} (relative)"
        )
    if gates == "mixed":
        assert sum(m.last.rows_run) < hard_s.numel(), "closed rows must not run with autograd"
        assert m.last.rows_run == hard_s.sum(0).tolist()


@pytest.mark.parametrize("gates", ["mixed", "open", "closed"])
@pytest.mark.parametrize("routed_on", ["sequence", "prompt"])
def test_packed_rows_equal_padded_rows(deep_dir, gates, routed_on):
    """Right-padded rows packed without their padding (lengths given, as collate gives them): the
    same hidden states at every real position (zeros at padding), the same gates, rows run, and LoRA
    / router gradients as the padded forward of core (train_forward packs, and runs closed rows
    without autograd)."""
    m = routed(deep_dir)
    m.train()
    ids, mask = batch(m.config.vocab_size, B=6)
    lengths = mask.sum(1).tolist()
    assert min(lengths) < ids.shape[1]
    route_mask = None
    if routed_on == "prompt":
        route_mask = torch.zeros_like(mask)
        for b, n in enumerate(lengths):
            route_mask[b, : max(1, n - 4 - b)] = 1
    set_gates(m, ids, mask, gates)

    ref = grads_of(m, ids, mask, dense=True, route_mask=route_mask)
    for packed_lengths in (None, lengths):
        h, soft, hard, g = grads_of(
            m, ids, mask, False, route_mask=route_mask, lengths=packed_lengths
        )
        rows_run = m.last.rows_run
        real = mask.bool()[:, :, None]
        assert (h - ref[0]).masked_fill(~real, 0).abs().max().item() <= 1e-5
        if packed_lengths is not None:
            assert h.masked_fill(real, 0).abs().max().item() == 0, (
                "padding positions of a packed forward are zeros"
            )
        assert (soft - ref[1]).abs().max().item() <= 1e-6 and torch.equal(hard, ref[2])
        assert rows_run == hard.sum(0).tolist()
        for n in ref[3]:
            scale = max(ref[3][n].abs().max().item(), 1e-12)
            rel = (ref[3][n] - g[n]).abs().max().item() / scale
            # a router's gradient is one dot product over T x d terms that cancel (summed in another
            # order when packed): fp32 rounding reaches 1e-5 of it; LoRA tensors stay within 1e-5
            tol = 1e-4 if n.startswith("routers.") else 1e-5
            assert rel <= tol, f"{n}: packed gradient differs from padded by {rel:.3g} (relative)"


def test_packed_lengths_are_checked(deep_dir):
    m = routed(deep_dir)
    ids, mask = batch(m.config.vocab_size, B=4)
    for bad in ([5, 5, 5], [5, 5, 5, ids.shape[1] + 1]):
        with pytest.raises(ValueError, match="lengths"):
            train_forward(m, ids, mask, lengths=bad)


def test_pool_all_never_packs(deep_dir):
    """The authors' forward (pool 'all') computes and pools the padding: lengths change nothing."""
    m = routed(deep_dir, pool="all")
    ids, mask = batch(m.config.vocab_size, B=4)
    set_routers(m, 3)
    with torch.no_grad():
        a = train_forward(m, ids, mask)
        b = train_forward(m, ids, mask, lengths=mask.sum(1).tolist())
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a[0].masked_fill(mask.bool()[:, :, None], 0).abs().max() > 0, (
        "pad positions are computed"
    )


def test_swiglu_backward_matches_autograd():
    g = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    u = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SwiGLU.apply, (g, u))
    x = torch.randn(3, 4)
    assert torch.equal(SwiGLU.apply(x, x.flip(0)), torch.nn.functional.silu(x) * x.flip(0))


def test_fused_mlp_equals_core_mlp(deep_dir):
    """The same values bitwise, gradients to rounding, the same parameter names; fuse_swiglu swaps
    every MLP."""
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=16, intermediate_size=40)
    plain = MLP(cfg)
    fused = FusedMLP(plain)
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in plain.named_parameters()]
    x = torch.randn(3, 5, 16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = fused(x), plain(x2)
    assert torch.equal(y, y2)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (y2 * w).sum().backward()
    assert (x.grad - x2.grad).abs().max().item() <= 1e-6
    m = routed(deep_dir)
    assert all(type(b.mlp) is MLP for b in m.base.layers)
    fuse_swiglu(m)
    assert all(type(b.mlp) is FusedMLP for b in m.base.layers)


def test_segments_refuse_a_kv_cache(deep_dir):
    m = routed(deep_dir)
    ids = torch.randint(0, m.config.vocab_size, (1, 6))
    h, cos, sin, _ = m.base.prepare(ids)
    with pytest.raises(ValueError, match="no KV cache"):
        m.base.layers[0](h, cos, sin, Segments([2, 4]), m.new_cache(8))
