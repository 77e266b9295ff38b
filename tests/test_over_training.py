"""The report's sections on answers and training (minroute/evaluation/over_training.py) on hand-made
runs: every number is the one computed by hand from the files."""

import csv
import json

import pytest

from minroute.evaluation import over_training as ot
from minroute.evaluation.stats import wilson_ci


def samples(method, bfcl, gsm):
    tool = {"method": method, "step_type": "tool_call", "parsable": True}
    out = [{**tool, "sample": i, "bfcl": b, "exact": b} for i, b in enumerate(bfcl)]
    return out + [
        {"method": method, "sample": 100 + i, "step_type": "planning", "correct": c}
        for i, c in enumerate(gsm)
    ]


def summary(layers_tool, layers_plan):
    return {"tool": {"layers_run": layers_tool}, "planning": {"layers_run": layers_plan}}


def write_log(path, rows):
    fields = ["step", "ce", "skip_tool", "skip_plan", "grad_norm", "grad_lora"]
    fields += ["grad_router_weight", "grad_router_bias", "clipped", "val_ce"]
    fields += ["val_skip_tool", "val_skip_plan"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        w.writerows(rows)


@pytest.fixture
def study(tmp_path):
    runs = []
    for name, variant, gated in (
        ("paper-s1", "paper", [1, 0, 0, 0]),
        ("lora-only-s1", "lora-only", None),
    ):
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        smp = samples("base", [0, 0, 0, 0], [0, 0]) + samples("full", [1, 1, 0, 0], [1, 0])
        summ = {"base": summary(30, 30), "full": summary(30, 30)}
        if gated:
            smp += samples("gated", gated, [0, 0]) + samples("static mask", [0, 0, 0, 0], [0, 0])
            smp += samples("random mask", [1, 1, 1, 0], [0, 1])
            for m in ("gated", "static mask", "random mask"):
                summ[m] = summary(27.5, 29)
        else:
            smp += [{**x, "method": "gated"} for x in smp if x["method"] == "full"]
            summ["gated"] = summ["full"]
        res = {
            "tasks": {"summary": summ, "samples": smp},
            "skip_diff": -1.5,
            "skip_diff_ci95": [-3.0, 0.5],
            "controls": {
                "learned routing": {"layers_run": 28.0},
                "static mask": {"layers_run": 28.0, "dce_vs_learned": 0.25},
                "random mask": {"layers_run": 28.0, "dce_vs_learned": 0.5},
            },
        }
        rows = [
            {"step": 2, "skip_tool": 10, "skip_plan": 5, "grad_norm": 5.0, "clipped": 1.0},
            {"step": 4, "skip_tool": 10, "skip_plan": 20, "grad_norm": 0.5, "clipped": 0.0},
        ]
        for r, (lo, rw) in zip(rows, ((3.0, 4.0), (0.3, 0.4))):
            r.update(ce=1, grad_lora=lo, grad_router_weight=rw, grad_router_bias=0.0)
        rows[1].update(val_ce=2.0, val_skip_tool=12.0, val_skip_plan=4.0)
        if variant == "lora-only":
            for r in rows:
                r.update(grad_router_weight="", grad_router_bias="", grad_norm=r["grad_lora"])
        write_log(d / "train_log.csv", rows)
        runs.append(
            {"run": f"runs/{name}", "variant": variant, "res": res, "method": {"clip": 1.0}}
        )
    return tmp_path, runs


def test_answers_cells_are_counts_with_wilson_intervals(study):
    _, runs = study
    md, out = ot.answers(runs, ["paper", "lora-only"])
    lo, hi = wilson_ci(1, 4)
    assert out["paper / gated"]["bfcl"]["k"] == 1 and out["paper / gated"]["bfcl"]["n"] == 4
    assert out["paper / gated"]["bfcl"]["ci95"] == pytest.approx([100 * lo, 100 * hi])
    assert out["base"]["bfcl"]["pct"] == 0 and out["lora-only / full"]["gsm8k"]["pct"] == 50
    assert "lora-only / gated" not in out  # its gated model is its all-open one
    text = "\n".join(md)
    assert (
        f"| `paper` | gated (learned routing) | 25.0 (1/4) [{100 * lo:.1f}, {100 * hi:.1f}]" in text
    )
    assert "| `lora-only` | LoRA alone, every block (no routers) | 50.0 (2/4)" in text


def test_across_seeds_is_the_mean_with_a_t_interval():
    x = ot.across([{"pct": 20.0, "ci95": [0, 1]}, {"pct": 22.0, "ci95": [0, 1]}])
    assert x["pct"] == 21 and x["seeds"] == 2  # t(0.975, 1) = 12.706, sd sqrt(2)
    assert x["ci95"] == pytest.approx([21 - 12.706, 21 + 12.706], rel=1e-4)
    y = ot.across([{"pct": 10.0, "ci95": [0, 1]}, {"pct": 30.0, "ci95": [0, 1]}])
    assert y["ci95"] == [0.0, 100.0]  # clipped to what a rate can be
    # seeds that agree exactly: not a zero-width interval, the pooled rows' Wilson interval
    z = ot.across([{"pct": 1.25, "k": 1, "n": 80, "ci95": [0.2, 6.7]}] * 3)
    lo, hi = wilson_ci(3, 240)
    assert z["pct"] == 1.25 and z["pooled"] and z["ci95"] == pytest.approx([100 * lo, 100 * hi])
    assert z["ci95"][0] < 1.25 < z["ci95"][1] and "rows pooled" in ot.cell(z)


def test_routing_worth_is_paired_on_the_same_rows(study):
    _, runs = study
    md, out = ot.routing_worth(runs)
    rec = out["runs/paper-s1"]
    assert list(out) == ["runs/paper-s1"]  # the LoRA-only run has no routing to weigh
    assert rec["bfcl_gated_minus_static"]["diff"] == pytest.approx(25.0)
    assert rec["bfcl_gated_minus_random"]["diff"] == pytest.approx(-50.0)
    assert rec["bfcl_gated_minus_full"]["diff"] == pytest.approx(-25.0)
    assert rec["gsm8k_gated_minus_random"]["diff"] == pytest.approx(-50.0)
    assert rec["dce_static"] == 0.25 and "+0.250" in "\n".join(md)


def test_differential_and_gradients_come_from_the_log(study):
    folder, runs = study
    md, out = ot.differential_over_training(folder, runs)
    rec = out["runs/paper-s1"]
    assert rec["validation"] == {4: {"tool": 12.0, "planning": 4.0, "diff": 8.0}}
    assert rec["train_intervals"] == {2: 5.0, 4: -10.0}
    assert "| 4 | +8.0 (12.0 / 4.0) |" in "\n".join(md)
    assert "runs/lora-only-s1" not in out
    md, g = ot.gradient_norms(folder, runs)
    p = g["runs/paper-s1"]
    assert p["median"]["lora"] == pytest.approx(1.65) and p["median_total"] == pytest.approx(2.75)
    assert p["median_router_share"] == pytest.approx(0.64)  # 4² / 5² and 0.4² / 0.5²
    assert p["clipped_pct"] == 50 and p["routers_set_the_clip_pct"] == 0  # LoRA's 3.0 > clip too
    lo = g["runs/lora-only-s1"]
    assert lo["median"]["router_weight"] is None and lo["median_router_share"] == 0


def test_learning_curve_reads_tasks_only_files(tmp_path):
    d = tmp_path / "curves" / "lora-only-s1"
    d.mkdir(parents=True)
    for step, k in ((20, 1), (40, 3)):
        smp = samples("base", [0, 0, 0, 0], [0]) + samples("full", [1] * k + [0] * (4 - k), [0])
        (d / f"update-{step:06d}.json").write_text(
            json.dumps({"step": step, "tasks": {"samples": smp}})
        )
    (d / "update-000060.json").write_text("{not json")  # a damaged point is left out
    md, out = ot.learning_curve(tmp_path)
    pts = out["lora-only-s1"]
    assert list(pts) == [0, 20, 40] and pts[40]["bfcl"]["k"] == 3 and pts[0]["bfcl"]["k"] == 0
    assert "| 40 | 75.0 (3/4)" in "\n".join(md)


def test_no_tasks_and_old_logs_say_so(tmp_path):
    res = {"skip_diff": 0, "skip_diff_ci95": [0, 0]}
    runs = [{"run": "runs/x", "variant": "paper", "res": res, "method": {}}]
    assert "Not measured" in "\n".join(ot.answers(runs, ["paper"])[0])
    assert "Not measured" in "\n".join(ot.routing_worth(runs)[0])
    assert "no per-group gradient norms" in "\n".join(ot.gradient_norms(tmp_path, runs)[0])
    assert "No curve" in "\n".join(ot.learning_curve(tmp_path)[0])
