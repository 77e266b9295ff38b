"""fast/kernels.py's chunked, gradient-in-forward cross-entropy equals F.cross_entropy on full
logits and core's plain lm_loss_per_sample, value and gradient."""

import pytest
import torch
import torch.nn.functional as F

from minroute.core.update import lm_loss_per_sample as plain_per_sample
from minroute.fast.kernels import lm_loss, lm_loss_per_sample


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_matches_full_logits_cross_entropy(chunk):
    torch.manual_seed(0)
    B, T, d, V = 3, 11, 16, 50
    W = torch.randn(V, d)
    h = torch.randn(B, T, d, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    labels[0, :4] = -100
    labels[2, 6:] = -100
    loss = lm_loss(h, W, labels, chunk=chunk)
    loss.backward()
    h2 = h.detach().clone().requires_grad_(True)
    ref = F.cross_entropy(
        (h2 @ W.T)[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-6
    diff = (h.grad - h2.grad).abs().max().item()
    assert diff < 1e-6, f"grad w.r.t. hidden differs by {diff:.3g}"
    assert h.grad[:, -1].abs().max() == 0, "the last position predicts nothing"


def test_per_sample_sums_and_counts():
    torch.manual_seed(1)
    W = torch.randn(20, 8)
    h = torch.randn(2, 5, 8)
    labels = torch.randint(0, 20, (2, 5))
    labels[1, 3:] = -100
    sums, counts = lm_loss_per_sample(h, W, labels)
    assert counts.tolist() == [4, 2]
    for b in range(2):
        z = (h[b] @ W.T)[:-1]
        y = labels[b, 1:]
        ref = F.cross_entropy(z[y != -100], y[y != -100], reduction="sum")
        assert abs(sums[b].item() - ref.item()) < 1e-5


@pytest.mark.parametrize("chunk", [3, 512])
def test_equals_the_plain_per_sample_loss_of_core(chunk):
    """fast = core: per-sequence sums, counts, and the gradient reaching the hidden states."""
    torch.manual_seed(2)
    B, T, d, V = 4, 9, 12, 40
    W = torch.randn(V, d)
    labels = torch.randint(0, V, (B, T))
    labels[1, 5:] = -100
    labels[3, :2] = -100
    h = torch.randn(B, T, d, requires_grad=True)
    h2 = h.detach().clone().requires_grad_(True)
    sums, counts = lm_loss_per_sample(h, W, labels, chunk=chunk)
    ref_sums, ref_counts = plain_per_sample(h2, W, labels)
    assert torch.equal(counts, ref_counts)
    assert (sums - ref_sums).abs().max().item() <= 1e-5
    w = torch.randn(B)
    (sums * w).sum().backward()
    (ref_sums * w).sum().backward()
    assert (h.grad - h2.grad).abs().max().item() <= 1e-6


def test_refuses_a_trainable_head():
    W = torch.randn(5, 4, requires_grad=True)
    with pytest.raises(ValueError, match="frozen LM head"):
        lm_loss(torch.randn(1, 3, 4), W, torch.zeros(1, 3, dtype=torch.long))


def index_add_sums(h, W, labels):
    """The per-sequence sums as minroute computed them before (index_add of each token's CE: CUDA
    adds in atomic order, so not deterministic there)."""
    valid = labels[:, 1:] != -100
    ce = F.cross_entropy(h[:, :-1][valid] @ W.T, labels[:, 1:][valid], reduction="none")
    return torch.zeros(h.shape[0]).index_add(0, valid.nonzero()[:, 0], ce)


def test_counted_positions_from_the_host_give_the_same_loss_without_index_add(monkeypatch):
    """Precomputed counted positions (collate does it on the CPU) give bitwise the same sums and
    gradients as positions found here; the sums equal index_add's to fp32 rounding; no index_add
    (nondeterministic on CUDA).
    """
    from minroute.fast.kernels import counted_positions

    torch.manual_seed(2)
    B, T, d, V = 4, 23, 16, 40
    W = torch.randn(V, d)
    labels = torch.randint(0, V, (B, T))
    labels[0, :7] = -100
    labels[2, 15:] = -100
    labels[3] = -100  # a row with nothing counted
    h = torch.randn(B, T, d, requires_grad=True)

    def boom(*a, **k):
        raise AssertionError("index_add: nondeterministic on CUDA")

    monkeypatch.setattr(torch.Tensor, "index_add", boom)
    monkeypatch.setattr(torch.Tensor, "index_add_", boom)
    sums, counts = lm_loss_per_sample(h, W, labels, chunk=5)
    g = torch.randn(B)
    (sums * g).sum().backward()
    grad, h.grad = h.grad.clone(), None
    index, target = counted_positions(labels)
    sums2, counts2 = lm_loss_per_sample(h, W, labels, chunk=5, counted=(index, target))
    (sums2 * g).sum().backward()
    assert torch.equal(sums, sums2) and torch.equal(counts, counts2) and torch.equal(grad, h.grad)
    monkeypatch.undo()
    ref = index_add_sums(h.detach(), W, labels)
    assert torch.allclose(sums, ref, rtol=1e-6, atol=1e-6), (sums - ref).abs().max()
    assert sums[3] == 0 and counts.tolist() == [16, 22, 14, 0]
    assert torch.equal(labels.view(-1)[index + 1], target)


def test_collate_precomputes_what_the_step_needs(demo_run):
    """collate: counted positions (those of its labels), padded, real tokens and row lengths known
    on the host."""
    from minroute.fast.kernels import counted_positions
    from minroute.run.data import TokenSplit, collate

    split = TokenSplit(demo_run / "demo-data", "train")
    lens = split.lengths()
    rows = [int(i) for i in lens.argsort()[:3]] + [int(lens.argmax())]
    b = collate(split, rows, 0, route_on="prompt")
    index, target = counted_positions(b["labels"])
    assert torch.equal(b["loss_index"], index) and torch.equal(b["loss_target"], target)
    assert b.padded and b.real_tokens == int(b["attention_mask"].sum()) == int(lens[rows].sum())
    # the packing's lengths
    assert b.lengths == b["attention_mask"].sum(1).tolist() == [int(lens[r]) for r in rows]
    assert all(b["attention_mask"][i, :n].all() for i, n in enumerate(b.lengths)), (
        "right padding: a prefix each"
    )
    assert collate(split, rows, 0, side="left").lengths is None, "left padding is never packed"
    assert not (b["route_mask"].bool() & ~b["attention_mask"].bool()).any(), (
        "the routed prompt is real tokens"
    )
    same = collate(split, [rows[-1]] * 2, 0)
    assert not same.padded and same.real_tokens == 2 * int(lens[rows[-1]])
    moved = {k: v.to("cpu") for k, v in b.items()}  # what eval and passes do still works
    assert set(moved) == set(b) and b.to("cpu") is b  # CPU: nothing to copy
