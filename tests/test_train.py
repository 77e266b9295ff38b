"""train.py: the demo end to end, exact resume after a kill, atomic checkpoints, NaN stop, bad
input, runs that cannot be destroyed, and the update's CE as a token mean over the whole update."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from minroute.run.checkpoint import load_checkpoint, load_layerroute, save_checkpoint
from minroute.run.distributed import configure_determinism, device_change_note
from minroute.run.resume import RESUME_MAY_CHANGE

ROOT = Path(__file__).resolve().parent.parent


def read_log(run):
    import csv

    with open(run / "train_log.csv") as f:
        return list(csv.DictReader(f))


def test_demo_trains_loss_falls_and_routers_move(demo_run):
    rows = read_log(demo_run)
    ce = [float(r["ce"]) for r in rows if r["ce"]]
    val = [float(r["val_ce"]) for r in rows if r["val_ce"]]
    assert ce[-1] < ce[0] - 0.4, f"train CE should fall by > 0.4 nats over the demo: {ce}"
    assert val[-1] < val[0] - 0.2, f"val CE should fall by > 0.2 nats: {val}"
    route, meta = load_layerroute(demo_run, "latest")
    w = torch.stack([r.weight.detach().norm() for r in route.routers])
    assert (w > 1e-3).all(), f"router weights should move away from zero: {w.tolist()}"
    assert (
        meta["step"] == 40
        and (demo_run / "best.json").exists()
        and (demo_run / "gates.csv").exists()
    )
    gates = (demo_run / "gates.csv").read_text().splitlines()
    assert gates[0] == "step,layer,mean_soft,hard_skip_rate,bias,w_norm" and len(gates) == 1 + 4 * 8


@pytest.fixture(scope="module")
def small_setup(demo_run):
    return demo_run / "demo-model", demo_run / "demo-data"


def run_args(model, data, out, steps=16):
    return [
        sys.executable,
        str(ROOT / "train.py"),
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
        "--save-every",
        "2",
        "--eval-every",
        "8",
        "--val-batches",
        "1",
        "--log-every",
        "4",
        "--device",
        "cpu",
    ]


def env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_resume_after_kill_is_bitwise_identical(tmp_path, small_setup):
    model, data = small_setup
    full = tmp_path / "full"
    subprocess.run(run_args(model, data, full), check=True, env=env(), capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        run_args(model, data, killed),
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        latest = killed / "latest.json"
        if latest.exists() and json.loads(latest.read_text())["step"] >= 4:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at = json.loads((killed / "latest.json").read_text())["step"]
    assert 4 <= at < 16, f"the kill should land mid-run (latest checkpoint at step {at})"
    res = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--resume", str(killed)],
        check=True,
        env=env(),
        capture_output=True,
        text=True,
    )
    assert f"resumed {killed} at update {at}/16" in res.stdout
    log_full, log_killed = read_log(full), read_log(killed)
    assert [r["step"] for r in log_killed] == [r["step"] for r in log_full], (
        "a resumed run logs each step once"
    )
    assert [r["ce"] for r in log_killed] == [r["ce"] for r in log_full]
    gates = (killed / "gates.csv").read_text().splitlines()
    assert gates == (full / "gates.csv").read_text().splitlines()
    a, _, ma = load_checkpoint(full, "latest")
    b, _, mb = load_checkpoint(killed, "latest")
    assert ma["step"] == mb["step"] == 16
    for k in a:
        assert torch.equal(a[k], b[k]), (
            f"{k} differs after resume (max diff {(a[k] - b[k]).abs().max():.3g})"
        )


def test_checkpoint_files_have_the_run_folders_permissions(tmp_path):
    d = save_checkpoint(
        tmp_path,
        1,
        {"w": torch.ones(3)},
        {"m.w": torch.zeros(3)},
        {"args": {}},
        extra={"trained_rows.txt": "ab\n"},
    )
    modes = {p.name: p.stat().st_mode & 0o777 for p in d.iterdir()}
    assert len(set(modes.values())) == 1, f"checkpoint files differ in permissions: {modes}"


def test_crash_during_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    import minroute.run.checkpoint as ck

    t = {"w": torch.ones(3)}
    save_checkpoint(tmp_path, 1, t, {"m.w": torch.zeros(3)}, {"args": {}})
    real = ck._save_tensors

    def crash(tensors, path):
        if path.name == "optimizer.safetensors":
            raise OSError("disk full (simulated)")
        real(tensors, path)

    monkeypatch.setattr(ck, "_save_tensors", crash)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(
            tmp_path, 2, {"w": torch.full((3,), 2.0)}, {"m.w": torch.zeros(3)}, {"args": {}}
        )
    adapter, opt, meta = load_checkpoint(tmp_path, "latest")
    assert meta["step"] == 1 and torch.equal(adapter["w"], torch.ones(3)) and "m.w" in opt


def test_nan_loss_stops_with_message_and_names_last_good_checkpoint(
    tmp_path, small_setup, monkeypatch
):
    model, data = small_setup
    calls = {"n": 0}
    real = train.lm_loss_per_sample

    def flaky(*a, **k):
        sums, counts = real(*a, **k)
        calls["n"] += 1 if sums.requires_grad else 0
        return (sums * float("nan") if calls["n"] > 5 else sums), counts

    monkeypatch.setattr(train, "lm_loss_per_sample", flaky)
    args = run_args(model, data, tmp_path / "r")[2:]
    with pytest.raises(
        train.UserError,
        match=r"non-finite loss or gradient at update 5 .*nothing saved; the last "
        r"good checkpoint is .*ckpt-000004",
    ):
        train.main(args)
    assert json.loads((tmp_path / "r" / "latest.json").read_text())["step"] == 4


def test_bad_inputs(tmp_path, small_setup, tiny_dir):
    model, data = small_setup
    with pytest.raises(FileNotFoundError, match=r"data directory not found"):
        train.main(
            ["--model", str(model), "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]
        )
    with pytest.raises(train.UserError, match=r"built with another tokenizer"):
        train.main(["--model", str(tiny_dir), "--data", str(data), "--out", str(tmp_path / "o2")])


def test_checkpoint_from_another_model_shape(tmp_path, demo_run):
    from minroute.run.tiny import write_tiny_checkpoint

    other = write_tiny_checkpoint(tmp_path / "other", hidden_size=32, num_hidden_layers=2)
    with pytest.raises(ValueError, match=r"checkpoint is from another model shape"):
        load_layerroute(demo_run, "latest", model=other)


@pytest.mark.parametrize(
    "extra,check",
    [
        (["--ablation", "noreg"], lambda a: a["gate_reg"] == 0.0 and a["init"] == "band"),
        (["--ablation", "uniform-init"], lambda a: a["init"] == "uniform"),
        (
            ["--ablation", "bce"],
            lambda a: a["ablation"] == "bce" and a["bce_target"] == "open",
        ),  # the paper's text
        (["--ablation", "bce", "--bce-target", "skip"], lambda a: a["bce_target"] == "skip"),
        (
            ["--preset", "author", "--steps", "8", "--accum", "4"],
            lambda a: (
                a["updates"] == 2
                and a["t_max"] == 3000
                and a["pool"] == "all"
                and a["pad_to"] == 512
                and a["decay_biases"]
                and not a["sort_by_length"]
                and a["route_on"] == "sequence"
                and a["ce_mean"] == "micro"
            ),
        ),
        (
            [],
            lambda a: (
                a["route_on"] == "prompt" and a["ce_mean"] == "update" and a["pool"] == "mask"
            ),
        ),
    ],
)
def test_ablations_and_author_preset_run(tmp_path, small_setup, extra, check):
    model, data = small_setup
    args = [
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "r"),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--accum",
        "2",
        "--eval-every",
        "2",
        "--val-batches",
        "1",
        "--device",
        "cpu",
    ]
    assert train.main(args + extra) == 0
    adapter, _, meta = load_checkpoint(tmp_path / "r", "latest")
    assert check(meta["args"]), meta["args"]
    # every router starts open: biases +1 (moved by 2 small updates at most)
    if "uniform-init" in extra:
        biases = torch.stack([adapter[f"routers.{i}.bias"] for i in range(8)])
        assert (biases > 0.9).all(), biases.flatten().tolist()


# ----------------------------------------------------------------------------- the update's CE


class NoStep:
    """An optimizer that takes no step and keeps the gradients, so the update's gradients can be
    compared."""

    def set_lr(self, lr):
        pass

    def step(self):
        pass

    def zero_grad(self):
        pass


def one_update_grads(route, split, args, pad_id):
    route.zero_grad(set_to_none=True)
    opt = NoStep()
    train.one_update(
        3,
        route,
        opt,
        [],
        split,
        args,
        pad_id,
        lambda: torch.autocast("cpu", enabled=False),
        torch.device("cpu"),
    )
    return {
        n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        for n, p in route.named_parameters()
        if p.requires_grad
    }


def test_update_ce_is_token_mean_whatever_the_micro_batch_cut(small_setup):
    """Paper preset: sorting the update's 16 sequences by length (or not) gives the same gradients;
    the authors' mean of micro-batch means does not (that is the bias the token mean removes)."""
    from argparse import Namespace

    from minroute.run.checkpoint import build_layerroute
    from minroute.run.data import TokenSplit
    from minroute.run.load import load_tokenizer

    model, data = small_setup
    split, pad_id = TokenSplit(data, "train"), load_tokenizer(model).pad_id
    route = build_layerroute(str(model), {"r": 4, "alpha": 8, "dropout": 0.0})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _n, prm in route.named_parameters():
            if prm.requires_grad:
                prm.copy_(0.05 * torch.randn(prm.shape, generator=g))
    base = dict(
        batch_size=2,
        accum=4,
        seed=1,
        pad_to=0,
        chunk=64,
        ablation="none",
        gate_reg=1.0,
        route_on="prompt",
        bce_target="open",
        lr=1e-3,
        t_max=10,
        warmup=0,
        min_lr=1e-6,
        clip=0.0,
    )
    lengths = split.lengths()[np.concatenate(train.update_batches(split, 3, 2, 4, 1, False))]
    assert lengths.max() > 2 * lengths.min(), f"the update should mix lengths: {lengths}"
    for ce_mean, same in (("update", True), ("micro", False)):
        a = one_update_grads(
            route, split, Namespace(**base, ce_mean=ce_mean, sort_by_length=0), pad_id
        )
        b = one_update_grads(
            route, split, Namespace(**base, ce_mean=ce_mean, sort_by_length=1), pad_id
        )
        # per tensor, L2
        rel = max(((a[n] - b[n]).norm() / a[n].norm().clamp(min=1e-12)).item() for n in a)
        if same:
            assert rel <= 1e-6, (
                f"token-mean CE: sorted vs unsorted gradients differ by {rel:.3g} (relative)"
            )
        else:
            assert rel > 1e-3, (
                "the mean of micro-batch means should depend on the cut (else this test shows"
                " nothing)"
            )


