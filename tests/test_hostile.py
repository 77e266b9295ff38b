"""train.py and the chat command under a hostile user (issue 23's WEAK classes), one test per class,
each case typed as a user types it: a subprocess, exit code 2, one `error: ...` line on stderr, no
traceback, and nothing on disk changed where it should not. Where a message advises a command, the
test runs that command.
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minroute.run.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "train.py")


def env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run(argv, cwd, stdin=None, patch=None):
    """`python train.py ARGV` (or `python -m minroute.evaluation.generate ...` when argv starts with
    -m) in cwd; with `patch`, Python code run first, to simulate what a test cannot make happen (a
    full disk, a NaN).
    """
    if patch:
        launcher = (
            f"import runpy, sys\n{patch}\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0],"
            " run_name='__main__')"
        )
        cmd = [sys.executable, "-c", launcher, TRAIN, *argv]
    else:
        cmd = [sys.executable, *(argv if argv[0] == "-m" else [TRAIN, *argv])]
    return subprocess.run(
        cmd, cwd=cwd, env=env(), capture_output=True, input=stdin, timeout=600, check=False
    )


def err(res) -> str:
    return res.stderr.decode("utf-8", "replace")


def one_error(res, *needles):
    """Exit code 2, stderr exactly one `error: ...` line (notes aside), no traceback, each needle in
    it."""
    text = err(res)
    lines = [ln for ln in text.strip().splitlines() if not ln.startswith("note: ")]
    assert res.returncode == 2 and "Traceback" not in text, text[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), text[-2000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def tree(root: Path) -> dict:
    """Every file (bytes) and folder under root, lock files aside: what a refused command must not
    change."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.name == ".lock":
            continue
        rel = str(p.relative_to(root))
        out[rel] = (
            p.read_bytes()
            if p.is_file() and not p.is_symlink()
            else ("link" if p.is_symlink() else "dir")
        )
    return out


def advised(message: str, tool: str = "python train.py") -> list[str]:
    """The command a message advises, as argv after `python`: what the user would type next."""
    m = re.search(re.escape(tool) + r" (.*?)(?=  \(|; |$)", message)
    assert m, f"no `{tool} ...` advice in: {message}"
    argv = shlex.split(m.group(1))
    return argv if tool == "python train.py" else ["-m", "minroute.evaluation.generate", *argv]


def final_adapter(run_dir):
    adapter, _, meta = load_checkpoint(run_dir, "latest")
    return adapter, meta


@pytest.fixture(scope="module")
def assets(demo_run):
    return demo_run / "demo-model", demo_run / "demo-data"


def small(assets, out, *extra, steps=4):
    model, data = assets
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
        "4",
        "--accum",
        "1",
        "--lr",
        "3e-3",
        "--eval-every",
        "100",
        "--val-batches",
        "1",
        "--log-every",
        "1",
        "--save-every",
        "2",
        "--device",
        "cpu",
        *extra,
    ]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, assets):
    """A finished 4-update run (ckpt-000004 = latest = best) to copy."""
    out = tmp_path_factory.mktemp("base") / "run"
    res = run(small(assets, out), cwd=out.parent)
    assert res.returncode == 0, err(res)
    return out


def read_only(folder: Path):
    """Make folder unwritable, also for root (chattr +i); None where this machine cannot."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    if (
        shutil.which("chattr")
        and subprocess.run(
            ["chattr", "+i", str(folder)], capture_output=True, check=False
        ).returncode
        == 0
    ):
        return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)
    return None


# ----------------------------------------------------------------------------- OS errors

ENOSPC_AT_2 = """
import minroute.run.checkpoint as ck
from safetensors import SafetensorError
real = ck.save_file
def save_file(tensors, path, *a, **k):
    if 'ckpt-000002' in path:  # what safetensors raises on a full disk
        open(path, 'wb').write(b'partial')
        raise SafetensorError(
            'Error while serializing: I/O error: No space left on device (os error 28)'
        )
    return real(tensors, path, *a, **k)
