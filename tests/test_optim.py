"""Hand-written AdamW and the LR schedule against torch."""
import math

import pytest
import torch

from minroute.optim import AdamW, get_lr


def test_adamw_equals_torch_over_many_steps_and_groups():
    torch.manual_seed(0)
    shapes = [(8, 5), (5,), (3, 3, 2), (1,)]
    ours_p = [torch.randn(s, requires_grad=True) for s in shapes]
    ref_p = [p.detach().clone().requires_grad_(True) for p in ours_p]
    groups = lambda ps: [{"params": ps[:2], "weight_decay": 0.01}, {"params": ps[2:3], "weight_decay": 0.1},
                         {"params": ps[3:], "weight_decay": 0.0}]
    ours = AdamW(groups(ours_p), lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    ref = torch.optim.AdamW(groups(ref_p), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, foreach=False)
    for step in range(15):
        lr = get_lr(step, 1e-2, 15, warmup=3)
        ours.set_lr(lr)
        for g in ref.param_groups:
            g["lr"] = lr
        g_list = [torch.randn(s) for s in shapes]
        for p, q, g in zip(ours_p, ref_p, g_list):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    diff = max((p - q).abs().max().item() for p, q in zip(ours_p, ref_p))
    assert diff <= 1e-6, f"AdamW vs torch.optim.AdamW after 15 steps: max diff {diff:.3g}"


def test_adamw_skips_params_without_grad():
    p = torch.ones(3, requires_grad=True)
    opt = AdamW([{"params": [p], "weight_decay": 0.5}], lr=0.1)
    opt.step()
    assert torch.equal(p, torch.ones(3)), "no gradient: no update, not even weight decay"


def test_get_lr_paper_and_author_presets():
    # paper: 3,000 updates, cosine over all of them, floor 1e-6, no warmup
    assert get_lr(0, 2e-4, 3000) == pytest.approx(2e-4)
    assert get_lr(1500, 2e-4, 3000) == pytest.approx(1e-6 + (2e-4 - 1e-6) * 0.5)
    assert get_lr(3000, 2e-4, 3000) == pytest.approx(1e-6)
    # author: CosineAnnealingLR(T_max=3000) stepped once per update, but only 750 updates run
    assert get_lr(750, 2e-4, 3000) == pytest.approx(1.7086e-4, abs=5e-9)
    assert get_lr(749, 2e-4, 3000) == pytest.approx(1.7093e-4, abs=5e-9)  # the LR of the last update
    # the same as torch's scheduler
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=2e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3000, eta_min=1e-6)
    for k in range(751):
        assert math.isclose(opt.param_groups[0]["lr"], get_lr(k, 2e-4, 3000), rel_tol=1e-9), k
        opt.step()
        sched.step()
    # warmup: linear to the peak, then cosine
    assert get_lr(0, 1.0, 100, warmup=10, min_lr=0.0) == pytest.approx(0.1)
    assert get_lr(9, 1.0, 100, warmup=10, min_lr=0.0) == pytest.approx(1.0)
    assert get_lr(10, 1.0, 100, warmup=10, min_lr=0.0) == pytest.approx(1.0)
    assert get_lr(55, 1.0, 100, warmup=10, min_lr=0.0) == pytest.approx(0.5)


def test_update_batches_sorted_same_sequences(demo_run):
    import numpy as np

    from minroute.data import TokenSplit, update_batches
    split = TokenSplit(demo_run / "demo-data", "train")
    plain = update_batches(split, 3, 4, 4, seed=1, sort_by_length=False)
    tidy = update_batches(split, 3, 4, 4, seed=1, sort_by_length=True)
    assert sorted(np.concatenate(plain).tolist()) == sorted(np.concatenate(tidy).tolist())
    pad = lambda bs: sum(split.lengths()[b].max() * len(b) - split.lengths()[b].sum() for b in bs)  # noqa: E731
    assert pad(tidy) <= pad(plain)
    assert all(np.array_equal(a, b) for a, b in zip(tidy, update_batches(split, 3, 4, 4, 1, True)))
