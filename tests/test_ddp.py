"""Data-parallel training (torchrun, gloo on CPU): 2 processes end with the adapters of 1 process, same global batch."""
import os
import subprocess
import sys
from pathlib import Path


from minroute.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def test_two_processes_equal_one(tmp_path, demo_run):
    common = ["--model", str(demo_run / "demo-model"), "--data", str(demo_run / "demo-data"), "--steps", "4",
              "--batch-size", "2", "--accum", "2", "--lr", "3e-3", "--save-every", "4", "--eval-every", "4",
              "--val-batches", "1", "--log-every", "2", "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    one = subprocess.run([sys.executable, str(ROOT / "train.py"), "--out", str(tmp_path / "one"), *common],
                         env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "train.py"), "--out", str(tmp_path / "two"), *common],
                         env=env, capture_output=True, text=True)
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
    """NCCL serves CUDA tensors only: a logged sum kept on the CPU would stop multi-GPU training at update 1. The
    check runs before any communication, so it is tested here without a process group."""
    import pytest
    import torch

    import train
    with pytest.raises(RuntimeError, match=r"not on meta"):
        train.all_reduce_([torch.zeros(3, device="meta"), torch.zeros(4)], torch.device("meta"))