ck.save_file = save_file
"""


def test_os_errors_are_one_line_naming_the_path_and_the_cause(tmp_path, assets, demo_run):
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    cases = [  # (argv, what the line must say)
        (small(assets, "afile/run"), ["--out afile/run", f"{tmp_path / 'afile'} is a file"]),
        (small(assets, "afile"), ["--out afile: is a file"]),
        (small(assets, "dangling"), ["--out dangling: a symbolic link to", "which does not exist"]),
        (small(assets, "dangling/run"), ["dangling is a symbolic link to", "does not exist"]),
        (
            ["--demo", "--demo-assets", "afile/assets", "--out", "demo"],
            ["afile", "Not a directory"],
        ),
    ]
    undo = read_only(tmp_path / "ro")
    if undo:
        cases.append((small(assets, "ro/run"), ["--out ro/run", "is not writable"]))
    try:
        for argv, needles in cases:
            before = tree(tmp_path)
            one_error(run(argv, cwd=tmp_path), *needles)
            assert tree(tmp_path) == before, f"{argv} changed the disk"
    finally:
        if undo:
            undo()

    # a full disk while checkpointing: the half-written checkpoint is removed, the earlier one is
    # intact, and the advised command (once there is space again) finishes the run exactly
    out = tmp_path / "full"
    line = one_error(
        run(small(assets, "full", steps=6), cwd=tmp_path, patch=ENOSPC_AT_2),
        "error: full/ckpt-000002.tmp/adapter.safetensors: cannot write the checkpoint of update 2"
        " (No space left on device)",
        "then continue the run: python train.py --resume full",
    )
    assert not list(out.glob("*.tmp")), (
        "the half-written checkpoint must not stay (it holds the space)"
    )
    assert (
        not (out / "ckpt-000002").exists()
        and json.loads((out / "run.json").read_text())["args"]["steps"] == 6
    )
    res = run(advised(line), cwd=tmp_path)
    assert res.returncode == 0, err(res)
    whole = tmp_path / "whole"
    assert run(small(assets, "whole", steps=6), cwd=tmp_path).returncode == 0
    a, meta = final_adapter(out)
    b, _ = final_adapter(whole)
    assert meta["step"] == 6 and all(torch.equal(a[k], b[k]) for k in a), (
        "the resumed run must equal an unbroken one"
    )

    # the chat command: unreadable inputs are named; a closed stdout ends quietly
    (tmp_path / "ckpt-link").symlink_to(tmp_path / "gone")
    for argv, needles in (
        (
            ["--ckpt", str(demo_run), "--prompt", "hi", "--tools", str(tmp_path)],
            ["--tools", "Is a directory"],
        ),
        (
            ["--ckpt", str(tmp_path / "ckpt-link"), "--prompt", "hi"],
            ["ckpt-link", "no such folder"],
        ),
        (["--ckpt", str(tmp_path / "afile"), "--prompt", "hi"], ["afile", "no latest.json"]),
    ):
        one_error(run(["-m", "minroute.evaluation.generate", *argv], cwd=tmp_path), *needles)
    chat = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "minroute.evaluation.generate",
            "--ckpt",
            str(demo_run),
            "--prompt",
            "hi",
            "--max-new-tokens",
            "200",
            "--temperature",
            "1",
        ],
        cwd=tmp_path,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    chat.stdout.read(1)
    chat.stdout.close()  # `| head -c 1`
    assert chat.wait(timeout=300) in (0, 141)
    assert "Traceback" not in chat.stderr.read().decode()


def test_a_full_disk_while_logging_is_one_line(tmp_path):
    from minroute.run.log import RunLog
    from minroute.run.safety import WriteError

    log = RunLog(tmp_path, 0)

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, s):
            raise OSError(28, "No space left on device")

        def __getattr__(self, k):
            return getattr(self.f, k)

    log.log_f = Full(log.log_f)
    log.log = __import__("csv").DictWriter(log.log_f, RunLog.FIELDS)
    with pytest.raises(
        WriteError,
        match=r"train_log.csv: cannot write the run's log \(No space left on device\).*"
        rf"python train.py --resume {tmp_path}$",
    ):
        log.write({"step": 1})
    log.close()


# ----------------------------------------------------------------------------- numbers


def test_numbers_are_checked_before_anything_is_written(tmp_path, assets, base_run, demo_run):
    run_copy = tmp_path / "old"
    shutil.copytree(base_run, run_copy)
    # (extra options, what the line says, also over a run that --restart would move aside)
    cases = [
        (["--seed", "-1"], "--seed: '-1': must be a whole number from 0 to 4294967295", False),
        (["--seed", str(2**32)], "must be a whole number from 0 to 4294967295", False),
        (
            ["--seed", "\uff14\uff12"],
            "is not a whole number",
            False,
        ),  # full-width digits, which int() takes
        (["--steps", "\u0663"], "--steps: '\u0663' is not a whole number", False),  # Arabic-Indic 3
        (["--lr", "nan"], "--lr: 'nan': must be a number > 0", False),
        (["--sort-by-length", "2"], "--sort-by-length: invalid choice", False),
        (
            ["--weight-decay", "1e4"],
            "--weight-decay 10000 with --lr 0.003: each update would scale every weight",
            True,
        ),
        (["--min-lr", "1"], "--min-lr 1 is above --lr 0.003", True),
        (
            ["--warmup", "9", "--t-max", "3"],
            "--warmup 9 is not shorter than the cosine's 3 updates",
            True,
        ),
        (
            ["--pad-to", "99999999999999999999"],
            "--pad-to 99999999999999999999 is longer than the context",
            True,
        ),
        (["--lora-r", "1000000"], "--lora-r 1000000 is above the hidden size", True),
        (["--accum", "99999999999999999999"], "sequences per update, more than the", True),
    ]
    for extra, needle, also_restart in cases:
        for out, restart in (("new", []), ("old", ["--restart"]))[: 1 + also_restart]:
            before = tree(tmp_path)
            one_error(run(small(assets, out) + extra + restart, cwd=tmp_path), needle)
            assert tree(tmp_path) == before, f"{extra} {restart} changed the disk"
    # inputs checked before the folder is made, or the old run moved aside
    for argv, needle in (
        (small(assets, "new") + ["--data", str(tmp_path / "nodata")], "data directory not found"),
        (small(assets, "old") + ["--data", str(tmp_path / "nodata"), "--restart"], "not found"),
        (small(assets, "old") + ["--model", str(tmp_path / "nomodel"), "--restart"], "nomodel"),
    ):
        before = tree(tmp_path)
        one_error(run(argv, cwd=tmp_path), needle)
        assert tree(tmp_path) == before and not list(tmp_path.glob("old.replaced-*"))
    # the largest seed runs (the seeds derived from it fit numpy's and torch's generators)
    res = run(small(assets, "big-seed", steps=1) + ["--seed", str(2**32 - 1)], cwd=tmp_path)
    assert res.returncode == 0, err(res)

    # the chat command: every number checked up front; any temperature > 0 samples (1e-45: the
    # argmax)
    chat = [
        "-m",
        "minroute.evaluation.generate",
        "--ckpt",
        str(demo_run),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "4",
    ]
    for extra, needle in (
        (["--temperature", "-1"], "--temperature: '-1': must be a number >= 0"),
        (["--temperature", "nan"], "must be a number >= 0"),
        (["--top-p", "1.5"], "--top-p: '1.5': must be a number in (0, 1]"),
        (["--top-k", "-1"], "--top-k: '-1': must be a whole number >= 0"),
        (["--max-new-tokens", "\u0664"], "is not a whole number"),
    ):
        one_error(run(chat + extra, cwd=tmp_path), needle)
    greedy = run(chat, cwd=tmp_path)
    assert greedy.returncode == 0, err(greedy)
    for extra in (
        ["--temperature", "1e-45"],
        ["--temperature", "5e-324", "--top-p", "1e-300", "--top-k", "99999999999999999999999"],
    ):
        res = run(chat + extra, cwd=tmp_path)
        assert res.returncode == 0 and "Traceback" not in err(res), err(res)
        assert res.stdout.split(b"[gates")[0] == greedy.stdout.split(b"[gates")[0], (
            "a tiny temperature is the argmax"
        )


def test_sampling_survives_extreme_temperatures():
    from minroute.evaluation.generate import sample_next

    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0 - 1e-3], [0.0, -5.0, 7.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    for t in (1e-45, 5e-324, 1e-300):
        assert sample_next(logits, t, generator=g).tolist() == [1, 2]
        assert sample_next(logits, t, top_k=2, top_p=0.5, generator=g).tolist() == [1, 2]
    draws = {int(sample_next(logits, 1e308, generator=g)[0]) for _ in range(200)}
    assert draws == {0, 1, 2, 3}, "a huge temperature is uniform"


# ----------------------------------------------------------------------------- advice that can be
# followed


def kill_when(argv, cwd, ready, what):
    proc = subprocess.Popen(
        [sys.executable, TRAIN, *argv],
        cwd=cwd,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ready(), f"the kill should land {what}"


NAN_AFTER_5 = """
import minroute.fast.kernels as L
real, calls = L.lm_loss_per_sample, [0]
def flaky(*a, **k):
    sums, counts = real(*a, **k)
    calls[0] += 1 if sums.requires_grad else 0
    return (sums * float('nan') if calls[0] > 5 else sums), counts
