"""train.py: the demo end to end, exact resume after a kill, atomic checkpoints, NaN stop, bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from minroute.checkpoint import load_checkpoint, load_layerroute, save_checkpoint

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
    assert meta["step"] == 40 and (demo_run / "best.json").exists() and (demo_run / "gates.csv").exists()
    gates = (demo_run / "gates.csv").read_text().splitlines()
    assert gates[0] == "step,layer,mean_soft,hard_skip_rate,bias,w_norm" and len(gates) == 1 + 4 * 8


@pytest.fixture(scope="module")
def small_setup(demo_run):
    return demo_run / "demo-model", demo_run / "demo-data"


def run_args(model, data, out, steps=16):
    return [sys.executable, str(ROOT / "train.py"), "--model", str(model), "--data", str(data), "--out", str(out),
            "--steps", str(steps), "--batch-size", "4", "--accum", "1", "--lr", "3e-3", "--save-every", "2",
            "--eval-every", "8", "--val-batches", "1", "--log-every", "4", "--device", "cpu"]


def env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_resume_after_kill_is_bitwise_identical(tmp_path, small_setup):
    model, data = small_setup
    full = tmp_path / "full"
    subprocess.run(run_args(model, data, full), check=True, env=env(), capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(run_args(model, data, killed), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
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
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), "--out", "ignored", "--resume", str(killed)],
                         check=True, env=env(), capture_output=True, text=True)
    assert f"resumed {killed} at update {at}/16" in res.stdout
    a, _, ma = load_checkpoint(full, "latest")
    b, _, mb = load_checkpoint(killed, "latest")
    assert ma["step"] == mb["step"] == 16
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume (max diff {(a[k] - b[k]).abs().max():.3g})"


def test_crash_during_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    import minroute.checkpoint as ck
    t = {"w": torch.ones(3)}
    save_checkpoint(tmp_path, 1, t, {"m.w": torch.zeros(3)}, {"args": {}})
    real = ck._save_tensors

    def crash(tensors, path):
        if path.name == "optimizer.safetensors":
            raise OSError("disk full (simulated)")
        real(tensors, path)
    monkeypatch.setattr(ck, "_save_tensors", crash)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path, 2, {"w": torch.full((3,), 2.0)}, {"m.w": torch.zeros(3)}, {"args": {}})
    adapter, opt, meta = load_checkpoint(tmp_path, "latest")
    assert meta["step"] == 1 and torch.equal(adapter["w"], torch.ones(3)) and "m.w" in opt


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(tmp_path, small_setup, monkeypatch):
    model, data = small_setup
    calls = {"n": 0}
    real = train.lm_loss

    def flaky(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] > 5 else loss
    monkeypatch.setattr(train, "lm_loss", flaky)
    args = run_args(model, data, tmp_path / "r")[2:]
    with pytest.raises(SystemExit, match=r"non-finite loss \(nan\) at update 5 .* last good checkpoint"):
        train.main(args)
    assert json.loads((tmp_path / "r" / "latest.json").read_text())["step"] == 4


def test_bad_inputs(tmp_path, small_setup, tiny_dir):
    model, data = small_setup
    with pytest.raises(FileNotFoundError, match=r"data directory not found"):
        train.main(["--model", str(model), "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=r"built with another tokenizer"):
        train.main(["--model", str(tiny_dir), "--data", str(data), "--out", str(tmp_path / "o2")])


def test_checkpoint_from_another_model_shape(tmp_path, demo_run):
    from minroute.tiny import write_tiny_checkpoint
    other = write_tiny_checkpoint(tmp_path / "other", hidden_size=32, num_hidden_layers=2)
    with pytest.raises(ValueError, match=r"checkpoint is from another model shape"):
        load_layerroute(demo_run, "latest", model=other)


@pytest.mark.parametrize("extra,check", [
    (["--ablation", "noreg"], lambda a: a["gate_reg"] == 0.0 and a["init"] == "band"),
    (["--ablation", "uniform-init"], lambda a: a["init"] == "uniform"),
    (["--ablation", "bce", "--bce-target", "open"], lambda a: a["ablation"] == "bce" and a["bce_target"] == "open"),
    (["--preset", "author", "--steps", "8", "--accum", "4"],
     lambda a: a["updates"] == 2 and a["t_max"] == 3000 and a["pool"] == "all" and a["pad_to"] == 512
     and a["decay_biases"] and not a["sort_by_length"]),
])
def test_ablations_and_author_preset_run(tmp_path, small_setup, extra, check):
    model, data = small_setup
    args = ["--model", str(model), "--data", str(data), "--out", str(tmp_path / "r"), "--steps", "2",
            "--batch-size", "2", "--accum", "2", "--eval-every", "2", "--val-batches", "1", "--device", "cpu"]
    assert train.main(args + extra) == 0
    adapter, _, meta = load_checkpoint(tmp_path / "r", "latest")
    assert check(meta["args"]), meta["args"]
    if "uniform-init" in extra:  # every router starts open: biases +1 (moved by 2 small updates at most)
        biases = torch.stack([adapter[f"routers.{i}.bias"] for i in range(8)])
        assert (biases > 0.9).all(), biases.flatten().tolist()
