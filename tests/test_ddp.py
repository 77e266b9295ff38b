"""Data-parallel training (torchrun, gloo on CPU): 2 processes end with the adapters of 1 process,
same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from minroute.run.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def test_two_processes_equal_one(tmp_path, demo_run):
    common = [
        "--model",
        str(demo_run / "demo-model"),
        "--data",
        str(demo_run / "demo-data"),
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--accum",
        "2",
        "--lr",
        "3e-3",
        "--save-every",
        "4",
        "--eval-every",
        "4",
        "--val-batches",
        "1",
        "--log-every",
        "2",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    one = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--out", str(tmp_path / "one"), *common],
        env=env,
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(ROOT / "train.py"),
            "--out",
            str(tmp_path / "two"),
            *common,
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "on 2 process(es)" in two.stdout and two.stdout.count("done:") == 1, "only rank 0 logs"
    a, _, ma = load_checkpoint(tmp_path / "one", "latest")
    b, _, mb = load_checkpoint(tmp_path / "two", "latest")
    assert ma["step"] == mb["step"] == 4
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-6, f"2-process adapters differ from 1-process ones by {diff:.3g}"
    moved = max(a[k].abs().max().item() for k in a if k.endswith("lora_B"))
    assert moved > 0, "training must have changed the adapters for the comparison to mean anything"


def test_all_reduce_refuses_tensors_off_the_training_device():
    """NCCL serves CUDA tensors only: a logged sum kept on the CPU would stop multi-GPU training at
    update 1. The check runs before any communication, so it is tested here without a process group.
    """
    import torch

    from minroute.run.distributed import all_reduce_

    with pytest.raises(RuntimeError, match=r"not on meta"):
        all_reduce_([torch.zeros(3, device="meta"), torch.zeros(4)], torch.device("meta"))


def torchrun_env(monkeypatch, rank, local_rank, local_world, world=2):
    for k, v in {
        "WORLD_SIZE": world,
        "RANK": rank,
        "LOCAL_RANK": local_rank,
        "LOCAL_WORLD_SIZE": local_world,
    }.items():
        monkeypatch.setenv(k, str(v))


def fake_gpus(monkeypatch, n):
    import torch

    calls = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", str(d))))
    return calls


def fake_dist(monkeypatch, events):
    import torch.distributed as dist

    monkeypatch.setattr(
        dist, "init_process_group", lambda backend, **k: events.append(("init", backend, k))
    )
    monkeypatch.setattr(dist, "get_rank", lambda *a: int(os.environ["RANK"]))
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: None)
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: events.append(("barrier",)))
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **k: events.append(("destroy",)))


def test_more_processes_than_gpus_is_refused_in_one_line(monkeypatch, capsys):
    """2 processes on a 1-GPU machine: local rank 0 says so in one `error:` line, the other exits
    quietly (2); the gloo switch lets them share the GPU. Before: rank 1 went to cuda:1 and died
    with a CUDA traceback.
    """
    from argparse import Namespace

    from minroute.run.distributed import check_processes_fit
    from minroute.run.safety import run_cli

    fake_gpus(monkeypatch, 1)
    args = Namespace(device="cuda", ddp_backend="auto", demo=False, accum=4, batch_size=4)
    torchrun_env(monkeypatch, 0, 0, 2)
    assert run_cli(lambda argv: check_processes_fit(args)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and err[0].startswith("error: 2 processes on this machine")
        and "1 CUDA device" in err[0]
    )
    assert "--ddp-backend gloo" in err[0]
    torchrun_env(monkeypatch, 1, 1, 2)
    with pytest.raises(SystemExit) as e:
        check_processes_fit(args)
    assert e.value.code == 2 and capsys.readouterr().err == ""
    check_processes_fit(Namespace(device="cuda", ddp_backend="gloo"))  # shared on purpose: allowed
    check_processes_fit(Namespace(device="cpu", ddp_backend="auto"))  # CPU: gloo, any number


def test_nccl_binds_each_process_to_its_gpu_and_gloo_shares_one(monkeypatch):
    from argparse import Namespace

    import torch

    from minroute.run.distributed import setup_distributed

    gpu_calls = fake_gpus(monkeypatch, 2)
    events = []
    fake_dist(monkeypatch, events)
    torchrun_env(monkeypatch, 1, 1, 2)
    args = Namespace(device="cuda", ddp_backend="auto", demo=False, accum=4, batch_size=4)
    assert setup_distributed(args) == (1, 2)
    assert args.device == "cuda:1" and gpu_calls == [("set_device", "cuda:1")]
    assert events == [("init", "nccl", {"device_id": torch.device("cuda:1")})]
    # 2 processes, 1 GPU, gloo: both on cuda:0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    gpu_calls.clear()
    events.clear()
    args = Namespace(device="cuda", ddp_backend="gloo", demo=False, accum=4, batch_size=4)
    assert setup_distributed(args) == (1, 2)
    assert (
        args.device == "cuda:0"
        and gpu_calls == [("set_device", "cuda:0")]
        and events == [("init", "gloo", {})]
    )


def test_no_process_leaves_before_rank_0_wrote_the_last_checkpoint(tmp_path, demo_run, monkeypatch):
    """Rank 0's last validation and checkpoint come before the barrier, the barrier before the
    teardown."""
    import train
    from minroute.run import lifecycle

    events = []
    fake_dist(monkeypatch, events)
    torchrun_env(monkeypatch, 0, 0, 2)
    real_save = lifecycle.save_checkpoint

    def save(*a, **k):
        events.append(("save", a[1]))
        return real_save(*a, **k)

    monkeypatch.setattr(lifecycle, "save_checkpoint", save)
    argv = [
        "--model",
        str(demo_run / "demo-model"),
        "--data",
        str(demo_run / "demo-data"),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--accum",
        "2",
        "--save-every",
        "2",
        "--eval-every",
        "2",
        "--val-batches",
        "1",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "r"),
    ]
    assert train.main(argv) == 0
    names = [e[0] for e in events]
    assert names[0] == "init" and names[-2:] == ["barrier", "destroy"] and ("save", 2) in events, (
        events
    )
    assert names.index("barrier") > max(i for i, e in enumerate(events) if e[0] == "save")
