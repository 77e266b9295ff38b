"""Training-update benchmark at a real shape (random weights): minroute vs transformers + PEFT,
interleaved.

    python bench/bench_train.py                    # Qwen2.5-0.5B shape, CPU fp32, 4 x 4 x 512
    python bench/bench_train.py --quick                            # updates of 4 x 4 x 128
    python bench/bench_train.py --shape smollm2    # SmolLM2-135M shape (Llama)
    python bench/bench_train.py --device cuda                      # GPU: bf16 weights + autocast

What is timed is one optimizer update, as train.py runs it: --accum micro-batches (4, the paper's)
of --batch sequences, each forward and backward, then clipping (1.0), the non-finite check
(train.py's one host read) and AdamW. tokens/s is train.py's log line's: the update's real tokens
(attention-mask ones, all micro-batches) per second of the update. TFLOP/s and the fraction of the
bf16 peak count the matmul FLOPs of the frozen model the update needs on real tokens: for each row,
every block it runs forward, and for an open block its backward to the hidden states (the frozen
weights need no weight gradient: 2x the forward matmuls, attention's backward 2x its forward), and
the LM head on the counted tokens forward and back; LoRA's rank-8 matmuls, the routers and
elementwise work are left out. Both sides are counted by that same formula (minroute's closed
blocks: forward only), so at equal gates the fractions compare speed alone. --peak-tflops defaults
to the dense bf16 peak of an H100/H200 (989; H100 PCIe 756, H100 NVL 835) or A100 (312) by the GPU's
name, else no fraction is printed.

Each implementation is one long-lived worker process holding its model (so each process's memory is
its own; minroute's worker switches its imposed gates between updates), and the timed updates
interleave: round r runs transformers+PEFT, then minroute with each gate setting, then the next
round, so drift on a noisy host lands on every side alike. Reported per side: the median and the
min-max of the timed updates, tokens/s, TFLOP/s and the fraction of the peak, the peak update
memory, and the ratio to transformers+PEFT (median of the per-round ratios, with their min-max).

Both sides: the same random weights and batches (right padding of varied lengths), LoRA r8 / alpha
16 / dropout 0.05 on q/k/v/o, AdamW. transformers + PEFT (Qwen2ForCausalLM or LlamaForCausalLM, as
the checkpoint's config says) has no routers: it always runs every block forward and backward.
minroute runs LayerRoute (routers, straight-through gates, CE + lambda R, the counted positions
precomputed on the host as collate does, the rows packed without their padding from collate's row
lengths, as train.py runs them) with its gates imposed: open  every block open (the most work
minroute can do), band  the initial gates: the middle band closed (9 of 24 blocks for Qwen, 11 of 30
for SmolLM2), as at step 0, high  all but the first and last 3 blocks closed, a high-skip setting. A
closed block still runs forward for its rows (the router's gradient needs Block(h) - h) but without
autograd, so it costs no backward and keeps no activations.

Update memory is measured after the timed rounds, in fresh workers (one at a time, after a warm-up
update): CUDA max_memory_allocated minus what was allocated before the update, or on CPU the peak
RSS over the update (VmHWM, reset before it) minus the RSS before it, with glibc told to return
freed large blocks (MALLOC_MMAP_THRESHOLD_=65536) so that RSS shows the update rather than glibc's
cache. The timed rounds run with the default allocator.
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
from common import DEFAULT_CKPT, ROOT, SHAPES, describe, random_batch, real_shape_checkpoint

from minroute.evaluation.flops import attention_flops, block_flops, lm_head_flops

GATES = {
    "open": lambda L: [True] * L,
    "band": lambda L: [not (round(L / 3) <= i < round(17 * L / 24)) for i in range(L)],
    "high": lambda L: [i < 3 or i >= L - 3 for i in range(L)],
}


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


def batches(a, vocab: int):
    """The update's micro-batches (CPU): ids, mask, labels; the same on both sides."""
    return [random_batch(a.batch, a.seq, vocab, seed=m) for m in range(a.accum)]


