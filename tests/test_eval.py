"""eval.py: metrics on hand-computable cases, PPL = exp(CE) only, CIs, held-out checks, the demo evaluation."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eval as eval_script
from minroute.checkpoint import load_layerroute
from minroute.data import TokenSplit, collate
from minroute.evaluate import PassResult, bootstrap_ci, length_regression, random_masks, run_pass, static_mask
from minroute.flops import sequence_flops
from minroute.load import load_tokenizer


def synthetic():
    hard = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]], dtype=bool)
    return PassResult(step_type=np.array([0, 0, 1, 1]), n_tokens=np.array([10, 20, 30, 40]),
                      ce_sum=np.array([2.0, 4.0, 3.0, 9.0]), n_counted=np.array([2, 2, 3, 3]),
                      soft=np.where(hard, 0.8, 0.2), hard=hard)


def test_pass_metrics_by_hand():
    r = synthetic()
    assert r.skip_pct(0) == pytest.approx(100 * 5 / 8) and r.skip_pct(1) == pytest.approx(100 * 1 / 8)
    assert r.layers_run.tolist() == [2, 1, 4, 3]
    assert r.ce(0) == pytest.approx(6 / 4) and r.ppl(0) == pytest.approx(math.exp(1.5))
    assert r.ppl() == pytest.approx(math.exp(18 / 10))
    assert r.paper_ppl(0, 1.0, forced=False) == pytest.approx(math.exp(1.5 + (3 * 0.8 + 5 * 0.2) / 8))
    assert r.paper_ppl(0, 1.0, forced=True) == pytest.approx(math.exp(2.5))
    from minroute.model import Qwen2Config
    cfg = Qwen2Config(num_hidden_layers=4)
    assert r.flops_reduction(cfg, 0, whole_model=False) == pytest.approx(100 * 5 / 8)
    expect = 1 - (sequence_flops(cfg, 10, 2) + sequence_flops(cfg, 20, 1)) / (
        sequence_flops(cfg, 10, 4, routers=False) + sequence_flops(cfg, 20, 4, routers=False))
    assert r.flops_reduction(cfg, 0) == pytest.approx(100 * expect)


def test_controls_by_hand():
    r = synthetic()  # mean layers run 2.5 -> 1.5 skipped -> k = 2; skip rates per layer 0, .25, .5, .75
    assert static_mask(r).tolist() == [True, True, False, False]
    m = random_masks(r, seed=3)
    assert (~m[:2]).sum(1).tolist() == [2, 2]  # tool: 1.5 -> round to 2 skipped (banker's rounding: 2)
    assert (~m[2:]).sum(1).tolist() == [0, 0]  # planning: 0.5 -> 0
    assert np.array_equal(random_masks(r, seed=3), m), "the random control is reproducible for a seed"


def test_bootstrap_and_regression_on_synthetic_numbers():
    assert bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)
    v = np.random.default_rng(0).normal(0, 1, 400)
    lo, hi = bootstrap_ci(v, n=4000)
    half = 1.96 / math.sqrt(400)
    assert lo < v.mean() < hi and abs((hi - lo) / 2 - half) < 0.2 * half
    n = np.array([100, 200, 300, 400, 150, 250])
    tool = np.array([1, 1, 1, 0, 0, 0])
    score = 0.5 + 0.1 * n / 100 - 0.2 * tool
    reg = length_regression(n, tool, score)
    assert reg["per_100_tokens"] == pytest.approx(0.1) and reg["tool"] == pytest.approx(-0.2)
    assert reg["r2"] == pytest.approx(1.0)


def test_run_pass_forced_gates_and_ppl_is_ce_only(demo_run):
    route, meta = load_layerroute(demo_run, "latest")
    data = meta["args"]["data"]
    ev = TokenSplit(data, "eval")
    pad = load_tokenizer(meta["args"]["model"]).pad_id
    L = route.config.num_hidden_layers
    mask = np.array([i % 2 == 0 for i in range(L)])
    r = run_pass(route, ev, pad, "gated", np.tile(mask, (len(ev), 1)), batch_size=4)
    assert r.skip_pct(0) == r.skip_pct(1) == 50.0 and (r.layers_run == L // 2).all()
    full = run_pass(route, ev, pad, "full", batch_size=4)
    # independent CE: the training-style forward with all gates open, plain cross-entropy over labels
    ce_sum, n = 0.0, 0
    with torch.no_grad(), route.forcing(torch.ones(L, dtype=torch.bool)):
        for a in range(0, len(ev), 4):
            b = collate(ev, range(a, min(len(ev), a + 4)), pad)
            h, _, _ = route.gated_hidden(b["input_ids"], b["attention_mask"])
            logits = route.lm_head(h).float()[:, :-1]
            y = b["labels"][:, 1:]
            ce_sum += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
            n += int((y != -100).sum())
    assert full.ppl() == pytest.approx(math.exp(ce_sum / n), rel=1e-5), "PPL must be exp(token-mean CE) and only that"


def test_leak_between_eval_and_training_is_refused(tmp_path, demo_run):
    data = tmp_path / "data"
    shutil.copytree(demo_run / "demo-data", data)
    first_eval = open(data / "eval" / "samples.jsonl").readline()
    with open(data / "train" / "samples.jsonl", "a") as f:
        f.write(first_eval)
    with pytest.raises(SystemExit, match=r"1 samples of .*eval are also in train/val"):
        eval_script.check_held_out(data)


def test_demo_evaluation_end_to_end(tmp_path, demo_run, capsys):
    out = tmp_path / "e.json"
    assert eval_script.main(["--demo", "--ckpt", str(demo_run), "--json", str(out), "--csv", str(tmp_path / "csv"),
                             "--max-new-tokens", "8", "--repeats", "1"]) == 0
    res = json.loads(out.read_text())
    for t in ("tool", "planning"):
        assert set(res["ppl"][t]) == {"base", "full", "gated"}
        assert 0 <= res["skip_pct"][t] <= 100 and 0 < res["layers_run"][t] <= 8
    assert res["skip_diff"] == pytest.approx(res["skip_pct"]["tool"] - res["skip_pct"]["planning"])
    assert {"static mask", "random mask", "all open", "learned routing"} == set(res["controls"])
    assert res["controls"]["all open"]["layers_run"] == 8
    assert "prefill_b1_gated" in res["timing"] and res["tasks"]["summary"]["gated"]
    text = capsys.readouterr().out
    for title in ("Table 2", "Table 3", "Table 4", "Table 5", "Per-layer gates", "Controls at matched compute",
                  "Length confound", "Wall-clock", "Task accuracy"):
        assert title in text
    assert len(list((tmp_path / "csv").glob("*.csv"))) >= 9


def test_across_seeds(tmp_path, demo_run):
    out = tmp_path / "s.json"
    assert eval_script.main(["--runs", str(demo_run), str(demo_run), "--which", "latest", "--json", str(out),
                             "--csv", str(tmp_path / "c"), "--tasks", "--max-new-tokens", "4"]) == 0
    s = json.loads(out.read_text())["seeds"]
    assert s["n"] == 2 and s["summary"]["diff"]["sd"] == 0.0
    assert s["summary"]["gsm8k_acc_gated"]["sd"] == 0.0 and "tool_exact_full" in s["runs"][0]
    assert s["summary"]["diff"]["ci95"][0] == pytest.approx(s["summary"]["diff"]["mean"])


def test_compare_adds_table2_rows(tmp_path, demo_run):
    out = tmp_path / "c.json"
    assert eval_script.main(["--ckpt", str(demo_run), "--which", "latest", "--compare", str(demo_run), "--json",
                             str(out), "--csv", str(tmp_path / "csv"), "--no-timing"]) == 0
    methods = json.loads(out.read_text())["methods"]
    assert set(methods) == {"LayerRoute", demo_run.name}
    assert methods["LayerRoute"] == pytest.approx(methods[demo_run.name]), "the same checkpoint twice: the same row"
