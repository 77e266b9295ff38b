"""eval.py: metrics on hand-computable cases, PPL = exp(CE) only, CIs, held-out checks, the demo
evaluation."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eval as eval_script
from minroute.evaluation.evaluate import (
    PassResult,
    random_masks,
    run_pass,
    static_mask,
    static_masks,
)
from minroute.evaluation.flops import sequence_flops
from minroute.evaluation.stats import bootstrap_ci, length_regression
from minroute.run.checkpoint import load_layerroute
from minroute.run.data import TokenSplit, collate
from minroute.run.load import load_tokenizer


def synthetic():
    hard = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]], dtype=bool)
    return PassResult(
        step_type=np.array([0, 0, 1, 1]),
        n_tokens=np.array([10, 20, 30, 40]),
        ce_sum=np.array([2.0, 4.0, 3.0, 9.0]),
        n_counted=np.array([2, 2, 3, 3]),
        soft=np.where(hard, 0.8, 0.2),
        hard=hard,
    )


def test_pass_metrics_by_hand():
    r = synthetic()
    assert r.skip_pct(0) == pytest.approx(100 * 5 / 8) and r.skip_pct(1) == pytest.approx(
        100 * 1 / 8
    )
    assert r.layers_run.tolist() == [2, 1, 4, 3]
    assert r.ce(0) == pytest.approx(6 / 4) and r.ppl(0) == pytest.approx(math.exp(1.5))
    assert r.ppl() == pytest.approx(math.exp(18 / 10))
    # the authors' definition: the mean over samples of exp(CE_i + lambda * R_i), R_i the sample's
    # mean soft gate
    assert r.paper_ppl(0, 1.0, forced=False) == pytest.approx(
        (math.exp(1.0 + 0.5) + math.exp(2.0 + 0.35)) / 2
    )
    assert r.paper_ppl(0, 1.0, forced=True) == pytest.approx((math.exp(2.0) + math.exp(3.0)) / 2)
    from minroute.core.model import ModelConfig

    cfg = ModelConfig(num_hidden_layers=4)
    assert r.flops_reduction(cfg, 0, whole_model=False) == pytest.approx(100 * 5 / 8)
    expect = 1 - (sequence_flops(cfg, 10, 2) + sequence_flops(cfg, 20, 1)) / (
        sequence_flops(cfg, 10, 4, routers=False) + sequence_flops(cfg, 20, 4, routers=False)
    )
    assert r.flops_reduction(cfg, 0) == pytest.approx(100 * expect)


def test_controls_by_hand():
    r = synthetic()  # layers run 2, 1, 4, 3 (mean 2.5); skip rates per layer 0, .25, .5, .75
    assert static_mask(r).tolist() == [
        True,
        True,
        False,
        False,
    ]  # one mask, round(1.5) = 2 closed (generation)
    # 6 skipped blocks over 4 rows: two rows close {3}, two close {3, 2}
    s = static_masks(r, seed=1)
    assert sorted((~s).sum(1).tolist()) == [1, 1, 2, 2] and not s[:, 3].any() and s[:, :2].all()
    m = random_masks(r, seed=3)
    assert sorted((~m[:2]).sum(1).tolist()) == [
        2,
        3,
    ]  # tool rows skipped 2 + 3 blocks: so do the random masks
    assert sorted((~m[2:]).sum(1).tolist()) == [0, 1]  # planning rows 0 + 1
    assert np.array_equal(random_masks(r, seed=3), m), (
        "the random control is reproducible for a seed"
    )


@pytest.mark.parametrize("seed", range(5))
def test_controls_match_the_learned_compute_exactly(seed):
    """Any routing: the static and random controls run exactly the learned mean layers (per step
    type for random)."""
    rng = np.random.default_rng(seed)
    N, L = 37, 24
    hard = rng.random((N, L)) < rng.uniform(0.3, 0.9)
    r = PassResult(
        step_type=rng.integers(0, 2, N),
        n_tokens=rng.integers(50, 500, N),
        ce_sum=np.ones(N),
        n_counted=np.ones(N, dtype=np.int64),
        soft=hard * 0.6 + 0.2,
        hard=hard,
    )
    learned = r.layers_run.mean()
    for masks in (static_masks(r, seed), random_masks(r, seed)):
        assert abs(masks.sum(1).mean() - learned) < 1e-9, (masks.sum(1).mean(), learned)
    k = int(np.floor(L - learned + 1e-9))
    assert set(np.unique((~static_masks(r, seed)).sum(1)).tolist()) <= {k, k + 1}
    rm = random_masks(r, seed)
    for t in (0, 1):
        assert (
            abs(rm[r.step_type == t].sum(1).mean() - r.layers_run[r.step_type == t].mean()) < 1e-9
        )


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
    # independent CE: core's training forward with all gates open, plain cross-entropy over labels
    ce_sum, n = 0.0, 0
    with torch.no_grad(), route.forcing(torch.ones(L, dtype=torch.bool)):
        for a in range(0, len(ev), 4):
            b = collate(ev, range(a, min(len(ev), a + 4)), pad)
            h, _, _ = route.gated_hidden(b["input_ids"], b["attention_mask"])
            logits = route.lm_head(h).float()[:, :-1]
            y = b["labels"][:, 1:]
            ce_sum += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
            ).item()
            n += int((y != -100).sum())
    assert full.ppl() == pytest.approx(math.exp(ce_sum / n), rel=1e-5), (
        "PPL must be exp(token-mean CE) and only that"
    )


def rebuilt_data(tmp_path, demo_run, edit):
    """A copy of the demo data with `edit(folder)` applied and its manifest's file records updated,
    as a rebuild would leave it (so only the content, not a corrupt file, can be refused)."""
    from minroute.run.safety import file_records

    data = tmp_path / "data"
    shutil.copytree(demo_run / "demo-data", data)
    edit(data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["files"] = file_records(data, list(manifest["files"]))
    (data / "manifest.json").write_text(json.dumps(manifest))
    return data


def test_rows_the_run_trained_on_are_refused(tmp_path, demo_run, capsys):
    """A rebuilt data folder whose 'held-out' rows the run trained on: refused by the checkpoint's
    trained rows."""
    trained = (
        demo_run / json.loads((demo_run / "latest.json").read_text())["dir"] / "trained_rows.txt"
    ).read_text()

    def plant(data):
        rows = [json.loads(x) for x in open(data / "eval" / "samples.jsonl")]
        rows[1]["hash"] = trained.split()[5]
        (data / "eval" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    data = rebuilt_data(tmp_path, demo_run, plant)
    code = eval_script.run_cli(
        eval_script.main, ["--ckpt", str(demo_run), "--data", str(data), "--no-timing"]
    )
    io = capsys.readouterr()
    assert code == 2 and f"1 rows of {data}/eval" in io.err and "were trained on by" in io.err
    assert f"note: {data} is not the data folder" in io.out
    assert (
        not (demo_run / "eval.json").exists()
        or "data" not in json.loads((demo_run / "eval.json").read_text())
        or json.loads((demo_run / "eval.json").read_text())["data"] != str(data)
    )


def test_data_from_another_tokenizer_and_other_folder(tmp_path, demo_run, capsys):
    def retokenised(data):
        m = json.loads((data / "manifest.json").read_text())
        m["tokenizer_sha256"] = "0" * 64
        (data / "manifest.json").write_text(json.dumps(m))

    data = rebuilt_data(tmp_path, demo_run, retokenised)
    code = eval_script.run_cli(
        eval_script.main, ["--ckpt", str(demo_run), "--data", str(data), "--no-timing"]
    )
    assert code == 2 and "was tokenised by" in capsys.readouterr().err


def test_output_paths_are_checked_before_any_work(tmp_path, demo_run, capsys, monkeypatch):
    monkeypatch.setattr(
        eval_script, "open_run", lambda *a, **k: pytest.fail("loaded a model before checking paths")
    )
    for argv, msg in (
        (["--json", str(tmp_path / "no" / "such" / "e.json")], "does not exist"),
        (["--json", str(tmp_path)], "is a folder"),
        (["--csv", str(demo_run / "latest.json")], "is a file"),
    ):
        code = eval_script.run_cli(eval_script.main, ["--ckpt", str(demo_run), *argv])
        assert code == 2 and msg in capsys.readouterr().err


def test_t_interval_matches_tables():
    from minroute.evaluation.stats import t_ci, t_quantile

    for df, ref in ((1, 12.706205), (2, 4.302653), (9, 2.262157), (29, 2.045230)):
        assert t_quantile(0.975, df) == pytest.approx(ref, abs=1e-5), df
    lo, hi = t_ci([1.0, 2.0, 6.0])  # mean 3, sd sqrt(7), n 3
    half = 4.302653 * math.sqrt(7) / math.sqrt(3)
    assert (lo, hi) == pytest.approx((3 - half, 3 + half), abs=1e-4)


def test_differential_stats_by_hand():
    from minroute.evaluation.stats import differential_stats

    rng = np.random.default_rng(0)
    L = 8
    hard = np.ones((40, L), dtype=bool)
    hard[:20, :4] = rng.random((20, 4)) < 0.2  # tool rows skip about 3 of the first 4 blocks
    step = np.array([0] * 20 + [1] * 20)
    r = PassResult(step, np.full(40, 10), np.zeros(40), np.ones(40), hard.astype(float), hard)
    st = differential_stats(r.skip_per_sample, step == 0, n=4000)
    assert r.differential()["diff"] == st["diff"]
    assert st["diff"] == pytest.approx(r.skip_pct(0) - r.skip_pct(1))
    assert (
        st["ci95"][0] < st["diff"] < st["ci95"][1]
        and st["ci95"][0] > 0
        and st["p_permutation"] < 0.001
    )
    same = PassResult(
        step,
        np.full(40, 10),
        np.zeros(40),
        np.ones(40),
        hard.astype(float),
        np.tile(hard[:20], (2, 1)),
    )
    st = differential_stats(same.skip_per_sample, step == 0, n=2000)
    assert st["diff"] == 0.0 and st["p_permutation"] == 1.0 and st["ci95"][0] < 0 < st["ci95"][1]


def test_demo_evaluation_end_to_end(tmp_path, demo_run, capsys):
    out = tmp_path / "e.json"
    assert (
        eval_script.main(
            [
                "--demo",
                "--ckpt",
                str(demo_run),
                "--json",
                str(out),
                "--csv",
                str(tmp_path / "csv"),
                "--max-new-tokens",
                "8",
                "--repeats",
                "1",
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    for t in ("tool", "planning"):
        assert set(res["ppl"][t]) == {"base", "full", "gated"}
        assert 0 <= res["skip_pct"][t] <= 100 and 0 < res["layers_run"][t] <= 8
    assert res["skip_diff"] == pytest.approx(res["skip_pct"]["tool"] - res["skip_pct"]["planning"])
    assert {"static mask", "random mask", "all open", "learned routing"} == set(res["controls"])
    assert res["controls"]["all open"]["layers_run"] == 8
    assert "prefill_b1_gated" in res["timing"] and res["tasks"]["summary"]["gated"]
    lo, hi = res["skip_diff_ci95"]
    assert lo <= res["skip_diff"] <= hi and 0 < res["skip_diff_p_permutation"] <= 1
    assert res["route_on"] == "prompt" and "skip_diff" in res["teacher_forced"]
    for t in ("tool", "planning"):  # assistant-only PPL beside all-token PPL, and different from it
        assert (
            res["ppl_assistant"][t]["gated"] > 0
            and res["ppl_assistant"][t]["gated"] != res["ppl"][t]["gated"]
        )
    timed = res["timing"]["timed_gates"]["prefill_b1"][0]
    assert res["timing"]["layers_skipped"]["prefill_b1"] == 8 - timed.count("1")
    assert res["step"] == res["updates"] == 40 and res["which"] == "latest"
    text = capsys.readouterr().out
    for title in (
        "Table 2",
        "Table 3",
        "Table 4",
        "Table 5",
        "Per-layer gates",
        "Controls at exactly matched compute",
        "Length confound",
        "Wall-clock",
        "Task accuracy",
        "Skip differential of this run",
    ):
        assert title in text
    assert "(update 40 of 40: final)" in text
    names = {f.stem for f in (tmp_path / "csv").glob("*.csv")}
    assert names == {
        "differential",
        "table2",
        "table3",
        "table4",
        "table5",
        "gates",
        "controls",
        "length_confound",
        "timing",
        "tasks",
    }, names


def test_across_seeds_counts_one_checkpoint_once(tmp_path, demo_run, capsys):
    """The same run, its own final ckpt-* folder and a backup copy of it are one seed, not three."""
    backup = tmp_path / "run.bak"
    shutil.copytree(demo_run, backup)
    ckpt = demo_run / json.loads((demo_run / "latest.json").read_text())["dir"]
    out = tmp_path / "s.json"
    assert (
        eval_script.main(
            [
                "--runs",
                str(demo_run),
                str(ckpt),
                str(backup),
                "--which",
                "latest",
                "--json",
                str(out),
                "--csv",
                str(tmp_path / "c"),
                "--tasks",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    s = json.loads(out.read_text())["seeds"]
    assert (
        s["n"] == 1
        and s["n_given"] == 3
        and [(out.parent / d["run"]).resolve() for d in s["duplicates"]]
        == [ckpt.resolve(), backup.resolve()]
    )
    assert "tool_exact_full" in s["runs"][0] and np.isnan(s["summary"]["diff"]["sd"])
    assert "counted once" in capsys.readouterr().out


def test_compare_adds_table2_rows(tmp_path, demo_run):
    out = tmp_path / "c.json"
    assert (
        eval_script.main(
            [
                "--ckpt",
                str(demo_run),
                "--which",
                "latest",
                "--compare",
                str(demo_run),
                "--json",
                str(out),
                "--csv",
                str(tmp_path / "csv"),
                "--no-timing",
            ]
        )
        == 0
    )
    methods = json.loads(out.read_text())["methods"]
    assert set(methods) == {demo_run.name, f"{demo_run.name} #2"}
    assert methods[demo_run.name] == methods[f"{demo_run.name} #2"], (
        "the same checkpoint twice: the same row"
    )


def test_across_seeds_names_and_leaves_out_broken_runs(tmp_path, demo_run, capsys):
    from minroute.run.checkpoint import load_checkpoint, save_checkpoint

    broken, nan_run = tmp_path / "broken", tmp_path / "nan"
    shutil.copytree(demo_run, broken)
    ckpt = broken / json.loads((broken / "latest.json").read_text())["dir"]
    (ckpt / "adapter.safetensors").write_bytes(b"not safetensors")
    adapter, opt, meta = load_checkpoint(demo_run, "latest")
    adapter = {k: v.clone() for k, v in adapter.items()}
    adapter["routers.0.weight"][0, 0] = float("nan")
    save_checkpoint(nan_run, meta["step"], adapter, opt, meta)
    out = tmp_path / "s.json"
    assert (
        eval_script.main(
            [
                "--runs",
                str(demo_run),
                str(broken),
                str(nan_run),
                "--json",
                str(out),
                "--csv",
                str(tmp_path / "c"),
            ]
        )
        == 0
    )
    s = json.loads(out.read_text())["seeds"]
    assert (
        s["n"] == 1
        and s["n_given"] == 3
        and [(out.parent / x["run"]).resolve() for x in s["left_out"]]
        == [broken.resolve(), nan_run.resolve()]
    )
    assert (
        "adapter.safetensors" in s["left_out"][0]["why"] and "non-finite" in s["left_out"][1]["why"]
    )
    assert np.isfinite(s["summary"]["diff"]["mean"])
    assert "used 1 of 3 runs" in capsys.readouterr().out


def test_author_preset_gates_do_not_depend_on_batch_mates(tmp_path, demo_run):
    """pool='all' checkpoints are evaluated at their training length: a row's gates are the same in
    any batch."""
    import train

    run = tmp_path / "author"
    assert (
        train.main(
            [
                "--model",
                str(demo_run / "demo-model"),
                "--data",
                str(demo_run / "demo-data"),
                "--out",
                str(run),
                "--preset",
                "author",
                "--steps",
                "4",
                "--accum",
                "2",
                "--batch-size",
                "2",
                "--eval-every",
                "2",
                "--val-batches",
                "1",
            ]
        )
        == 0
    )
    route, meta = load_layerroute(run, "latest")
    assert eval_script.eval_batching(meta, 8)[0] == {"batch_size": 8, "pad_to": 512}
    assert eval_script.eval_batching({"args": {**meta["args"], "pad_to": 0}}, 8)[0] == {
        "batch_size": 1,
        "pad_to": None,
    }
    ev = TokenSplit(meta["args"]["data"], "eval")
    pad = load_tokenizer(meta["args"]["model"]).pad_id
    for route_on in ("prompt", "sequence"):
        a = run_pass(route, ev, pad, "gated", batch_size=1, pad_to=512, route_on=route_on)
        b = run_pass(route, ev, pad, "gated", batch_size=8, pad_to=512, route_on=route_on)
        assert np.array_equal(a.hard, b.hard) and np.allclose(a.soft, b.soft, atol=1e-5)


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--batch-size", "0"),
        ("--repeats", "0"),
        ("--time-prompts", "-1"),
        ("--max-new-tokens", "0"),
        ("--new-tokens", "x"),
    ],
)
def test_eval_numbers_are_checked_up_front(demo_run, capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        eval_script.main(["--ckpt", str(demo_run), flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {flag}: ") and err.count("\n") == 1


def test_eval_skip_and_differential_are_core_definition():
    """eval.py's numpy skip% (PassResult) and differential equal core.router.skip_percent, the
    definition the training log and validation call, on random gates of 30 layers (where float
    rounding could differ).
    """
    from minroute.core.router import skip_percent
    from minroute.evaluation.evaluate import PassResult

    rng = np.random.default_rng(0)
    for n in (7, 60, 101):
        hard = rng.random((n, 30)) < rng.random((n, 1))
        step = (rng.random(n) < 0.5).astype(np.int64)
        step[:2] = [0, 1]
        r = PassResult(
            step, np.full(n, 10), np.zeros(n), np.ones(n, np.int64), np.zeros((n, 30)), hard
        )
        tool, plan = skip_percent(torch.from_numpy(hard), torch.from_numpy(step == 0))
        assert abs(r.skip_pct(0) - tool) <= 1e-9 and abs(r.skip_pct(1) - plan) <= 1e-9
        assert abs(r.differential()["diff"] - (tool - plan)) <= 1e-9