def build_step(side: str, ckpt: Path, a):
    """The model of one side and a function step(gates) that runs one optimizer update on the fixed
    batches."""
    from minroute.run.load import load_config

    device = torch.device(a.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = load_config(Path(ckpt))
    cpu_batches = batches(a, cfg.vocab_size)
    micro = [tuple(t.to(device) for t in b) for b in cpu_batches]
    torch.manual_seed(0)
    if side == "minroute":
        from minroute.core.update import gate_regulariser, param_groups
        from minroute.fast.kernels import ForeachAdamW, counted_positions, lm_loss_per_sample
        from minroute.fast.packing import train_forward
        from minroute.run.checkpoint import build_layerroute

        model = build_layerroute(
            ckpt, {"r": 8, "alpha": 16, "dropout": 0.05}, device=device, dtype=dtype
        ).train()
        groups = param_groups(model, 0.01, False)
        trainable = [p for g in groups for p in g["params"]]
        opt = ForeachAdamW(groups, lr=2e-4)
        # as collate does
        counted = [tuple(t.to(device) for t in counted_positions(b[2])) for b in cpu_batches]
        padded = [bool((b[1] == 0).any()) for b in cpu_batches]
        # right padding: as collate's Batch.lengths
        lengths = [b[1].sum(1).tolist() for b in cpu_batches]
        n_tokens = sum(int((b[2][:, 1:] != -100).sum()) for b in cpu_batches)
        forced = {g: torch.tensor(fn(cfg.num_hidden_layers)) for g, fn in GATES.items()}

        def step(gates: str):
            sums = torch.zeros(4, device=device)
            with model.forcing(forced[gates]):
                for (ids, mask, labels), cnt, pad, n in zip(micro, counted, padded, lengths):
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                        h, soft, _ = train_forward(model, ids, mask, padded=pad, lengths=n)
                        ce, _ = lm_loss_per_sample(h, model.lm_head.weight, labels, counted=cnt)
                    loss = ce.sum() / n_tokens + gate_regulariser(soft) / a.accum
                    loss.backward()
                    sums[0] += loss.detach()
            update_tail(opt, trainable, sums)

    else:
        import peft
        import transformers

        base = transformers.AutoModelForCausalLM.from_pretrained(
            ckpt, dtype=dtype, attn_implementation="sdpa"
        )
        model = peft.get_peft_model(
            base.to(device),
            peft.LoraConfig(
                r=8,
                lora_alpha=16,
                lora_dropout=0.05,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                task_type="CAUSAL_LM",
            ),
        ).train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=2e-4, weight_decay=0.01)

        def step(gates: str):
            sums = torch.zeros(4, device=device)
            for ids, mask, labels in micro:
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss / a.accum
                loss.backward()
                sums[0] += loss.detach()
            update_tail(opt, trainable, sums)

    return step, sum(int(b[1].sum()) for b in cpu_batches)


def update_tail(opt, trainable, sums):
    """What train.one_update does after the micro-batches, the same for both sides: zero-filled
    gradients for tensors no open row reached, clip 1.0, the non-finite read, the step."""
    for p in trainable:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    if bool(torch.isfinite(grad_norm) & torch.isfinite(sums[0])):
        opt.step()
    opt.zero_grad()


def update_flops(cfg, cpu_batches, gates: list[bool]) -> float:
    """Matmul FLOPs of one update on real tokens (see the module docstring): open blocks forward +
    backward to the hidden states, closed blocks forward, the LM head on the counted tokens forward
    + backward."""
    total = 0.0
    n_open = sum(gates)
    for _, mask, labels in cpu_batches:
        for n, c in zip(mask.sum(1).tolist(), (labels[:, 1:] != -100).sum(1).tolist()):
            blk = block_flops(cfg, n)
            total += n_open * (2 * blk + attention_flops(cfg, n)) + (len(gates) - n_open) * blk
            total += 2 * lm_head_flops(cfg, c)
    return total


PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
)


