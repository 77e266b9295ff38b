"""What a real study needs of train.py and eval.py: a LoRA-only run (every block open, no router
trains), per-group gradient norms in the log, checkpoints kept every N updates for a learning curve,
and the task accuracy alone."""

import csv
import json
import math

import pytest
import torch

import eval as eval_script
import train
from minroute.core.update import param_groups
from minroute.run.checkpoint import build_layerroute, load_checkpoint
from minroute.run.data import TokenSplit
from minroute.run.load import load_tokenizer
from minroute.run.log import fresh_acc


@pytest.fixture(scope="module")
def small_setup(demo_run):
    return demo_run / "demo-model", demo_run / "demo-data"


def args_for(model, data, out, steps=4, *extra):
    return [
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--batch-size",
        "2",
        "--accum",
        "2",
        "--lr",
        "3e-3",
        "--log-every",
        "1",
        "--eval-every",
        "2",
        "--val-batches",
        "1",
        "--save-every",
        "100",
        "--device",
        "cpu",
        *extra,
    ]


def read_log(run):
    with open(run / "train_log.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def lora_only_run(small_setup, tmp_path_factory):
    model, data = small_setup
    out = tmp_path_factory.mktemp("lora-only") / "run"
    assert train.main(args_for(model, data, out, 4, "--ablation", "lora-only")) == 0
    return out


def test_lora_only_keeps_every_block_open_and_trains_only_lora(lora_only_run):
    adapter, opt_state, meta = load_checkpoint(lora_only_run, "latest")
    a = meta["args"]
    assert a["ablation"] == "lora-only" and a["gate_reg"] == 0.0 and a["init"] == "uniform"
    L = sum(1 for k in adapter if k.startswith("routers.") and k.endswith(".bias"))
    # the routers are exactly their open init: w = 0, b = +1 (p = 0.73 > 0.5 for any input)
    for i in range(L):
        assert torch.equal(
            adapter[f"routers.{i}.weight"], torch.zeros_like(adapter[f"routers.{i}.weight"])
        )
        assert torch.equal(adapter[f"routers.{i}.bias"], torch.ones(1))
    assert not any("routers." in k for k in opt_state), "routers have no optimizer state"
    assert any("lora_A" in k for k in opt_state)
    rows = read_log(lora_only_run)
    assert all(float(r["skip_tool"]) == 0 and float(r["skip_plan"]) == 0 for r in rows if r["ce"])
    assert all(float(r["val_skip_tool"]) == 0 for r in rows if r["val_ce"])
    assert all(r["grad_router_weight"] == "" and float(r["grad_lora"]) > 0 for r in rows if r["ce"])


def test_lora_only_update_is_the_all_open_update(small_setup):
    """The LoRA gradients of a LoRA-only update equal those of the same update with every gate
    imposed open (the plain model + LoRA), and no router gets a gradient."""
    model, data = small_setup
    ns = train.parse_args(args_for(model, data, "unused", 4, "--ablation", "lora-only"))
    from minroute.run.settings import resolve

    resolve(ns)
    torch.manual_seed(0)
    route = build_layerroute(model, {"r": 8, "alpha": 16, "dropout": 0.0}, init=ns.init)
    route.routers.requires_grad_(False)
    assert [g["name"] for g in param_groups(route, 0.0, False)] == ["lora"]
    split, pad = TokenSplit(data, "train"), load_tokenizer(model).pad_id
    L = route.config.num_hidden_layers

    def grads(forced):
        route.zero_grad(set_to_none=True)
        with route.forcing(torch.ones(L, dtype=torch.bool) if forced else None):
            train.one_update(
                0, route, NoStep(), [], split, ns, pad, no_autocast, torch.device("cpu")
            )
        return {n: p.grad.clone() for n, p in route.named_parameters() if p.grad is not None}

    routed, imposed = grads(False), grads(True)
    assert routed.keys() == imposed.keys() and routed
    assert not any(n.startswith("routers.") for n in routed)
    for n in routed:
        torch.testing.assert_close(routed[n], imposed[n], rtol=0, atol=0)


class NoStep:
    param_groups: list = []

    def set_lr(self, lr):
        pass

    def step(self):
        pass

    def zero_grad(self):
        pass


def no_autocast():
    return torch.autocast("cpu", enabled=False)


def test_group_gradient_norms_are_those_before_the_clip(small_setup):
    model, data = small_setup
    ns = train.parse_args(args_for(model, data, "unused", 4, "--clip", "0"))
    from minroute.run.settings import resolve

    resolve(ns)
    torch.manual_seed(0)
    route = build_layerroute(model, {"r": 8, "alpha": 16, "dropout": 0.0}, init="band")
    route.routers[0].weight.data.normal_()  # routers with something to learn
    opt = NoStep()
    opt.param_groups = param_groups(route, 0.0, False)
    acc = fresh_acc(torch.device("cpu"))
    split, pad = TokenSplit(data, "train"), load_tokenizer(model).pad_id
    route.zero_grad(set_to_none=True)
    _, _, total, _ = train.one_update(
        0, route, opt, [p for g in opt.param_groups for p in g["params"]], split, ns, pad,
        no_autocast, torch.device("cpu"), acc,
    )  # fmt: skip
    by_hand = {
        g["name"]: math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in g["params"]))
        for g in opt.param_groups
    }  # clip 0: the gradients are still those the norms were taken of
    got = {k: float(v) for k, v in acc["grad_groups"].items()}
    assert got.keys() == {"lora", "router_weight", "router_bias"}
    for k in by_hand:
        assert got[k] == pytest.approx(by_hand[k], rel=1e-5)
    assert math.sqrt(sum(v * v for v in got.values())) == pytest.approx(float(total), rel=1e-5)
    assert int(acc["clipped"]) == 0  # no clip, nothing counted as clipped


