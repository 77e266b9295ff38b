"""A training step the GPU does not wait on: host syncs counted on CPU (bench/host_overhead.py's
counter: every value read, value-sized op and blocking copy, attributed to its line), per
micro-batch and per update."""

import sys
from pathlib import Path

import pytest
import torch

import train

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from host_overhead import HostSyncCounter, mix_gates, setup, train_args  # noqa: E402

CPU = torch.device("cpu")


def no_autocast():
    return torch.autocast("cpu", enabled=False)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return setup(tmp_path_factory.mktemp("sync"), layers=6, hidden=32, heads=4, kv=2, ffn=64)


def counted_update(small, u, monkeypatch, forced=None):
    """Syncs of train.one_update, split by where they happen: in the micro-batches (anywhere but
    train.py) and in the update's tail (train.py: the non-finite check); collate (host data) not
    counted."""
    route, opt, trainable, split, pad_id = small
    args = train_args(accum=2)
    counter = HostSyncCounter()
    real = train.collate

    def collate(*a, **k):
        with counter.paused():
            return real(*a, **k)

    monkeypatch.setattr(train, "collate", collate)
    with route.forcing(forced):
        # warm-up (caches)
        train.one_update(u, route, opt, trainable, split, args, pad_id, no_autocast, CPU)
        with counter:
            _, _, _, finite = train.one_update(
                u + 1, route, opt, trainable, split, args, pad_id, no_autocast, CPU
            )
    where = counter.by_where()
    micro = {w: n for w, n in where.items() if not w.startswith("train.py:")}
    tail = {w: n for w, n in where.items() if w.startswith("train.py:")}
    assert finite
    return micro, tail, args.accum


@pytest.mark.parametrize("gates", ["band", "mixed"])
def test_one_host_read_per_block_and_one_per_update(small, monkeypatch, gates):
    """Router gates (initial band: every row alike; mixed: rows differ): at most one read per block
    per micro-batch, all of them the block's open-row count in fast/packing.py, nothing in the loss,
    the mask, RoPE or the batch copy; and exactly one per update, train.py's non-finite check."""
    route = small[0]
    L = route.config.num_hidden_layers
    if gates == "mixed":
        mix_gates(route, seed=1)
    micro, tail, accum = counted_update(small, 0 if gates == "band" else 4, monkeypatch)
    if gates == "mixed":
        hard = route.last.hard
        assert (hard.any(0) & ~hard.all(0)).any(), (
            "some block must have open and closed rows for this test"
        )
    total = sum(micro.values())
    print(
        f"{gates}: {total / accum:.1f} syncs per micro-batch ({L} blocks): {micro}; update tail:"
        f" {tail}"
    )
    assert total <= accum * L, (
        f"{total / accum:.1f} host syncs per micro-batch for {L} blocks: {micro}"
    )
    assert all(w.startswith("packing.py:") for w in micro), (
        f"host syncs outside the row split: {micro}"
    )
    assert sum(tail.values()) == 1 and all(w.startswith("train.py:") for w in tail), tail


def test_imposed_gates_cost_no_host_read(small, monkeypatch):
    """Gates known on the host (forcing, per row): forward, loss and backward read nothing back."""
    route = small[0]
    L = route.config.num_hidden_layers
    forced = torch.tensor([[(i + b) % 3 != 0 for i in range(L)] for b in range(4)])
    micro, tail, _ = counted_update(small, 8, monkeypatch, forced=forced)
    assert micro == {}, f"host syncs with imposed gates: {micro}"
    assert sum(tail.values()) == 1


def test_counter_sees_what_it_counts():
    """The counter itself: value reads, value-sized ops, boolean masks and blocking copies, not
    device-side ops."""
    x = torch.arange(6.0)
    with HostSyncCounter() as c:
        y = (x * 2).sum()  # device-side: nothing
        _ = x[x > 2]
        _ = (x > 2).nonzero()
        _ = y.item()
        _ = bool(y > 0)
        _ = x.to("cpu")
        _ = x.to(torch.float64)  # dtype only: nothing
        _ = x.to("cpu", non_blocking=True)  # non-blocking: nothing
    kinds = sorted(k for k, _ in c.calls)
    assert kinds == [
        "__bool__",
        "blocking copy .to(device)",
        "boolean-mask index",
        "item",
        "nonzero",
    ], kinds


def test_training_forward_packs_padded_rows(small, monkeypatch):
    """train.py hands collate's row lengths to the forward, so padded micro-batches run packed (no
    padding work)."""
    route, opt, trainable, split, pad_id = small
    seen = []
    real = train.train_forward

    def spy(*a, **k):
        seen.append((k.get("lengths"), a[2].sum(1).tolist()))
        return real(*a, **k)

    monkeypatch.setattr(train, "train_forward", spy)
    train.one_update(0, route, opt, trainable, split, train_args(accum=2), pad_id, no_autocast, CPU)
    assert seen and all(lengths == real_lengths for lengths, real_lengths in seen), seen