L.lm_loss_per_sample = flaky
"""


def test_every_advice_is_a_command_that_works(tmp_path, assets, base_run):
    def log_rows(run_dir):
        f = run_dir / "train_log.csv"
        return len(f.read_text().splitlines()) - 1 if f.exists() else 0

    # 1. a non-finite loss: the advice starts the run over with a lower --lr (a resume keeps its
    # --lr)
    line = one_error(
        run(small(assets, "nan", steps=8), cwd=tmp_path, patch=NAN_AFTER_5),
        "non-finite loss or gradient at update 5",
        "the last good checkpoint is",
        "A resumed run keeps its --lr",
    )
    argv = advised(line)
    assert "--restart" in argv and argv[argv.index("--lr") + 1] == "0.0003", argv
    res = run(argv, cwd=tmp_path)
    assert res.returncode == 0, err(res)
    assert final_adapter(tmp_path / "nan")[1]["args"]["lr"] == 0.0003
    assert len(list(tmp_path.glob("nan.replaced-*"))) == 1, (
        "the stopped run is moved aside, not deleted"
    )

    # 2. killed before its first checkpoint; 3. killed after a validation checkpoint, before its
    # first --save-every one: the rerun's advice (--resume) works, and the result equals an unbroken
    # run
    args = small(assets, "RUN", steps=12) + ["--save-every", "1000", "--eval-every", "4"]
    whole = tmp_path / "whole"
    assert run([a if a != "RUN" else str(whole) for a in args], cwd=tmp_path).returncode == 0
    for name, ready, what in (
        (
            "early",
            lambda d: log_rows(d) >= 2 and not (d / "best.json").exists(),
            "before the first checkpoint",
        ),
        (
            "after-best",
            lambda d: (d / "best.json").exists(),
            "after the first validation checkpoint",
        ),
    ):
        d = tmp_path / name
        argv = [a if a != "RUN" else name for a in args]
        kill_when(argv, tmp_path, lambda d=d, ready=ready: ready(d), what)
        assert not (d / "latest.json").exists()
        line = one_error(
            run(argv, cwd=tmp_path),
            f"{name} already holds a run",
            f"python train.py --resume {name}",
        )
        res = run(advised(line), cwd=tmp_path)
        assert res.returncode == 0, err(res)
        a, meta = final_adapter(d)
        b, _ = final_adapter(whole)
        assert meta["step"] == 12 and all(torch.equal(a[k], b[k]) for k in a), (
            f"{name}: resumed != unbroken"
        )

    # 4. latest.json names a missing checkpoint: resume takes the newest complete one (or, with none
    # left, says how to start over), and the chat command names the checkpoints it can use
    dangling = tmp_path / "dangling"
    shutil.copytree(base_run, dangling)
    (dangling / "latest.json").write_text(json.dumps({"dir": "ckpt-000009", "step": 9}))
    line = one_error(
        run(
            ["-m", "minroute.evaluation.generate", "--ckpt", str(dangling), "--prompt", "hi"],
            cwd=tmp_path,
        ),
        "latest.json names ckpt-000009, which is missing",
    )
    res = run(
        [
            "-m",
            "minroute.evaluation.generate",
            "--ckpt",
            re.search(r"instead \((\S+?)[,)]", line).group(1),
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
        ],
        cwd=tmp_path,
    )
    assert res.returncode == 0, err(res)
    res = run(["--resume", str(dangling), "--steps", "6"], cwd=tmp_path)
    assert res.returncode == 0 and "resumed" in res.stdout.decode() and "ckpt-000004" in err(res), (
        err(res)
    )
    # an unreadable latest.json on a finished run: the resume has no update left to
    broken = tmp_path / "broken"
    # run, and still leaves a pointer that eval and chat can follow
    shutil.copytree(base_run, broken)
    (broken / "latest.json").write_text("{broken")
    res = run(["--resume", str(broken)], cwd=tmp_path)
    assert res.returncode == 0 and "ckpt-000004" in err(res), err(res)
    assert json.loads((broken / "latest.json").read_text()) == {"dir": "ckpt-000004", "step": 4}
    gone = tmp_path / "gone"
    shutil.copytree(base_run, gone)
    shutil.rmtree(gone / "ckpt-000004")
    line = one_error(
        run(["--resume", "gone"], cwd=tmp_path),
        "gone/latest.json names ckpt-000004, which is missing",
        "start the run over: python train.py --out gone",
    )
    res = run(advised(line), cwd=tmp_path)
    assert res.returncode == 0 and final_adapter(gone)[1]["step"] == 4, err(res)

    # 5. --resume RUN/ckpt-000004 continues from that checkpoint (it used to take latest silently)
    two = tmp_path / "two"
    shutil.copytree(base_run, two)
    # ckpt-000008; 4 pruned
    assert run(["--resume", str(two), "--steps", "8"], cwd=tmp_path).returncode == 0
    at8, _ = final_adapter(two)
    # the run's own checkpoint at update 4, back
    shutil.copytree(base_run / "ckpt-000004", two / "ckpt-000004")
    res = run(["--resume", str(two / "ckpt-000004"), "--steps", "8"], cwd=tmp_path)
    assert (
        res.returncode == 0
        and "resumed" in res.stdout.decode()
        and "at update 4/8" in res.stdout.decode()
    ), err(res)
    assert "from ckpt-000004, as asked" in err(res)
    again, _ = final_adapter(two)
    assert all(torch.equal(again[k], at8[k]) for k in at8)

    # 6. a corrupt checkpoint: the advice (an earlier checkpoint, else start over) runs
    bad = tmp_path / "bad"
    shutil.copytree(base_run, bad)
    (bad / "ckpt-000004" / "adapter.safetensors").write_bytes(b"garbage")
    line = one_error(
        run(["--resume", "bad"], cwd=tmp_path),
        "size or sha256 does not match",
        "start the run over (it has no earlier checkpoint): python train.py --out bad",
    )
    res = run(advised(line), cwd=tmp_path)
    assert res.returncode == 0, err(res)

    # 7. a full disk while checkpointing: see test_os_errors_...; --out RUN/ckpt-*: its advice
    # resumes the run
    ck = tmp_path / "ck"
    shutil.copytree(base_run, ck)
    line = one_error(
        run(small(assets, "ck/ckpt-000004"), cwd=tmp_path), "is a checkpoint folder of the run ck"
    )
    res = run(advised(line), cwd=tmp_path)
    assert res.returncode == 0 and "resumed ck at update 4/4" in res.stdout.decode(), err(res)


def test_nonfinite_loss_before_any_update_does_not_blame_the_lr(tmp_path, assets, monkeypatch):
    import train

    real = train.lm_loss_per_sample

    def nan(*a, **k):
        sums, counts = real(*a, **k)
        return sums * float("nan"), counts

    monkeypatch.setattr(train, "lm_loss_per_sample", nan)
    with pytest.raises(
        train.UserError,
        match=r"at update 0 .*no checkpoint was written in .* yet\. The loss is not "
        r"finite before any update, so no --lr can help",
    ):
        train.main(small(assets, tmp_path / "r"))


def test_new_run_command_round_trips_the_settings(tmp_path, assets):
    """The command the messages advise starts exactly the run it describes (with the change)."""
    import train
    from minroute.run.resume import new_run_command
    from minroute.run.settings import resolve

    for extra in (
        [],
        ["--preset", "author", "--steps", "8", "--accum", "4"],
        ["--ablation", "noreg", "--t-max", "9"],
        ["--demo", "--demo-assets", "A"],
    ):
        argv = (
            small(assets, tmp_path / "r") + extra
            if "--demo" not in extra
            else ["--out", str(tmp_path / "r"), "--steps", "5"] + extra
        )
        args = train.parse_args(argv)
        args.updates = resolve(args)
        cmd = shlex.split(new_run_command(args, train.build_parser(), lr=1e-4))
        assert cmd[:2] == ["python", "train.py"] and cmd[-1] == "--restart"
        again = train.parse_args(cmd[2:])
        again.updates = resolve(again)

        def keep(n):
            return {k: v for k, v in vars(n).items() if k not in ("given", "restart", "lr")}

        assert keep(again) == keep(args) and again.lr == 1e-4, (cmd, extra)


# ----------------------------------------------------------------------------- folders that are not
# what they seem


def test_folders_that_are_not_what_they_seem_are_refused_by_name(
    tmp_path, assets, base_run, demo_run
):
    model, data = assets
    run_copy = tmp_path / "run"
    shutil.copytree(base_run, run_copy)
    data_copy = tmp_path / "data"
    shutil.copytree(data, data_copy)
    cases = [
        (small(assets, "data"), ["--out data: is a data folder (it holds manifest.json)"]),
        (
            small(assets, "run/ckpt-000004"),
            [
                "--out run/ckpt-000004: is a checkpoint folder of the run run",
                "python train.py --resume run/ckpt-000004",
            ],
        ),
        (small(assets, "run/ckpt-000009"), ["a ckpt-* folder inside the run run"]),
        (small(assets, "run/ckpt-000004/sub"), ["inside the checkpoint folder"]),
        (
            ["--demo", "--data", str(data), "--out", "d"],
            [f"--data {data} with --demo", "drop --data"],
        ),
        (
            ["--demo", "--model", str(model), "--out", "d"],
            [f"--model {model} with --demo", "drop --model"],
        ),
        (
            ["--demo", "--model", str(model), "--data", str(data), "--out", "d"],
            ["--data", "and --model", "them"],
        ),
        (
            ["--demo-assets", "a", "--data", str(data), "--out", "d"],
            ["--demo-assets a without --demo"],
        ),
        (["--resume", "run", "--restart"], ["--resume run --restart", "give one of them"]),
        (
            ["--resume", "data"],
            ["data: no checkpoint and no run.json", "not a train.py run folder"],
        ),
        (
            ["--resume", "run/ckpt-000002"],
            ["run/ckpt-000002: no such checkpoint", "run/ckpt-000004"],
        ),
        (["--out", "", "--data", str(data)], ["--out RUN_DIR is required for a new run"]),
    ]
    for argv, needles in cases:
        before = tree(tmp_path)
        one_error(run(argv, cwd=tmp_path), *needles)
        assert tree(tmp_path) == before, f"{argv} changed the disk"

    # the chat command: text that is not UTF-8, from stdin or the command line, is named
    chat = ["-m", "minroute.evaluation.generate", "--ckpt", str(demo_run), "--max-new-tokens", "2"]
    tools = tmp_path / "tools.json"
    tools.write_text('[{"type": "function", "function": {"name": "a\\ud800"}}]')
    for argv, stdin, needles in (
        (chat, b"hi\n\xff\xfe there\n", ["stdin line 2: not valid UTF-8 (byte 0xff at byte 1)"]),
        (
            chat + ["--prompt", os.fsdecode(b"caf\xe9")],
            None,
            ["--prompt: not valid UTF-8 (byte 0xe9 at character 4)"],
        ),
        (
            chat + ["--prompt", "hi", "--system", os.fsdecode(b"\xff")],
            None,
            ["--system: not valid UTF-8"],
        ),
        (chat + ["--prompt", "hi", "--tools", str(tools)], None, ["lone surrogate U+D800"]),
    ):
        one_error(run(argv, cwd=tmp_path, stdin=stdin), *needles)
    res = run(chat, cwd=tmp_path, stdin="héllo\n".encode())
    assert res.returncode == 0 and "[gates" in res.stdout.decode(), err(res)
