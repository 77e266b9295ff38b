"""Inference benchmark at the real 0.5B shape (random weights): do skipped blocks cost nothing?

    python bench/bench_infer.py                      # CPU fp32
    python bench/bench_infer.py --device cuda        # GPU bf16

For k blocks forced closed (layers 8 .. 8+k-1, inside the band LayerRoute closes first), measured
against k = 0 on the same code path (LayerRoute with imposed gates, real skipping):
- prefill of one --prefill-len prompt (the LM head on the last position, as generation does), bound
  L / (L - k): compute-bound blocks;
- KV-cache decode at batch 1 after a --decode-prompt prompt, ms/token over --new-tokens steps, bound
  = weight bytes read per token with and without the k blocks (lm_head included), docs/reference.md
  §5. The goal is a measured speedup of at least 90% of the bound. Then decode at batch 1 next to
  transformers' `generate` (greedy, its own KV cache) on the same weights, and on CUDA next to the
  bandwidth floor (weight bytes / measured device-to-device copy bandwidth).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from common import REAL, describe, real_shape_checkpoint

from minroute.evaluation.flops import skip_bound_speedup
from minroute.evaluation.timing import decode_ms_per_token, measure, prefill
from minroute.run.checkpoint import build_layerroute


def hf_decode_ms_per_token(ckpt, ids, n_new, repeats, device, dtype):
    import transformers

    hf = (
        transformers.Qwen2ForCausalLM.from_pretrained(ckpt, dtype=dtype, attn_implementation="sdpa")
        .to(device)
        .eval()
    )

    def run(n):
        cfg = transformers.GenerationConfig(
            do_sample=False,
            pad_token_id=0,
            repetition_penalty=1.0,
            max_new_tokens=n,
            min_new_tokens=n,
        )
        with torch.no_grad():
            hf.generate(ids, generation_config=cfg)

    full, one = (
        measure(lambda: run(n_new + 1), 1, repeats, device),
        measure(lambda: run(1), 1, repeats, device),
    )
    return (full["median_ms"] - one["median_ms"]) / n_new


def bandwidth_gbs(device) -> float:
    """Device-to-device copy of 1 GiB, bytes read + written per second."""
    x = torch.empty(2**28, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    t = measure(lambda: y.copy_(x), 2, 10, device)
    return 2 * x.numel() * 4 / (t["median_ms"] / 1000) / 1e9


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--decode-prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument(
        "--repeats", type=int, default=5, help="timed rounds over all k, after one warm-up round"
    )
    ap.add_argument("--ks", default="0,4,9", help="blocks forced closed")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers decode comparison")
    ap.add_argument("--ckpt", default="/tmp/minroute-bench-0.5b")
    a = ap.parse_args()
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ckpt = real_shape_checkpoint(Path(a.ckpt))
    route = build_layerroute(
        ckpt, {"r": 8, "alpha": 16, "dropout": 0.0}, device=device, dtype=dtype
    ).eval()
    g = torch.Generator().manual_seed(0)
    long_ids = torch.randint(0, REAL.vocab_size, (1, a.prefill_len), generator=g).to(device)
    short_ids = torch.randint(0, REAL.vocab_size, (1, a.decode_prompt), generator=g).to(device)
    L = REAL.num_hidden_layers
    ks = [int(x) for x in a.ks.split(",")]
    masks = {}
    for k in ks:
        masks[k] = torch.ones(L, dtype=torch.bool)
        masks[k][8 : 8 + k] = False

    def timed(k, what):
        with route.forcing(masks[k]), torch.no_grad():
            if what == "prefill":
                return measure(lambda: prefill(route, long_ids), 0, 1, device)["median_ms"]
            return decode_ms_per_token(route, short_ids, a.new_tokens, 0, 1, device)["ms_per_token"]

    for k in ks:  # warm-up
        timed(k, "prefill"), timed(k, "decode")
    times = {(k, w): [] for k in ks for w in ("prefill", "decode")}
    for _ in range(a.repeats):  # round-robin over k, so drift of the machine hits every k alike
        for k in ks:
            for w in ("prefill", "decode"):
                times[(k, w)].append(timed(k, w))
    med = {key: statistics.median(v) for key, v in times.items()}
    rows = []
    for k in ks:
        bound_dec, bound_pre = skip_bound_speedup(REAL, k)
        pre, dec = med[(k, "prefill")], med[(k, "decode")]
        s_pre, s_dec = med[(ks[0], "prefill")] / pre, med[(ks[0], "decode")] / dec
        rows.append(
            (k, pre, s_pre, bound_pre, s_pre / bound_pre, dec, s_dec, bound_dec, s_dec / bound_dec)
        )
    given = [f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if v not in (None, False)]
    print(f"command: python bench/bench_infer.py {' '.join(given)}")
    print(
        f"device: {describe(device)}; {dtype}; prefill 1 x {a.prefill_len}; decode batch 1 after"
        f" {a.decode_prompt} tokens, {a.new_tokens} steps; median of {a.repeats} rounds over all k"
        " after 1 warm-up round"
    )
    print(
        f"{'k':>2s} | {'prefill ms':>10s} {'speedup':>7s} {'bound':>6s} {'of bound':>8s} | "
        f"{'decode ms/tok':>13s} {'speedup':>7s} {'bound':>6s} {'of bound':>8s}"
    )
    for r in rows:
        print(
            f"{r[0]:2d} | {r[1]:10.1f} {r[2]:7.3f} {r[3]:6.3f} {100 * r[4]:7.1f}% | {r[5]:13.2f}"
            f" {r[6]:7.3f} {r[7]:6.3f} {100 * r[8]:7.1f}%"
        )
    if not a.no_hf:
        with route.forcing(torch.ones(L, dtype=torch.bool)):
            ours = decode_ms_per_token(route, short_ids, a.new_tokens, 1, a.repeats, device)[
                "ms_per_token"
            ]
        theirs = hf_decode_ms_per_token(ckpt, short_ids, a.new_tokens, a.repeats, device, dtype)
        line = (
            f"decode batch 1, all blocks: minroute {ours:.2f} ms/token, transformers {theirs:.2f}"
            f" ms/token ({theirs / ours:.2f}x)"
        )
        if device.type == "cuda":
            weight_bytes = sum(p.numel() * p.element_size() for p in route.base.parameters())
            floor = weight_bytes / (bandwidth_gbs(device) * 1e9) * 1000
            line += (
                f"; bandwidth floor {floor:.3f} ms/token (minroute {ours / floor:.1f}x,"
                f" transformers {theirs / floor:.1f}x)"
            )
        print(line)


if __name__ == "__main__":
    main()