# ----------------------------------------------------------------------------- never lose a run


def snapshot(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def cli(argv, capsys):
    code = train.run_cli(train.main, argv)
    return code, capsys.readouterr()


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, small_setup):
    model, data = small_setup
    out = tmp_path_factory.mktemp("short") / "run"
    assert train.main(run_args(model, data, out, steps=4)[2:]) == 0
    return out


def test_rerun_same_out_is_refused_and_nothing_changes(tmp_path, short_run, small_setup, capsys):
    model, data = small_setup
    before = snapshot(short_run)
    code, io = cli(run_args(model, data, short_run, steps=4)[2:], capsys)
    assert code == 2 and "Traceback" not in io.err
    assert io.err.startswith(f"error: {short_run} already holds a run")
    assert f"python train.py --resume {short_run}" in io.err and "--restart" in io.err
    assert snapshot(short_run) == before, "a refused command must not touch the run"


def test_restart_moves_the_old_run_aside(tmp_path, short_run, small_setup):
    import shutil

    model, data = small_setup
    run = tmp_path / "r"
    shutil.copytree(short_run, run)
    before = snapshot(run)
    assert train.main(run_args(model, data, run, steps=2)[2:] + ["--restart"]) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("r.replaced-")]
    assert len(aside) == 1 and snapshot(aside[0]) == before, (
        "the old run must survive, whole, beside the new one"
    )
    assert json.loads((run / "latest.json").read_text())["step"] == 2