def test_log_counts_clipped_updates_and_names_each_group(small_setup, tmp_path):
    model, data = small_setup
    out = tmp_path / "r"
    assert train.main(args_for(model, data, out, 4, "--clip", "1e-6", "--log-every", "2")) == 0
    rows = [r for r in read_log(out) if r["ce"]]
    assert [float(r["clipped"]) for r in rows] == [1.0, 1.0]  # every update's norm is above 1e-6
    for r in rows:
        parts = [float(r[f"grad_{k}"]) for k in ("lora", "router_weight", "router_bias")]
        assert math.sqrt(sum(x * x for x in parts)) == pytest.approx(
            float(r["grad_norm"]), rel=1e-4
        )


def test_keep_every_keeps_those_checkpoints_through_a_resume(small_setup, tmp_path):
    model, data = small_setup
    out = tmp_path / "r"
    assert train.main(args_for(model, data, out, 6, "--keep-every", "2")) == 0
    names = sorted(p.name for p in out.glob("ckpt-*"))
    assert {"ckpt-000002", "ckpt-000004", "ckpt-000006"} <= set(names)
    kept = json.loads((out / "ckpt-000004" / "meta.json").read_text())
    assert kept["kept"] is True and kept["step"] == 4
    # resumed with another --keep-every (allowed: it changes no number); the kept ones stay
    assert train.main(["--resume", str(out), "--steps", "9", "--keep-every", "3"]) == 0
    names = {p.name for p in out.glob("ckpt-*")}
    assert {"ckpt-000002", "ckpt-000004", "ckpt-000006", "ckpt-000009"} <= names
    best = json.loads((out / "best.json").read_text())["dir"]
    assert best == "ckpt-000008" or "ckpt-000008" not in names  # saved as best only
    # without --keep-every a run keeps only latest and best
    out2 = tmp_path / "r2"
    assert train.main(args_for(model, data, out2, 6)) == 0
    pointed = {json.loads((out2 / f"{p}.json").read_text())["dir"] for p in ("latest", "best")}
    assert {p.name for p in out2.glob("ckpt-*")} == pointed


