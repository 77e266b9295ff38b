"""Hand-written AdamW (core: per tensor; fast: foreach ops) and the LR schedule against torch."""

import math

import pytest
import torch

from minroute.core.update import AdamW, get_lr
from minroute.fast.kernels import ForeachAdamW


@pytest.mark.parametrize("impl", [AdamW, ForeachAdamW])
def test_adamw_equals_torch_over_many_steps_and_groups(impl):
    torch.manual_seed(0)
    shapes = [(8, 5), (5,), (3, 3, 2), (1,)]
    ours_p = [torch.randn(s, requires_grad=True) for s in shapes]
    ref_p = [p.detach().clone().requires_grad_(True) for p in ours_p]
    groups = lambda ps: [
        {"params": ps[:2], "weight_decay": 0.01},
        {"params": ps[2:3], "weight_decay": 0.1},
        {"params": ps[3:], "weight_decay": 0.0},
    ]
    ours = impl(groups(ours_p), lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
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


def test_foreach_adamw_equals_the_per_tensor_step():
    """fast's ForeachAdamW is core's per-tensor AdamW bitwise over 20 steps, a tensor without a
    gradient left alone, groups without weight decay included."""
    torch.manual_seed(3)
    shapes = [(16, 8), (8,), (4, 4, 3), (1,), (5, 7), (2,)]
    ours_p = [torch.randn(s, requires_grad=True) for s in shapes]
    ref_p = [p.detach().clone().requires_grad_(True) for p in ours_p]
    groups = lambda ps: [
        {"params": ps[:3], "weight_decay": 0.01},
        {"params": ps[3:5], "weight_decay": 0.0},
        {"params": ps[5:], "weight_decay": 0.1},
    ]
    ours = ForeachAdamW(groups(ours_p), lr=1e-2)
    ref = AdamW(groups(ref_p), lr=1e-2)
    for step in range(20):
        lr = get_lr(step, 1e-2, 20, warmup=2)
        ours.set_lr(lr)
        ref.set_lr(lr)
        for i, (p, q) in enumerate(zip(ours_p, ref_p)):
            # sometimes no gradient
            grad = None if (i == 4 and step % 3 == 0) else torch.randn(p.shape)
            p.grad, q.grad = (None, None) if grad is None else (grad.clone(), grad.clone())
        ours.step()
        ref.step()
    assert all(torch.equal(p, q) for p, q in zip(ours_p, ref_p)), (
        "foreach AdamW vs the per-tensor step: params"
    )
    assert all(
        torch.equal(ours.state[p][k], ref.state[q][k])
        for p, q in zip(ours_p, ref_p)
        for k in ("m", "v")
    )


class OpCounter(torch.overrides.TorchFunctionMode):
    """Counts the torch functions and tensor methods Python issues (each one an op dispatch, a
    kernel on a GPU)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") not in (
            "__get__",
            "__set__",
            "_set_grad_enabled",
        ):  # attributes, no_grad
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_adamw_step_issues_a_few_ops_per_group_not_per_tensor():
    """LayerRoute has 240 trainable tensors in 3 groups: the step must cost O(groups) Python-issued
    ops."""
    torch.manual_seed(0)
    params = [torch.randn(8, 4, requires_grad=True) for _ in range(60)]
    opt = ForeachAdamW(
        [
            {"params": params[:40], "weight_decay": 0.01},
            {"params": params[40:50], "weight_decay": 0.01},
            {"params": params[50:], "weight_decay": 0.0},
        ],
        lr=1e-3,
    )
    for p in params:
        p.grad = torch.randn_like(p)
    with OpCounter() as c:
        opt.step()
    print(f"AdamW step over {len(params)} tensors in 3 groups: {c.n} ops")
    assert c.n <= 8 * 3, (
        f"AdamW issued {c.n} ops for 60 tensors in 3 groups (8 per tensor would be {8 * 60})"
    )


@pytest.mark.parametrize("impl", [AdamW, ForeachAdamW])
def test_adamw_skips_params_without_grad(impl):
    p = torch.ones(3, requires_grad=True)
    opt = impl([{"params": [p], "weight_decay": 0.5}], lr=0.1)
    opt.step()
    assert torch.equal(p, torch.ones(3)), "no gradient: no update, not even weight decay"


def test_get_lr_paper_and_author_presets():
    # paper: 3,000 updates, cosine over all of them, floor 1e-6, no warmup
    assert get_lr(0, 2e-4, 3000) == pytest.approx(2e-4)
    assert get_lr(1500, 2e-4, 3000) == pytest.approx(1e-6 + (2e-4 - 1e-6) * 0.5)
    assert get_lr(3000, 2e-4, 3000) == pytest.approx(1e-6)
    # author: CosineAnnealingLR(T_max=3000) stepped once per update, but only 750 updates run
    assert get_lr(750, 2e-4, 3000) == pytest.approx(1.7086e-4, abs=5e-9)
    # the LR of the last update
    assert get_lr(749, 2e-4, 3000) == pytest.approx(1.7093e-4, abs=5e-9)
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

    from minroute.run.data import TokenSplit, update_batches

    split = TokenSplit(demo_run / "demo-data", "train")
    plain = update_batches(split, 3, 4, 4, seed=1, sort_by_length=False)
    tidy = update_batches(split, 3, 4, 4, seed=1, sort_by_length=True)
    assert sorted(np.concatenate(plain).tolist()) == sorted(np.concatenate(tidy).tolist())
    lengths = split.lengths()
    pad = lambda bs: sum(lengths[b].max() * len(b) - lengths[b].sum() for b in bs)
    assert pad(tidy) <= pad(plain)
    assert all(np.array_equal(a, b) for a, b in zip(tidy, update_batches(split, 3, 4, 4, 1, True)))