def test_resume_extends_refuses_changed_settings_and_resolves_ckpt_folder(
    tmp_path, short_run, capsys
):
    import shutil

    run = tmp_path / "r"
    shutil.copytree(short_run, run)
    before = snapshot(run)
    code, io = cli(["--resume", str(run), "--lr", "1e-3", "--seed", "7"], capsys)
    assert code == 2 and "--lr 0.001 (run: 0.003)" in io.err and "--seed 7 (run: 42)" in io.err
    code, io = cli(["--resume", str(run), "--steps", "2"], capsys)
    assert code == 2 and "only be extended" in io.err
    code, io = cli(["--resume", str(run), "--out", str(tmp_path / "elsewhere")], capsys)
    assert code == 2 and "drop --out" in io.err
    assert snapshot(run) == before
    ckpt = next(run.glob("ckpt-000004"))
    # a ckpt-* folder resolves to its run
    assert train.main(["--resume", str(ckpt), "--steps", "6"]) == 0
    _, _, meta = load_checkpoint(run, "latest")
    assert meta["step"] == 6 and meta["args"]["steps"] == 6
    assert (
        meta["args"]["extensions"][0]["from_steps"] == 4
        and meta["args"]["extensions"][0]["at_update"] == 4
    )
    assert train.main(["--resume", str(run)]) == 0  # finished: nothing to do, nothing lost
    assert load_checkpoint(run, "latest")[2]["step"] == 6


