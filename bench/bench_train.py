"""Training-step benchmark at the real 0.5B shape (random weights): minroute vs transformers + PEFT.

    python bench/bench_train.py                                   # CPU, fp32, 4 x 128
    python bench/bench_train.py --device cuda --batch 4 --seq 512 # GPU, bf16 weights + autocast

Each side runs in its own subprocess (so peak memory is its own): the same random weights, the same batch
(right padding of varied lengths), LoRA r8/alpha16/dropout 0.05 on q/k/v/o, AdamW, one warm-up step, then
the median of --steps timed steps. minroute runs LayerRoute (routers + straight-through gates, every block
computed, CE + lambda R with the LM head only on counted tokens); transformers + PEFT runs without routers,
so minroute does strictly more work. Step memory: CUDA max_memory_allocated minus what was allocated after
loading, or on CPU the peak RSS over the steps (VmHWM, reset after loading) minus the RSS after loading, with
glibc told to return freed large blocks (MALLOC_MMAP_THRESHOLD_=65536, both sides).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import ROOT, describe, random_batch, real_shape_checkpoint


def proc_status_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident since the last reset) of this process, in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss():
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS, so load-time peaks do not count."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_side(side: str, ckpt: Path, a) -> dict:
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    ids, mask, labels = (t.to(device) for t in random_batch(a.batch, a.seq, 151936))
    torch.manual_seed(0)
    if side == "minroute":
        from minroute.checkpoint import build_layerroute
        from minroute.loss import lm_loss
        from minroute.optim import AdamW
        from minroute.router import gate_regulariser
        model = build_layerroute(ckpt, {"r": 8, "alpha": 16, "dropout": 0.05}, device=device, dtype=dtype).train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = AdamW([{"params": params, "weight_decay": 0.01}], lr=2e-4)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                h, soft, _ = model.gated_hidden(ids, mask)
                loss = lm_loss(h, model.lm_head.weight, labels) + gate_regulariser(soft)
            loss.backward()
            opt.step()
            opt.zero_grad()
    else:
        import peft
        import transformers
        base = transformers.Qwen2ForCausalLM.from_pretrained(ckpt, dtype=dtype, attn_implementation="sdpa").to(device)
        model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.01)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    reset_peak_rss()
    base_rss = proc_status_mb("VmRSS")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated() / 2**20
    times = []
    for i in range(a.steps + 1):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i:  # the first step is the warm-up
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() / 2**20 - base_cuda) if cuda else \
        proc_status_mb("VmHWM") - base_rss
    return {"side": side, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "step_mem_mb": peak, "tokens": int(mask.sum())}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    ap.add_argument("--ckpt", default="/tmp/minroute-bench-0.5b", help="where the random real-shape checkpoint goes")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    a = ap.parse_args()
    ckpt = real_shape_checkpoint(Path(a.ckpt))
    if a.side:
        print(json.dumps(run_side(a.side, ckpt, a)))
        return
    res = {}
    for side in ("minroute", "transformers+peft"):
        # time with the default allocator; memory in a second process where glibc returns freed large blocks
        # (otherwise it keeps blocks of up to 32 MB mapped, and RSS shows the allocator rather than the step)
        for env, keep in (({}, ("median_s", "min_s", "max_s", "tokens")), ({"MALLOC_MMAP_THRESHOLD_": "65536"},
                                                                            ("step_mem_mb",))):
            p = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--side", side], capture_output=True,
                               text=True, cwd=ROOT, env={**os.environ, **env})
            if p.returncode:
                sys.exit(f"{side} failed:\n{p.stderr[-3000:]}")
            out = json.loads(p.stdout.strip().splitlines()[-1])
            res.setdefault(side, {}).update({k: out[k] for k in keep})
    m, h = res["minroute"], res["transformers+peft"]
    print(f"command: python bench/bench_train.py {' '.join(sys.argv[1:])}")
    print(f"device: {describe(a.device)}; dtype {'bf16 autocast' if a.device.startswith('cuda') else 'fp32'}; "
          f"batch {a.batch} x {a.seq} ({m['tokens']} real tokens); median of {a.steps} steps after 1 warm-up")
    print(f"{'':22s} {'step s':>8s} {'min-max s':>14s} {'step mem MB':>12s}")
    for name, r in res.items():
        print(f"{name:22s} {r['median_s']:8.2f} {r['min_s']:6.2f}-{r['max_s']:<6.2f} {r['step_mem_mb']:12.0f}")
    print(f"{'ratio minroute/HF':22s} {m['median_s'] / h['median_s']:8.2f} {'':14s} "
          f"{m['step_mem_mb'] / h['step_mem_mb']:12.2f}   (goals: time <= 0.70, memory <= 0.60)")


if __name__ == "__main__":
    main()