def test_tasks_only_scores_generations_and_nothing_else(demo_run, tmp_path):
    out = tmp_path / "t.json"
    args = ["--ckpt", str(demo_run), "--tasks-only", "--task-controls", "--max-new-tokens", "8"]
    assert eval_script.main(args + ["--json", str(out), "--csv", str(tmp_path / "csv")]) == 0
    ev = json.loads(out.read_text())
    assert ev["settings"]["tasks_only"] is True and "skip_diff" not in ev and "timing" not in ev
    s = ev["tasks"]["summary"]
    assert set(s) == {"base", "full", "gated", "static mask", "random mask"}
    # the controls run exactly the learned routing's compute, over all rows
    gated = [r for r in ev["tasks"]["samples"] if r["method"] == "gated"]
    n = {t: sum(r["step_type"] == t for r in gated) for t in ("tool_call", "planning")}

    def layers(m):  # layers run over all rows
        return sum(
            s[m][k]["layers_run"] * n[t]
            for k, t in (("tool", "tool_call"), ("planning", "planning"))
        )

    assert layers("static mask") == pytest.approx(layers("gated"))
    assert layers("random mask") == pytest.approx(layers("gated"))
    assert ev["step"] == json.loads((demo_run / "latest.json").read_text())["step"]


def test_tasks_only_on_a_kept_checkpoint_of_a_lora_only_run(lora_only_run, tmp_path):
    ckpt = sorted(lora_only_run.glob("ckpt-*"))[-1]
    out = tmp_path / "t.json"
    args = ["--ckpt", str(ckpt), "--tasks-only", "--max-new-tokens", "6", "--task-controls"]
    assert eval_script.main(args + ["--json", str(out), "--csv", str(tmp_path / "csv")]) == 0
    ev = json.loads(out.read_text())
    s = ev["tasks"]["summary"]
    # its gated model is the all-open one, generated once; no control closes anything
    assert set(s) == {"base", "full", "gated"} and s["gated"] == s["full"]
    full = [r for r in ev["tasks"]["samples"] if r["method"] == "full"]
    gated = [r for r in ev["tasks"]["samples"] if r["method"] == "gated"]
    assert [{**r, "method": "gated"} for r in full] == gated
    assert all(r["layers_run"] == 8 for r in gated)


def test_tasks_only_refuses_several_runs(demo_run, capsys):
    with pytest.raises(SystemExit):
        eval_script.parse_args(["--runs", str(demo_run), "--tasks-only"])
    assert "--tasks-only evaluates one checkpoint" in capsys.readouterr().err


def test_task_controls_need_tasks(demo_run, capsys):
    with pytest.raises(SystemExit):
        eval_script.parse_args(["--ckpt", str(demo_run), "--task-controls"])
    assert "--task-controls scores the masks' generations; add --tasks" in capsys.readouterr().err
    ok = eval_script.parse_args(["--ckpt", str(demo_run), "--task-controls", "--tasks-only"])
    assert ok.tasks and ok.task_controls


def test_cadence_may_change_on_resume_and_changes_no_number(small_setup, tmp_path):
    """How often a run logs, validates and checkpoints takes no random draw and changes no trained
    number: a run resumed with another cadence ends bitwise where the uninterrupted one does."""
    model, data = small_setup
    a, b = tmp_path / "a", tmp_path / "b"
    assert train.main(args_for(model, data, a, 4)) == 0
    slow = ["--eval-every", "1", "--val-batches", "2", "--log-every", "2", "--keep-every", "1"]
    assert train.main(args_for(model, data, b, 4, *slow)) == 0
    # back to update 2, then on with another cadence
    assert train.main(["--resume", str(b / "ckpt-000002"), "--eval-every", "2"]) == 0
    ta, _, ma = load_checkpoint(a, "latest")
    tb, _, mb = load_checkpoint(b, "latest")
    assert ma["step"] == mb["step"] == 4 and ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert mb["args"]["eval_every"] == 2 and mb["args"]["val_batches"] == 2