def test_two_writers_cannot_share_a_run(tmp_path, small_setup, capsys):
    from minroute.run.safety import RunLock

    model, data = small_setup
    out = tmp_path / "r"
    out.mkdir()
    lock = RunLock(out)
    try:
        code, io = cli(run_args(model, data, out, steps=2)[2:], capsys)
    finally:
        lock.release()
    assert code == 2 and "is being written by pid" in io.err
    assert not (out / "latest.json").exists()


@pytest.mark.parametrize(
    "flag,value,msg",
    [
        ("--steps", "0", "must be a whole number > 0"),
        ("--lr", "-1", "must be a number > 0"),
        ("--accum", "0", "must be a whole number > 0"),
        ("--batch-size", "0", "must be a whole number > 0"),
        ("--lora-r", "0", "must be a whole number > 0"),
        ("--eval-every", "0", "must be a whole number > 0"),
        ("--save-every", "-2", "must be a whole number > 0"),
        ("--lora-dropout", "1.5", "must be a number in [0, 1)"),
        ("--val-batches", "-1", "must be a whole number >= 0"),
        ("--steps", "ten", "is not a whole number"),
    ],
)
def test_numbers_are_checked_up_front(tmp_path, small_setup, capsys, flag, value, msg):
    model, data = small_setup
    with pytest.raises(SystemExit) as e:
        train.main(run_args(model, data, tmp_path / "r")[2:] + [flag, value])
    assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "r").exists(), "nothing is created for a refused command"


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message on a machine without CUDA"
)
def test_device_cuda_without_cuda_says_so(tmp_path, small_setup, capsys):
    model, data = small_setup
    with pytest.raises(SystemExit):
        train.main(run_args(model, data, tmp_path / "r")[2:] + ["--device", "cuda"])
    assert "this machine has no CUDA device" in capsys.readouterr().err


def test_corrupt_checkpoint_and_data_files_are_named(tmp_path, short_run, small_setup, capsys):
    import shutil

    model, data = small_setup
    run = tmp_path / "r"
    shutil.copytree(short_run, run)
    ckpt = run / json.loads((run / "latest.json").read_text())["dir"]
    good = (ckpt / "adapter.safetensors").read_bytes()
    blob = bytearray(good)
    blob[-5] ^= 0xFF
    (ckpt / "adapter.safetensors").write_bytes(bytes(blob))
    code, io = cli(["--resume", str(run)], capsys)
    assert code == 2 and f"{ckpt / 'adapter.safetensors'}: size or sha256 does not match" in io.err
    (ckpt / "adapter.safetensors").write_bytes(good)
    (ckpt / "optimizer.safetensors").unlink()
    code, io = cli(["--resume", str(run)], capsys)
    assert code == 2 and f"{ckpt / 'optimizer.safetensors'}: missing" in io.err
    data2 = tmp_path / "data"
    shutil.copytree(data, data2)
    ids = np.load(data2 / "train" / "ids.npy")
    ids[3] = (ids[3] + 1) % 50
    np.save(data2 / "train" / "ids.npy", ids)
    code, io = cli(run_args(model, data2, tmp_path / "new")[2:], capsys)
    assert code == 2 and f"{data2 / 'train' / 'ids.npy'}: size or sha256 does not match" in io.err


def test_script_errors_are_one_line_without_traceback(tmp_path):
    """As a user types them: exit code 2, one `error:` line, no traceback."""
    missing = tmp_path / "missing"
    for argv in (
        ["train.py", "--resume", str(missing)],
        ["train.py", "--out", str(tmp_path / "o"), "--data", str(missing)],
        ["eval.py", "--ckpt", str(missing)],
        [
            "-m",
            "data_prep",
            "--source-dir",
            str(missing),
            "--out",
            str(tmp_path / "d"),
            "--tokenizer",
            str(ROOT / "tests" / "fixtures"),
        ],
    ):
        res = subprocess.run(
            [sys.executable, *argv], env=env(), capture_output=True, text=True, cwd=ROOT
        )
        assert res.returncode == 2, (argv, res.stderr[-500:])
        assert "Traceback" not in res.stderr and res.stderr.strip().splitlines()[-1].startswith(
            "error: "
        ), res.stderr
        assert str(missing) in res.stderr


