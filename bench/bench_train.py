"""Training-step benchmark at the real 0.5B shape (random weights): minroute vs transformers + PEFT, interleaved.

    python bench/bench_train.py                                    # the paper's shape: CPU, fp32, 4 x 512
    python bench/bench_train.py --quick                            # 4 x 128
    python bench/bench_train.py --device cuda                      # GPU: bf16 weights + autocast

Each implementation is one long-lived worker process holding its model (so each process's memory is its own;
minroute's worker switches its imposed gates between steps), and the timed steps interleave: round r runs
transformers+PEFT, then minroute with each gate setting, then the next round, so drift on a noisy host lands
on every side alike. Reported per side: the median and the min-max of
the timed steps, the peak step memory, and the ratio to transformers+PEFT (median of the per-round ratios,
with their min-max).

Both sides: the same random weights and batch (right padding of varied lengths), LoRA r8 / alpha 16 / dropout
0.05 on q/k/v/o, AdamW. transformers + PEFT has no routers: it always runs every block forward and backward.
minroute runs LayerRoute (routers, straight-through gates, CE + lambda R) with its gates imposed:
  open  every block open (the most work minroute can do),
  band  the initial gates: the middle band closed (9 of 24 blocks), as at step 0 of every run,
  high  18 of 24 closed (the first and last 3 open), a high-skip setting.
A closed block still runs forward for its rows (the router's gradient needs Block(h) - h) but without
autograd, so it costs no backward and keeps no activations.

Step memory is measured after the timed rounds, in fresh workers (one at a time, after a warm-up step): CUDA
max_memory_allocated minus what was allocated before the step, or on CPU the peak RSS over the step (VmHWM,
reset before it) minus the RSS before it, with glibc told to return freed large blocks
(MALLOC_MMAP_THRESHOLD_=65536) so that RSS shows the step rather than glibc's cache. The timed rounds run with
the default allocator.
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

GATES = {"open": lambda L: [True] * L,
         "band": lambda L: [not (round(L / 3) <= i < round(17 * L / 24)) for i in range(L)],
         "high": lambda L: [i < 3 or i >= L - 3 for i in range(L)]}


def proc_status_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident since the last reset) of this process, in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss():
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build_step(side: str, ckpt: Path, a):
    """The model of one side and a function step(gates) that runs one training step on the fixed batch."""
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

        def step(gates: str):
            forced = torch.tensor(GATES[gates](model.config.num_hidden_layers))
            with model.forcing(forced), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
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

        def step(gates: str):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    return step, int(mask.sum())


def worker(side: str, ckpt: Path, a):
    """Load, then answer each 'step GATES' line on stdin with one JSON line: seconds and step memory."""
    step, tokens = build_step(side, ckpt, a)
    cuda = a.device.startswith("cuda")
    print(json.dumps({"ready": side, "tokens": tokens}), flush=True)
    for line in sys.stdin:
        what, _, gates = line.strip().partition(" ")
        if what != "step":
            break
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() / 2**20
        else:
            reset_peak_rss()
            before = proc_status_mb("VmRSS")
        t0 = time.perf_counter()
        step(gates)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        mem = torch.cuda.max_memory_allocated() / 2**20 - before if cuda else proc_status_mb("VmHWM") - before
        print(json.dumps({"s": dt, "mem_mb": mem}), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="4 x 128 instead of the paper's 4 x 512")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (each side once per round) after 1 warm-up")
    ap.add_argument("--gates", default="open,band,high", help="minroute gate settings to run (open, band, high)")
    ap.add_argument("--no-hf", action="store_true", help="minroute only (no transformers + peft side)")
    ap.add_argument("--ckpt", default="/tmp/minroute-bench-0.5b", help="where the random real-shape checkpoint goes")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.quick:
        a.seq = 128
    ckpt = real_shape_checkpoint(Path(a.ckpt))
    if a.worker:
        return worker(a.worker, ckpt, a)
    sides = ([] if a.no_hf else ["transformers+peft"]) + [f"minroute:{g}" for g in a.gates.split(",")]
    impls = list(dict.fromkeys(s.split(":")[0] for s in sides))
    args = [a_ for a_ in sys.argv[1:]]

    def start(impl, env=None):
        proc = subprocess.Popen([sys.executable, __file__, *args, "--worker", impl], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        ready = proc.stdout.readline()
        if not ready:
            sys.exit(f"{impl}: the worker died while loading (run it alone with --worker {impl} to see why)")
        return proc, json.loads(ready)["tokens"]

    def ask(procs, side):
        impl, _, gates = side.partition(":")
        procs[impl].stdin.write(f"step {gates or 'open'}\n")
        procs[impl].stdin.flush()
        line = procs[impl].stdout.readline()
        if not line:
            sys.exit(f"{side}: the worker died during a step")
        return json.loads(line)

    def stop(procs):
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()
    procs = {impl: start(impl)[0] for impl in impls}
    res, mem = {s: [] for s in sides}, {}
    for r in range(a.rounds + 1):  # round 0 is the warm-up
        for side in sides:
            out = ask(procs, side)
            if r:
                res[side].append(out)
        print(f"round {r}/{a.rounds} done", file=sys.stderr, flush=True)
    stop(procs)
    for impl in impls:  # memory: a fresh worker at a time, glibc returning freed large blocks
        proc, tokens = start(impl, {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
        ask({impl: proc}, impl if impl != "minroute" else "minroute:open")  # warm-up
        for side in (s for s in sides if s.split(":")[0] == impl):
            mem[side] = ask({impl: proc}, side)["mem_mb"]
        stop({impl: proc})
    ref = "transformers+peft" if not a.no_hf else None
    print(f"command: python bench/bench_train.py {' '.join(args)}")
    print(f"device: {describe(a.device)}; dtype {'bf16 autocast' if a.device.startswith('cuda') else 'fp32'}; "
          f"batch {a.batch} x {a.seq} ({tokens} real tokens); {a.rounds} interleaved rounds after 1 warm-up")
    print(f"{'side':22s} {'step s':>7s} {'min-max s':>13s} {'mem MB':>8s} {'time/HF':>8s} {'min-max':>11s} {'mem/HF':>7s}")
    rows = {}
    for side in sides:
        t = [x["s"] for x in res[side]]
        m = mem[side]
        row = {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "mem_mb": m}
        if ref and side != ref:
            ratios = [x["s"] / y["s"] for x, y in zip(res[side], res[ref])]
            row.update(ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                       mem_ratio=m / mem[ref])
        rows[side] = row
        extra = (f" {row['ratio']:8.2f} {row['ratio_min']:5.2f}-{row['ratio_max']:<5.2f} {row['mem_ratio']:7.2f}"
                 if "ratio" in row else "")
        print(f"{side:22s} {row['median_s']:7.2f} {row['min_s']:6.2f}-{row['max_s']:<6.2f} {m:8.0f}{extra}")
    print(json.dumps({"bench": "train", "device": a.device, "batch": a.batch, "seq": a.seq, "rows": rows}))


if __name__ == "__main__":
    main()