def default_peak(device: str) -> float | None:
    """Dense bf16 peak TFLOP/s of the GPU by its name (H100/H200/A100), else None."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def worker(side: str, ckpt: Path, a):
    """Load, then answer each 'step GATES' line on stdin with one JSON line: seconds and memory of
    one update."""
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
        mem = (
            torch.cuda.max_memory_allocated() / 2**20 - before
            if cuda
            else proc_status_mb("VmHWM") - before
        )
        print(json.dumps({"s": dt, "mem_mb": mem}), flush=True)


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--shape",
        choices=list(SHAPES),
        default="qwen",
        help=(
            "qwen: Qwen2.5-0.5B (24 blocks, d 896); smollm2: SmolLM2-135M (Llama, 30 blocks, d 576)"
        ),
    )
    ap.add_argument("--batch", type=int, default=4, help="sequences per micro-batch")
    ap.add_argument(
        "--accum", type=int, default=4, help="micro-batches per optimizer update (the paper: 4)"
    )
    ap.add_argument("--seq", type=int, help="padded length of a micro-batch (512, the paper's)")
    ap.add_argument("--quick", action="store_true", help="--seq 128 unless --seq is given")
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="timed rounds (each side once per round) after 1 warm-up",
    )
    ap.add_argument(
        "--gates", default="open,band,high", help="minroute gate settings to run (open, band, high)"
    )
    ap.add_argument(
        "--no-hf", action="store_true", help="minroute only (no transformers + peft side)"
    )
    ap.add_argument(
        "--peak-tflops",
        type=float,
        help=(
            "the device's dense bf16 peak, for the fraction reached "
            "(default: H100/H200/A100 by name, else none)"
        ),
    )
    ap.add_argument(
        "--ckpt",
        help=(
            "where the random real-shape checkpoint goes (default: /tmp/minroute-bench-0.5b, "
            "or /tmp/minroute-bench-smollm2-135m for --shape smollm2)"
        ),
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.seq = a.seq or (128 if a.quick else 512)
    ckpt = real_shape_checkpoint(Path(a.ckpt or DEFAULT_CKPT[a.shape]), shape=a.shape)
    if a.worker:
        return worker(a.worker, ckpt, a)
    sides = ([] if a.no_hf else ["transformers+peft"]) + [
        f"minroute:{g}" for g in a.gates.split(",")
    ]
    impls = list(dict.fromkeys(s.split(":")[0] for s in sides))
    args = [a_ for a_ in sys.argv[1:]]

    def start(impl, env=None):
        proc = subprocess.Popen(
            [sys.executable, __file__, *args, "--worker", impl],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        ready = proc.stdout.readline()
        if not ready:
            sys.exit(
                f"{impl}: the worker died while loading (run it alone with --worker {impl} to see"
                " why)"
            )
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
        print(
            f"round {r}/{a.rounds} done"
            + (
                ": " + ", ".join(f"{s} {res[s][-1]['s']:.3f} s" for s in sides)
                if r
                else " (warm-up)"
            ),
            file=sys.stderr,
            flush=True,
        )
    stop(procs)
    for impl in impls:  # memory: a fresh worker at a time, glibc returning freed large blocks
        proc, tokens = start(impl, {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
        ask({impl: proc}, impl if impl != "minroute" else "minroute:open")  # warm-up
        for side in (s for s in sides if s.split(":")[0] == impl):
            mem[side] = ask({impl: proc}, side)["mem_mb"]
        stop({impl: proc})
    ref = "transformers+peft" if not a.no_hf else None
    from minroute.run.load import load_config

    cfg = load_config(Path(ckpt))
    cpu_batches = batches(a, cfg.vocab_size)
    peak = a.peak_tflops or default_peak(a.device)
    L = cfg.num_hidden_layers
    print(f"command: python bench/bench_train.py {' '.join(args)}")
    print(
        f"device: {describe(a.device)}; dtype"
        f" {'bf16 autocast' if a.device.startswith('cuda') else 'fp32'}; shape {a.shape}"
        f" ({cfg.model_type}, {L} blocks, d {cfg.hidden_size}); one update = {a.accum} x {a.batch}"
        f" x {a.seq} ({tokens} real tokens); {a.rounds} interleaved rounds after 1 warm-up; bf16"
        f" peak {f'{peak:g} TFLOP/s' if peak else 'unknown (--peak-tflops)'}"
    )
    print(
        f"{'side':22s} {'update s':>8s} {'min-max s':>13s} {'tok/s':>8s} {'TFLOP/s':>8s}"
        f" {'of peak':>7s} {'mem MB':>8s} {'time/HF':>8s} {'min-max':>11s} {'mem/HF':>7s}"
    )
    rows = {}
    for side in sides:
        t = [x["s"] for x in res[side]]
        m = mem[side]
        gates = side.partition(":")[2] or "open"
        flops = update_flops(cfg, cpu_batches, GATES[gates](L))
        med = statistics.median(t)
        row = {
            "median_s": med,
            "min_s": min(t),
            "max_s": max(t),
            "mem_mb": m,
            "tokens_per_update": tokens,
            "tok_s": tokens / med,
            "flops_per_update": flops,
            "tflops": flops / med / 1e12,
            "peak_fraction": flops / med / 1e12 / peak if peak else None,
        }
        if ref and side != ref:
            ratios = [x["s"] / y["s"] for x, y in zip(res[side], res[ref])]
            row.update(
                ratio=statistics.median(ratios),
                ratio_min=min(ratios),
                ratio_max=max(ratios),
                mem_ratio=m / mem[ref],
            )
        rows[side] = row
        extra = (
            f" {row['ratio']:8.2f} {row['ratio_min']:5.2f}-{row['ratio_max']:<5.2f}"
            f" {row['mem_ratio']:7.2f}"
            if "ratio" in row
            else ""
        )
        frac = f"{100 * row['peak_fraction']:6.1f}%" if peak else f"{'-':>7s}"
        print(
            f"{side:22s} {med:8.3f} {row['min_s']:6.3f}-{row['max_s']:<6.3f} {row['tok_s']:8.0f} "
            f"{row['tflops']:8.2f} {frac} {m:8.0f}{extra}"
        )
    print(
        json.dumps(
            {
                "bench": "train",
                "device": a.device,
                "shape": a.shape,
                "batch": a.batch,
                "accum": a.accum,
                "seq": a.seq,
                "peak_tflops": peak,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
