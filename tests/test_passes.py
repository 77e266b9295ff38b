"""The shared evaluation pass: every setting equals its own separate forward; timing positions; the
floor."""

import numpy as np
import pytest

from minroute.evaluation.evaluate import PassResult, random_masks, run_pass, static_masks
from minroute.evaluation.passes import Setting, floor_seconds, run_settings
from minroute.run.data import TokenSplit


@pytest.fixture(scope="module")
def demo(demo_run):
    from minroute.run.checkpoint import load_layerroute

    route, meta = load_layerroute(demo_run, "latest")
    return route, TokenSplit(meta["args"]["data"], "eval")


def separate(route, ev, s: Setting, **kw) -> PassResult:
    """The reference: one plain pass per setting (LayerRoute's inference forward, rows in file
    order)."""
    mode = (
        "base"
        if not s.lora
        else "gated"
        if s.gates is None or not np.asarray(s.gates).all()
        else "full"
    )
    return run_pass(
        route, ev, 0, mode, None if mode != "gated" else s.gates, route_on=s.route_on, **kw
    )


@pytest.mark.parametrize("batch_size", [3, 8])
def test_every_setting_equals_its_own_pass(demo, batch_size):
    route, ev = demo
    L = route.config.num_hidden_layers
    g = run_pass(route, ev, 0, "gated")
    settings = [
        Setting("base", np.ones(L, bool), lora=False),
        Setting("full", np.ones(L, bool)),
        Setting("gated"),
        Setting("tf", route_on="sequence"),
        Setting("static", static_masks(g, 0)),
        Setting("random", random_masks(g, 0)),
    ]
    shared = run_settings(route, ev, 0, settings, batch_size=batch_size)
    assert (g.hard.sum(0) % len(ev) != 0).sum() >= 1, (
        "the demo's gates should differ between rows somewhere"
    )
    for s in settings:
        got, ref = PassResult.of(ev, shared[s.name]), separate(route, ev, s, batch_size=1)
        assert np.array_equal(got.hard, ref.hard), s.name
        assert np.abs(got.soft - ref.soft).max() < 1e-5, s.name
        assert np.array_equal(got.n_counted, ref.n_counted) and np.array_equal(
            got.asst_counted, ref.asst_counted
        )
        rel = np.abs(got.ce_sum - ref.ce_sum).max() / np.abs(ref.ce_sum).max()
        rel_a = np.abs(got.asst_sum - ref.asst_sum).max() / np.abs(ref.asst_sum).max()
        assert rel < 1e-5 and rel_a < 1e-5, (
            f"{s.name}: CE sums differ by {rel:.2g} / {rel_a:.2g} relative"
        )


def test_pool_all_with_fixed_padding(demo, tmp_path, demo_run):
    """The authors' forward (pool='all', padded to a fixed length): shared = separate, and
    batch-mates change nothing."""
    route, ev = demo
    route.pool = "all"
    try:
        a = run_settings(
            route,
            ev,
            0,
            [Setting("g"), Setting("tf", route_on="sequence", loss=False)],
            batch_size=4,
            pad_to=512,
        )
        b = run_settings(route, ev, 0, [Setting("g")], batch_size=1, pad_to=512)
        assert np.array_equal(a["g"].hard, b["g"].hard)
        ref = run_pass(route, ev, 0, "gated", route_on="sequence", batch_size=2, pad_to=512)
        assert np.array_equal(a["tf"].hard, ref.hard)
    finally:
        route.pool = "mask"


def test_floor_is_each_setting_alone(demo):
    route, ev = demo
    L = route.config.num_hidden_layers
    settings = [Setting("full", np.ones(L, bool)), Setting("gated")]
    res = run_settings(route, ev, 0, settings)
    floor = floor_seconds(route, ev, 0, settings, res)
    assert set(floor) == {"full", "gated"} and all(v > 0 for v in floor.values())
    part = floor_seconds(route, ev, 0, settings, res, batch_size=2, every=3)
    assert all(v > 0 for v in part.values())


def test_left_padded_prefill_equals_each_prompt_alone(demo):
    """timing.prefill on a left-padded batch uses generate's positions: each row's logits are its
    logits alone."""
    from minroute.evaluation.timing import prefill
    from minroute.run.data import collate

    route, ev = demo
    rows = [0, 4, 12, 15]
    batch = collate(ev, rows, 0, side="left", prompt_only=True)
    together, _ = prefill(route, batch["input_ids"], batch["attention_mask"])
    for k, i in enumerate(rows):
        one = collate(ev, [i], 0, prompt_only=True)
        alone, _ = prefill(route, one["input_ids"], one["attention_mask"])
        diff = (together[k] - alone[0]).abs().max().item()
        assert diff < 1e-4, (
            f"row {i}: left-padded prefill differs from the prompt alone by {diff:.3g}"
        )


def test_prefill_counts_positions_over_real_tokens(demo, monkeypatch):
    """The positions prefill hands the model are generate's: a left-padded row's first real token is
    at 0."""
    from minroute.evaluation.timing import prefill
    from minroute.run.data import collate

    route, ev = demo
    seen = []
    real_hidden = route.hidden

    def spy(ids, mask=None, pos=None, cache=None, **kw):
        seen.append(pos)
        return real_hidden(ids, mask, pos, cache, **kw)

    monkeypatch.setattr(route, "hidden", spy)
    batch = collate(ev, [0, 12], 0, side="left", prompt_only=True)
    prefill(route, batch["input_ids"], batch["attention_mask"])
    mask, pos = batch["attention_mask"], seen[0]
    assert pos is not None
    for b in range(2):
        first = int(mask[b].nonzero()[0])
        assert pos[b, first] == 0 and pos[b, -1] == int(mask[b].sum()) - 1