def test_a_run_from_before_these_settings_still_resumes(tmp_path, short_run, small_setup, capsys):
    """Checkpoints without file hashes or the routing / CE settings, on data without file hashes:
    resumable, with the settings the older code used (route on the sequence, mean of micro-batch
    means)."""
    import shutil

    from minroute.run.data import manifest_hash

    run, data = tmp_path / "r", tmp_path / "data"
    shutil.copytree(short_run, run)
    shutil.copytree(small_setup[1], data)
    manifest = json.loads((data / "manifest.json").read_text())
    del manifest["files"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    for ckpt in run.glob("ckpt-*"):
        meta = json.loads((ckpt / "meta.json").read_text())
        for key in ("route_on", "ce_mean", "demo_assets"):
            meta["args"].pop(key, None)
        meta["args"]["data"] = str(data)
        meta["manifest_sha256"] = manifest_hash(data)
        meta.pop("data_sha256", None)  # older runs identified their data by manifest.json's bytes
        meta.pop("inputs", None)  # and recorded their inputs by path only
        del meta["files"]
        (ckpt / "meta.json").write_text(json.dumps(meta))
    assert train.main(["--resume", str(run), "--steps", "6"]) == 0
    _, _, meta = load_checkpoint(run, "latest")
    assert (
        meta["step"] == 6
        and meta["args"]["route_on"] == "sequence"
        and meta["args"]["ce_mean"] == "micro"
    )
    assert "records no file hashes" in capsys.readouterr().err


# ----------------------------------------------------------------------------- device, dtype,
# determinism


def test_checkpoint_records_device_and_dtype_and_a_device_change_is_said(
    tmp_path, short_run, capsys
):
    """meta.json says where the run trained (device type, dtype of the frozen weights); resuming on
    another device resumes, with one note saying what changes (here a CUDA bf16 run continued on the
    CPU in fp32).
    """
    import shutil

    _, _, meta = load_checkpoint(short_run, "latest")
    assert meta["device_type"] == "cpu" and meta["dtype"] == "float32"
    run = tmp_path / "r"
    shutil.copytree(short_run, run)
    for ckpt in run.glob("ckpt-*"):
        m = json.loads((ckpt / "meta.json").read_text())
        m.update(device_type="cuda", dtype="bfloat16")
        (ckpt / "meta.json").write_text(json.dumps(m))
    assert train.main(["--resume", str(run), "--steps", "6", "--device", "cpu"]) == 0
    notes = [
        line
        for line in capsys.readouterr().err.splitlines()
        if line.startswith("note: this run trained")
    ]
    assert (
        len(notes) == 1
        and "on cuda (bfloat16" in notes[0]
        and "resumes on cpu (float32)" in notes[0]
    ), notes
    _, _, meta = load_checkpoint(run, "latest")
    assert meta["step"] == 6 and meta["device_type"] == "cpu" and meta["dtype"] == "float32"
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    assert (
        device_change_note({"device_type": "cpu", "dtype": "float32"}, cpu, torch.float32) is None
    )
    assert "cuda (bfloat16" in device_change_note(
        {"args": {"device": "cuda:0"}, "step": 3}, cpu, torch.float32
    )
    assert "resumes on cpu (bfloat16)" in device_change_note({"args": {"device": "cpu"}}, cpu, bf16)


def test_deterministic_is_the_default_and_sets_cuda_up_before_use(monkeypatch):
    """--deterministic (default) on CUDA: deterministic algorithms and the cuBLAS workspace setting;
    a setting cuBLAS cannot make deterministic is refused; CPU is left alone; a resume may switch
    it."""
    from argparse import Namespace

    assert train.parse_args(["--out", "x"]).deterministic is True
    assert train.parse_args(["--out", "x", "--no-deterministic"]).deterministic is False
    assert {"deterministic", "ddp_backend"} <= RESUME_MAY_CHANGE
    calls = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda mode, **k: calls.append(mode))
    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", True)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    configure_determinism(Namespace(device="cpu", deterministic=True))
    assert calls == [] and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    configure_determinism(Namespace(device="cuda", deterministic=False))
    assert calls == []
    configure_determinism(Namespace(device="cuda:0", deterministic=True))
    assert calls == [True] and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    with pytest.raises(train.UserError, match=r"CUBLAS_WORKSPACE_CONFIG=:0:0 .*--no-deterministic"):
        configure_determinism(Namespace(device="cuda", deterministic=True))
    help_text = train.build_parser().format_help()
    assert "--deterministic" in help_text and "0.5" in help_text
