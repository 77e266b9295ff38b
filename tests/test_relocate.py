"""A study and a run are portable: moved, copied or re-reported elsewhere they keep their report,
resume, extend and evaluate; their records hold no machine paths; inputs outside them are found by
path and checked by content. And the rough edges of the last hostile-user run, each typed as a user
types it.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def env():
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": path}


def sh(*cmd, cwd):
    return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=900)


def py(*argv, cwd):
    return sh(sys.executable, *argv, cwd=cwd)


def one_error(res, *needles):
    lines = [ln for ln in res.stderr.strip().splitlines() if not ln.startswith("note: ")]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-2000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def study_cmd(out, steps=4):
    return (
        "bash",
        str(ROOT / "reproduce.sh"),
        "--demo",
        "--out",
        str(out),
        "--variants",
        "paper",
        "--seeds",
        "1 2",
        "--steps",
        str(steps),
    )


def without_commands(report: str) -> str:
    """REPORT.md less its copy of commands.log (which a re-run appends to)."""
    head, _, rest = report.partition("Commands, in order")
    return head + rest.split("```", 2)[-1]


def snapshot(study: Path) -> dict:
    """The bytes of every checkpoint tensor and eval.json: what a no-op re-run must not touch."""
    return {
        str(p.relative_to(study)): p.read_bytes()
        for p in sorted(study.rglob("*"))
        if p.is_file() and (p.suffix == ".safetensors" or p.name == "eval.json")
    }


@pytest.fixture(scope="module")
def moved_study(tmp_path_factory):
    """A finished demo study, moved after it ran."""
    work = tmp_path_factory.mktemp("relocate")
    r = sh(*study_cmd(work / "st"), cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    report = (work / "st" / "REPORT.md").read_text()
    os.rename(work / "st", work / "st2")
    return work, report


def test_study_records_no_machine_paths(moved_study):
    work, _ = moved_study
    st = work / "st2"
    for name in ("REPORT.md", "commands.log", "study.json", "tables/seeds.csv", "failed.txt"):
        text = (st / name).read_text()
        assert str(work) not in text and "/tmp/" not in text, (name, text[:500])
    for ev in st.glob("runs/*/eval.json"):
        assert str(work) not in ev.read_text(), ev


def test_moved_study_reports_and_reruns_as_a_noop(moved_study):
    work, report = moved_study
    st = work / "st2"
    r = py(str(ROOT / "eval.py"), "--report", str(st), cwd=work)
    assert r.returncode == 0 and "2 runs, 0 left out" in r.stdout, r.stdout + r.stderr
    assert (st / "REPORT.md").read_text() == report, "the moved study's report must be the same"
    before = snapshot(st)
    r = sh(*study_cmd(st), cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    assert snapshot(st) == before, "re-running the same command trained or evaluated again"
    assert without_commands((st / "REPORT.md").read_text()) == without_commands(report)


def test_moved_study_extends_and_a_copy_evaluates_and_resumes(moved_study, tmp_path):
    work, _ = moved_study
    st3 = tmp_path / "copy"
    shutil.copytree(work / "st2", st3)  # cp -r: new mtimes, new place
    r = sh(*study_cmd(st3, steps=6), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for s in (1, 2):
        assert json.loads((st3 / f"runs/paper-s{s}/latest.json").read_text())["step"] == 6
    r = py(str(ROOT / "eval.py"), "--report", str(st3), cwd=tmp_path)
    assert "2 runs, 0 left out" in r.stdout, r.stdout + r.stderr
    out = tmp_path / "elsewhere"
    out.mkdir()
    r = py(
        str(ROOT / "eval.py"),
        "--ckpt",
        str(st3 / "runs/paper-s1"),
        "--no-timing",
        "--json",
        str(out / "e.json"),
        "--csv",
        str(out / "csv"),
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "gates_per_layer.png").exists() or "matplotlib" in r.stdout + r.stderr
    r = py(
        str(ROOT / "train.py"), "--resume", str(st3 / "runs/paper-s1"), "--steps", "8", cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((st3 / "runs/paper-s1/latest.json").read_text())["step"] == 8


@pytest.fixture(scope="module")
def outside_run(tmp_path_factory, demo_run):
    """A run whose data and model lie outside its folder (copies of the demo's)."""
    work = tmp_path_factory.mktemp("outside")
    shutil.copytree(demo_run / "demo-data", work / "data")
    shutil.copytree(demo_run / "demo-model", work / "model")
    r = py(
        str(ROOT / "train.py"),
        "--data",
        "data",
        "--model",
        "model",
        "--out",
        "a/run",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--accum",
        "1",
        "--eval-every",
        "2",
        "--val-batches",
        "1",
        "--device",
        "cpu",
        cwd=work,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return work


def test_moved_run_finds_outside_inputs_by_path_and_checks_their_content(outside_run, demo_run):
    work = outside_run
    os.rename(work / "a", work / "b")
    r = py(str(ROOT / "eval.py"), "--ckpt", "b/run", "--no-timing", cwd=work)  # recorded path
    assert r.returncode == 0, r.stderr[-3000:]
    os.rename(work / "data", work / "data-moved")
    one_error(py(str(ROOT / "eval.py"), "--ckpt", "b/run", cwd=work), "its data was", "--data")
    one_error(py(str(ROOT / "train.py"), "--resume", "b/run", "--steps", "3", cwd=work), "--data")
    other = work / "other-data"
    shutil.copytree(work / "data-moved", other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["seed"] = 7  # another data folder: another identity
    (other / "manifest.json").write_text(json.dumps(manifest))
    one_error(
        py(
            str(ROOT / "train.py"),
            "--resume",
            "b/run",
            "--steps",
            "3",
            "--data",
            str(other),
            cwd=work,
        ),
        "holds other content",
    )
    r = py(
        str(ROOT / "train.py"),
        "--resume",
        "b/run",
        "--steps",
        "3",
        "--data",
        "data-moved",
        cwd=work,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((work / "b/run/ckpt-000003/meta.json").read_text())
    assert meta["inputs"]["data"]["path"] == str((work / "data-moved").resolve())


# ----------------------------------------------------------------------------- rough edges


def test_meta_json_of_the_wrong_type_is_one_error_line(outside_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(next(outside_run.glob("*/run")), run)
    ckpt = sorted(run.glob("ckpt-*"))[-1]
    (ckpt / "meta.json").write_text("[1, 2, 3]")
    one_error(
        py(str(ROOT / "train.py"), "--resume", str(run), cwd=tmp_path), "meta.json", "corrupt"
    )
    one_error(py(str(ROOT / "eval.py"), "--ckpt", str(run), cwd=tmp_path), "meta.json", "corrupt")


def test_train_log_that_is_not_utf8_does_not_stop_a_resume(outside_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(next(outside_run.glob("*/run")), run)
    log = run / "train_log.csv"
    good = log.read_bytes()
    log.write_bytes(good + b"\xff\xfe garbage \x80\n")
    r = py(str(ROOT / "train.py"), "--resume", str(run), "--steps", "4", cwd=tmp_path)
    assert r.returncode == 0 and "not UTF-8" in r.stderr, r.stderr[-3000:]
    assert list(run.glob("train_log.csv.unreadable-*")), "the damaged log is kept"
    assert log.read_text().startswith(good.decode().splitlines()[0])


def test_stale_build_folders_of_dead_processes_are_removed(tmp_path, demo_run):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    stale = tmp_path / f".d.building-{dead}"
    (stale / "train").mkdir(parents=True)
    alive = tmp_path / f".d.building-{os.getpid()}"  # a live process's: left alone
    alive.mkdir()
    src = ROOT / "data_prep" / "demo"
    r = py(
        "-m",
        "data_prep",
        "--source-dir",
        str(src),
        "--tokenizer",
        str(demo_run / "demo-model"),
        "--sources",
        "gsm8k=20,hermes=20",
        "--eval-counts",
        "tool=2,planning=2",
        "--out",
        str(tmp_path / "d"),
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert not stale.exists() and alive.exists()
    assert f"removed {stale}" in r.stdout + r.stderr


def test_token_ids_outside_the_vocabulary_are_refused_before_a_forward(tmp_path, demo_run):
    import numpy as np

    data = tmp_path / "data"
    shutil.copytree(demo_run / "demo-data", data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest.pop("tokenizer_sha256", None)  # a manifest that predates the tokenizer hash
    manifest.pop("files", None)
    (data / "manifest.json").write_text(json.dumps(manifest))
    ids = np.load(data / "eval" / "ids.npy")
    ids[3] = 10**6
    np.save(data / "eval" / "ids.npy", ids)
    res = py(
        str(ROOT / "eval.py"),
        "--ckpt",
        str(demo_run),
        "--data",
        str(data),
        "--no-timing",
        "--json",
        str(tmp_path / "e.json"),
        "--csv",
        str(tmp_path / "c"),
        cwd=tmp_path,
    )
    one_error(res, "outside the vocabulary", "--tokenizer")


def test_checkpoint_without_trained_rows_on_other_data_needs_a_flag(tmp_path, demo_run):
    run = tmp_path / "run"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("demo-*"))
    for ck in run.glob("ckpt-*"):
        meta = json.loads((ck / "meta.json").read_text())
        meta["files"].pop("trained_rows.txt", None)
        (ck / "meta.json").write_text(json.dumps(meta))
        (ck / "trained_rows.txt").unlink()
    other = tmp_path / "other"
    shutil.copytree(demo_run / "demo-data", other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["seed"] = 7
    (other / "manifest.json").write_text(json.dumps(manifest))
    common = (
        "--ckpt",
        str(run),
        "--data",
        str(other),
        "--model",
        str(demo_run / "demo-model"),
        "--no-timing",
        "--json",
        str(tmp_path / "e.json"),
        "--csv",
        str(tmp_path / "c"),
    )
    one_error(py(str(ROOT / "eval.py"), *common, cwd=tmp_path), "--unverified-held-out")
    r = py(str(ROOT / "eval.py"), *common, "--unverified-held-out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "gates_per_layer.png").exists() or "matplotlib" in r.stdout + r.stderr
    assert not (run / "gates_per_layer.png").exists(), "the figure goes beside --json, not the run"
