"""reproduce.sh: the demo study end to end (a smaller slice), its report, its figures, and resuming
it."""

import csv
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = (
    "## The claim, side by side",
    "## Table 2: skipping by variant",
    "## Table 5: perplexity",
    "## Controls at matched compute",
    "## The length confound",
    "## Wall-clock against its bound",
    "## Task accuracy",
    "## What these numbers can and cannot support",
    "## Figures",
    "## How it was made",
)
FIGURES = ("gates_heatmap", "training_curves", "differential_forest", "skip_vs_length")
REAL_SECTIONS = (  # the sections a real study adds (issue 28)
    "## Does a differential emerge over training?",
    "## Task accuracy: what does skipping cost in answers?",
    "## Is the learned routing worth its routers?",
    "## What drives the routers?",
    "## The learning curve (LoRA alone, every block open)",
    "## What the evaluation cost",
)
REAL_FIGURES = ("differential_over_training", "gates_over_training", "learning_curve")


def study_cmd(out):
    return [
        "bash",
        str(ROOT / "reproduce.sh"),
        "--demo",
        "--out",
        str(out),
        "--seeds",
        "1 2",
        "--variants",
        "paper noreg",
        "--steps",
        "8",
    ]


def env():
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
        "PYTHON": os.environ.get("PYTHON", "python"),
    }


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("study") / "demo"
    res = subprocess.run(study_cmd(out), env=env(), capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return out, res.stdout


def test_demo_study_writes_every_section_and_figure(study):
    out, stdout = study
    assert (
        re.search(r"\[4/4\] noreg\s+seed 2\s+done in", stdout)
        and f"report: {out}/REPORT.md" in stdout
    )
    report = (out / "REPORT.md").read_text()
    for section in SECTIONS:
        assert section in report, f"REPORT.md lacks '{section}'"
    for f in FIGURES:
        png = out / "figures" / f"{f}.png"
        assert png.exists() and png.read_bytes()[:4] == b"\x89PNG" and f"figures/{f}.png" in report
    for name in ("claim", "table2", "table5", "controls", "length_confound", "gates", "seeds"):
        assert (out / "tables" / f"{name}.csv").exists()
    assert (
        "authors' code, 10 seeds (quoted from docs/reference.md" in report
        and "-5.71 (8.37)" in report
    )
    assert "train.py --out" in report and "eval.py --ckpt" in report, (
        "the commands are in the report"
    )


def test_report_numbers_are_the_runs_eval_json_numbers(study):
    out, _ = study
    s = json.loads((out / "study.json").read_text())
    assert {r["variant"] for r in s["runs"]} == {"paper", "noreg"} and len(s["runs"]) == 4
    report = (out / "REPORT.md").read_text()
    for v in ("paper", "noreg"):
        evals = [json.loads((out / r["eval"]).read_text()) for r in s["runs"] if r["variant"] == v]
        diffs = [e["skip_diff"] for e in evals]
        assert s["variants"][v]["diff"]["mean"] == pytest.approx(np.mean(diffs))
        tool = np.mean([e["skip_pct"]["tool"] for e in evals])
        row = next(line for line in report.splitlines() if line.startswith(f"| minroute `{v}`"))
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[1].startswith(f"{tool:.2f} [") and cells[3].startswith(
            f"{np.mean(diffs):.2f} ["
        )
        ppl = np.mean([e["ppl"]["tool"]["gated"] for e in evals])
        assert f"→ {ppl:.3f} [" in cells[4]


def test_rerun_resumes_and_skips_finished_work(study, tmp_path):
    out, _ = study
    before = {p: p.stat().st_mtime for p in (out / "runs").rglob("eval.json")}
    one = out / "runs" / "noreg-s1" / "eval.json"
    one.unlink()
    first_log = (out / "runs" / "paper-s1.train.log").read_text()
    res = subprocess.run(study_cmd(out), env=env(), capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    after = {p: p.stat().st_mtime for p in (out / "runs").rglob("eval.json")}
    assert set(after) == set(before) and all(after[p] == before[p] for p in before if p != one), (
        "finished evaluations must be kept"
    )
    steps = [
        json.loads((out / "runs" / f"{v}-s{s}" / "latest.json").read_text())["step"]
        for v in ("paper", "noreg")
        for s in (1, 2)
    ]
    assert steps == [8] * 4
    # the resumed run's log keeps its first part and adds the resume's
    log = (out / "runs" / "paper-s1.train.log").read_text()
    assert log.startswith(first_log) and "resumed" in log[len(first_log) :], log[-500:]
    bad = subprocess.run(
        [
            "bash",
            str(ROOT / "reproduce.sh"),
            "--demo",
            "--out",
            str(tmp_path / "x"),
            "--variants",
            "paper nope",
        ],
        env=env(),
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert bad.returncode == 2 and bad.stderr.startswith(
        "error: --variants: unknown variant 'nope'"
    )


def test_a_failing_run_is_named_and_the_rest_go_on(study):
    out, _ = study
    bad = out / "runs" / "noreg-s2"
    # a damaged checkpoint: the resume refuses it, so training fails
    for ckpt in bad.glob("ckpt-*"):
        (ckpt / "adapter.safetensors").write_bytes(b"damaged")
    # its old eval.json stays: the report must not count a run that failed to resume from it
    res = subprocess.run(study_cmd(out), env=env(), capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 1 and "1 of 4 runs failed: noreg-s2" in res.stderr
    assert re.search(r"\[4/4\] noreg\s+seed 2\s+FAILED in training", res.stdout)
    assert re.search(r"\[3/4\] noreg\s+seed 1\s+done", res.stdout)
    s = json.loads((out / "study.json").read_text())
    assert len(s["runs"]) == 3 and s["left_out"][0]["run"].endswith("noreg-s2")
    assert "**Left out:**" in (out / "REPORT.md").read_text()


def test_real_cpu_quick_study(tmp_path):
    """bash reproduce.sh --real-cpu --quick on the real SmolLM2 GGUF and real BFCL + GSM8K (skipped
    without them): every section is there, and each section's numbers are the runs' eval.json,
    train_log.csv and curve numbers.
    """
    gguf, data = os.environ.get("MINROUTE_GGUF"), os.environ.get("MINROUTE_DATA")
    if not gguf or not Path(gguf).is_file() or not data or not (Path(data) / "bfcl-v4").is_dir():
        pytest.skip("real model or data not available (set MINROUTE_GGUF and MINROUTE_DATA)")
    pytest.importorskip("matplotlib")
    out = tmp_path / "quick"
    cmd = ["bash", str(ROOT / "reproduce.sh"), "--real-cpu", "--quick", "--out", str(out)]
    cmd += ["--variants", "paper lora-only", "--steps", "2"]
    res = subprocess.run(cmd, env=env(), capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    report = (out / "REPORT.md").read_text()
    for section in SECTIONS + REAL_SECTIONS:
        assert section in report, f"REPORT.md lacks '{section}'"
    for f in FIGURES + REAL_FIGURES:
        assert (out / "figures" / f"{f}.png").is_file(), f
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert set(manifest["sources"]) == {"bfcl", "gsm8k"} and manifest["cut_rows"] == "drop"
    assert manifest["loss_on"] == "assistant"
    assert json.loads((out / "model" / "conversion.json").read_text())["architecture"] == "llama"
    ev = json.loads((out / "runs" / "paper-s1" / "eval.json").read_text())
    lo = json.loads((out / "runs" / "lora-only-s1" / "eval.json").read_text())
    study = json.loads((out / "study.json").read_text())
    # the claim
    row = next(line for line in report.splitlines() if line.startswith("| minroute `paper`"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[1] == f"{ev['skip_pct']['tool']:.2f} (1 seed)" and cells[3].startswith(
        f"{ev['skip_diff']:.2f} (1 seed)"
    )
    # answers: each cell is k/n of the run's scored generations
    s = ev["tasks"]["summary"]
    assert set(s) == {"base", "full", "gated", "static mask", "random mask"}
    for method, label in (("gated", "gated (learned routing)"), ("static mask", "static mask")):
        rows = [x for x in ev["tasks"]["samples"] if x["method"] == method]
        tool = [x for x in rows if x["step_type"] == "tool_call"]
        k = sum(x["bfcl"] for x in tool)
        line = next(x for x in report.splitlines() if x.startswith(f"| `paper` | {label}"))
        assert f"{100 * k / len(tool):.1f} ({k}/{len(tool)})" in line.split("|")[3], line
        assert s[method]["tool"]["bfcl"] == pytest.approx(100 * k / len(tool))
    assert lo["tasks"]["summary"]["gated"] == lo["tasks"]["summary"]["full"]
    line = next(x for x in report.splitlines() if x.startswith("| `lora-only` | LoRA alone"))
    k = sum(x["bfcl"] for x in lo["tasks"]["samples"] if x["method"] == "full" and "bfcl" in x)
    assert f"({k}/" in line.split("|")[3]
    # the routing against its masks: dCE is eval.json's
    line = next(x for x in report.splitlines() if x.startswith("| `paper-s1` |") and "/" in x)
    assert f"{ev['controls']['static mask']['dce_vs_learned']:+.3f}" in line
    # over training: the validation differential is train_log's
    log = list(csv.DictReader(open(out / "runs" / "paper-s1" / "train_log.csv")))
    val = [x for x in log if x["val_ce"]]
    d = float(val[-1]["val_skip_tool"]) - float(val[-1]["val_skip_plan"])
    got = study["differential_over_training"]["runs/paper-s1"]["validation"][val[-1]["step"]]
    assert got["diff"] == pytest.approx(d)
    assert f"| {val[-1]['step']} | {d:+.1f}" in report
    # gradient norms: the medians of train_log's columns
    g = study["gradient_norms"]["runs/paper-s1"]
    lora = [float(x["grad_lora"]) for x in log if x["ce"]]
    assert g["median"]["lora"] == pytest.approx(float(np.median(lora)))
    # the learning curve: the LoRA-only run's kept checkpoint, scored alone
    cj = json.loads((out / "curves" / "lora-only-s1" / "update-000002.json").read_text())
    assert cj["settings"]["tasks_only"] and cj["step"] == 2
    pt = study["learning_curve"]["lora-only-s1"]
    k = sum(x["bfcl"] for x in cj["tasks"]["samples"] if x["method"] == "full" and "bfcl" in x)
    assert pt["2"]["bfcl"]["k"] == k and pt["0"]["bfcl"]["n"] == pt["2"]["bfcl"]["n"]
    assert ev["seconds"]["passes"] > 0 and ev["seconds"]["floor"] > 0
    assert study["runs"][-1]["eval"].endswith("paper-s1/eval.json")


# ----------------------------------------------------------------------------- a study under a
# hostile user (issue 23)


def rerun(out, *extra):
    """A study of two runs (paper, seeds 1 and 2): each case below needs one run to damage and one
    to compare."""
    cmd = study_cmd(out)
    cmd[cmd.index("--variants") + 1] = "paper"
    return subprocess.run(cmd + list(extra), env=env(), capture_output=True, text=True, cwd=ROOT)


def test_study_numbers_survive_a_hostile_user(tmp_path):
    """Each BAD case of the black-box probe, as a user types it, on a study of its own."""
    import shutil

    out = tmp_path / "s"
    res = rerun(out)
    assert res.returncode == 0, res.stderr[-2000:]
    runs = out / "runs"
    # 5: a backup copy of a run is not a third seed
    shutil.copytree(runs / "paper-s1", runs / "paper-s1.bak")
    # 7: a damaged eval.json is redone, never skipped
    (runs / "paper-s2" / "eval.json").write_text('{"skip_diff": 1.0, "trunc')
    # 8: an ad-hoc evaluation into a study run (another checkpoint choice) is not the study's number
    adhoc = subprocess.run(
        [
            os.environ.get("PYTHON", "python"),
            str(ROOT / "eval.py"),
            "--ckpt",
            str(runs / "paper-s1"),
            "--which",
            "best",
            "--no-timing",
            "--floor-every",
            "0",
        ],
        env=env(),
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert adhoc.returncode == 0, adhoc.stderr[-2000:]
    assert json.loads((runs / "paper-s1" / "eval.json").read_text())["settings"]["which"] == "best"
    res = rerun(out)
    assert res.returncode == 0, res.stderr[-2000:]
    s = json.loads((out / "study.json").read_text())
    assert sorted(Path(r["run"]).name for r in s["runs"]) == ["paper-s1", "paper-s2"]
    assert [Path(x["run"]).name for x in s["left_out"]] == ["paper-s1.bak"] and "counted once" in s[
        "left_out"
    ][0]["why"]
    assert (
        json.loads((runs / "paper-s2" / "eval.json").read_text())["settings"]["which"] == "latest"
    )
    assert (
        json.loads((runs / "paper-s1" / "eval.json").read_text())["settings"]["which"] == "latest"
    ), "the study re-evaluated the run its own way"
    shutil.rmtree(runs / "paper-s1.bak")
    # 6 and 10: asked for more steps, the runs are extended and re-evaluated; the report follows
    # them
    res = rerun(out, "--steps", "10")
    assert res.returncode == 0, res.stderr[-2000:]
    for r in json.loads((out / "study.json").read_text())["runs"]:
        ev = json.loads((out / r["eval"]).read_text())
        assert (
            ev["step"] == 10
            and json.loads((out / r["run"] / "latest.json").read_text())["step"] == 10
        )
    # 10: a run whose eval.json is older than its checkpoint is left out by the report, named
    ev = json.loads((runs / "paper-s2" / "eval.json").read_text())
    ev["checkpoint"] = "ckpt-000008"  # as if made for an older checkpoint: its adapter's content
    ev["provenance"]["checkpoint_sha256"]["adapter.safetensors"] = "0" * 64
    (runs / "paper-s2" / "eval.json").write_text(json.dumps(ev))
    report = subprocess.run(
        [os.environ.get("PYTHON", "python"), str(ROOT / "eval.py"), "--report", str(out)],
        env=env(),
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert report.returncode == 0
    left = json.loads((out / "study.json").read_text())["left_out"]
    assert [Path(x["run"]).name for x in left] == ["paper-s2"] and "re-evaluate it" in left[0][
        "why"
    ]


def test_study_paths_and_interrupts(tmp_path):
    """A relative --out is the user's folder; a study folder cannot be a data folder or a run."""
    rel = subprocess.run(
        [
            "bash",
            str(ROOT / "reproduce.sh"),
            "--demo",
            "--out",
            "mine",
            "--variants",
            "noreg",
            "--seeds",
            "1",
            "--steps",
            "1",
        ],
        env=env(),
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert rel.returncode == 0, rel.stderr[-2000:]
    assert (tmp_path / "mine" / "REPORT.md").exists() and not (ROOT / "mine").exists()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text("{}")
    bad = subprocess.run(
        ["bash", str(ROOT / "reproduce.sh"), "--demo", "--out", "data"],
        env=env(),
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and "data folder or a run" in bad.stderr
    script = (ROOT / "reproduce.sh").read_text()
    assert "trap " in script and "INT" in script, (
        "Ctrl-C must stop the study, not go on with the next run"
    )
