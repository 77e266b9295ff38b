"""The chunked, gradient-in-forward cross-entropy equals F.cross_entropy on full logits, value and gradient."""
import pytest
import torch
import torch.nn.functional as F

from minroute.loss import lm_loss, lm_loss_per_sample


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
    ref = F.cross_entropy((h2 @ W.T)[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
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


def test_refuses_a_trainable_head():
    W = torch.randn(5, 4, requires_grad=True)
    with pytest.raises(ValueError, match="frozen LM head"):
        lm_loss(torch.randn(1, 3, 4), W, torch.zeros(1, 3, dtype=torch.long))
