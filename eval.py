"""Evaluate LayerRoute checkpoints: the paper's tables computed correctly, plus the checks it lacks.

    python eval.py --ckpt runs/paper-s42 --json runs/paper-s42/eval.json
    python eval.py --ckpt runs/paper-s42 --compare runs/noreg-s42 runs/bce-s42     # more Table 2 rows
    python eval.py --runs runs/paper-s*                                            # across seeds
    python eval.py --demo --ckpt runs/demo                                         # the offline demo

Everything is measured on the held-out eval split that data_prep built (rows never trained on; checked
here by content hash), with real skipping. PPL = exp(token-mean CE); the paper's exp(CE + lambda * mean
soft gate) is printed beside it. Tables: 2 (skip %, differential, FLOPs, dPPL per method), 3 (layers run
and FLOPs per step type at real lengths), 4 (gate patterns), 5 (PPL base / full / gated), per-layer gates,
matched-compute controls (static mask, random mask, all open), the length confound (length-matched
differential; regression of the gate score on length and step type), wall-clock prefill and decode with
the KV cache next to the FLOP bound, task accuracy (--tasks), and mean / sd / bootstrap CI across seeds.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch

from minroute.checkpoint import load_layerroute, resolve_checkpoint
from minroute.data import TOOL, TokenSplit, collate, read_manifest
from minroute.evaluate import (STEP_NAMES, bootstrap_ci, length_regression, random_masks, run_pass, static_mask)
from minroute.flops import paper_flops, sequence_flops, skip_bound_speedup
from minroute.load import load_tokenizer
from minroute.lora import merge_lora, unmerge_lora
from minroute.timing import decode_ms_per_token, measure, prefill

TYPES = (TOOL, 1)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="a train.py run folder (or one of its ckpt-* folders)")
    ap.add_argument("--which", choices=["best", "latest"], default="best", help="checkpoint of the run folder")
    ap.add_argument("--compare", nargs="*", default=[], help="more checkpoints (ablations) as Table 2 rows")
    ap.add_argument("--runs", nargs="*", default=[], help="run folders of several seeds: mean, sd, bootstrap CI")
    ap.add_argument("--data", help="data folder (default: the one the checkpoint was trained on)")
    ap.add_argument("--model", help="base model (default: the one the checkpoint was trained on)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="write all results to this JSON file (default: <ckpt>/eval.json)")
    ap.add_argument("--csv", help="folder for the CSV tables (default: <ckpt>/eval)")
    ap.add_argument("--no-timing", action="store_true", help="skip the wall-clock measurements")
    ap.add_argument("--time-prompts", type=int, default=8, help="held-out prompts to time")
    ap.add_argument("--new-tokens", type=int, default=16, help="decode steps timed per prompt")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (after one warm-up)")
    ap.add_argument("--tasks", action="store_true", help="generate and score tool calls and GSM8K answers")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="generation cap for --tasks")
    ap.add_argument("--seed", type=int, default=0, help="random-mask control and bootstrap seed")
    ap.add_argument("--demo", action="store_true", help="evaluate the demo checkpoint (CPU, offline)")
    return ap.parse_args(argv)


def table(title: str, header: list[str], rows: list[list], out: list | None = None) -> str:
    """Aligned plain-text table; also appended to `out` (the CSV-able form)."""
    cells = [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    lines = [f"\n{title}", "  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    text = "\n".join(lines)
    print(text)
    if out is not None:
        out.append((title, header, rows))
    return text


def check_held_out(data_dir):
    """The evaluated rows must not be in train or val (content hash)."""
    def hashes(split):
        return {json.loads(line)["hash"] for line in open(Path(data_dir) / split / "samples.jsonl", encoding="utf-8")}
    trained = hashes("train") | hashes("val")
    for split in ("eval", "eval_matched"):
        leak = hashes(split) & trained
        if leak:
            raise SystemExit(f"error: {len(leak)} samples of {data_dir}/{split} are also in train/val; rebuild the data")


def evaluate_run(path, which, model=None, data=None, device="cpu", autocast=contextlib.nullcontext):
    route, meta = load_layerroute(path, which, model=model, device=device,
                                  dtype=torch.bfloat16 if torch.device(device).type == "cuda" else None)
    data = data or meta["args"]["data"]
    pad_id = load_tokenizer(model or meta["args"]["model"]).pad_id
    return route, meta, data, pad_id


def demo_defaults(args):
    if not args.ckpt:
        args.ckpt = "runs/demo"
    args.device = "cpu"
    args.time_prompts = min(args.time_prompts, 4)
    args.max_new_tokens = min(args.max_new_tokens, 48)
    args.tasks = True


def main(argv=None):
    args = parse_args(argv)
    if args.demo:
        demo_defaults(args)
    if not args.ckpt and not args.runs:
        raise SystemExit("error: pass --ckpt RUN_DIR (or --runs DIR...)")
    device = torch.device(args.device)
    cuda = device.type == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    results, csv_tables = {}, []
    if args.ckpt:
        route, meta, data, pad_id = evaluate_run(args.ckpt, args.which, args.model, args.data, device, autocast)
        results.update(evaluate_checkpoint(route, meta, data, pad_id, args, device, autocast, csv_tables))
    if args.runs:
        results["seeds"] = across_seeds(args, device, autocast, csv_tables)
    out_dir = Path(resolve_checkpoint(args.ckpt, args.which)).parent if args.ckpt else Path(args.runs[0]).parent
    json_path = Path(args.json) if args.json else out_dir / "eval.json"
    json_path.write_text(json.dumps(results, indent=2, default=float))
    csv_dir = Path(args.csv) if args.csv else out_dir / "eval"
    csv_dir.mkdir(parents=True, exist_ok=True)
    for k, (title, header, rows) in enumerate(csv_tables):
        name = "".join(ch if ch.isalnum() else "_" for ch in title.lower()).strip("_")[:60]
        with open(csv_dir / f"{k:02d}_{name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
    print(f"\nwrote {json_path} and {len(csv_tables)} CSV tables in {csv_dir}")
    return 0


def evaluate_checkpoint(route, meta, data, pad_id, args, device, autocast, csv_tables) -> dict:
    cfg, L = route.config, route.config.num_hidden_layers
    lam = meta["args"].get("gate_reg", 1.0)
    read_manifest(data)
    check_held_out(data)
    ev, matched = TokenSplit(data, "eval"), TokenSplit(data, "eval_matched")
    kw = dict(batch_size=args.batch_size, device=device, autocast=autocast)
    passes = {m: run_pass(route, ev, pad_id, m, **kw) for m in ("base", "full", "gated")}
    g = passes["gated"]
    res = {"checkpoint": str(resolve_checkpoint(args.ckpt, args.which)), "data": str(data), "n_eval": len(ev),
           "skip_pct": {STEP_NAMES[t]: g.skip_pct(t) for t in TYPES},
           "skip_diff": g.skip_pct(TOOL) - g.skip_pct(1),
           "layers_run": {STEP_NAMES[t]: float(g.layers_run[g.sel(t)].mean()) for t in TYPES},
           "ppl": {STEP_NAMES[t]: {m: passes[m].ppl(t) for m in passes} for t in TYPES},
           "ppl_paper_definition": {STEP_NAMES[t]: {m: passes[m].paper_ppl(t, lam, forced=m != "gated")
                                                    for m in passes} for t in TYPES}}

    # ---- Table 2: methods
    rows = [["all open (LoRA)", 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]
    methods = [("LayerRoute", route, passes)]
    for path in args.compare:
        r2, m2, _, _ = evaluate_run(path, args.which, args.model, data, device, autocast)
        methods.append((Path(path).name, r2, {m: run_pass(r2, ev, pad_id, m, **kw) for m in ("full", "gated")}))
    res["methods"] = {}
    for name, _, ps in methods:
        gp, fp = ps["gated"], ps["full"]
        row = {"skip_tool": gp.skip_pct(TOOL), "skip_planning": gp.skip_pct(1),
               "diff": gp.skip_pct(TOOL) - gp.skip_pct(1),
               "flops_red_tool_paper": gp.flops_reduction(cfg, TOOL, whole_model=False),
               "flops_red_tool_whole": gp.flops_reduction(cfg, TOOL),
               "dppl_tool": gp.ppl(TOOL) - fp.ppl(TOOL), "dppl_planning": gp.ppl(1) - fp.ppl(1)}
        res["methods"][name] = row
        rows.append([name, *row.values()])
    table("Table 2: skipping by method (held-out eval; dPPL = gated - all open, same checkpoint)",
          ["method", "skip% tool", "skip% plan", "diff", "FLOPs red. tool (paper: blocks, T=512)",
           "FLOPs red. tool (whole model, real T)", "dPPL tool", "dPPL plan"], rows, csv_tables)

    # ---- Table 3: per step type
    rows, res["per_type"] = [], {}
    for t in TYPES:
        m = g.sel(t)
        f_run = float(np.mean([sequence_flops(cfg, int(T), int(k)) for T, k in zip(g.n_tokens[m], g.layers_run[m])]))
        f_full = float(np.mean([sequence_flops(cfg, int(T), L, routers=False) for T in g.n_tokens[m]]))
        d = {"n": int(m.sum()), "mean_tokens": float(g.n_tokens[m].mean()), "layers_run": float(g.layers_run[m].mean()),
             "skip_pct": g.skip_pct(t), "flops_per_seq": f_run, "flops_full": f_full,
             "flops_red_pct": 100 * (1 - f_run / f_full),
             "paper_flops_per_seq": float(np.mean([paper_flops(cfg, 512, k) for k in g.layers_run[m]]))}
        res["per_type"][STEP_NAMES[t]] = d
        rows.append([STEP_NAMES[t], d["n"], d["mean_tokens"], d["layers_run"], d["skip_pct"], f"{f_run:.3e}",
                     f"{f_full:.3e}", d["flops_red_pct"], f"{d['paper_flops_per_seq']:.3e}"])
    table(f"Table 3: layers run and FLOPs per sequence at real lengths (of {L} layers)",
          ["step type", "n", "tokens", "layers run", "skip%", "FLOPs/seq", "FLOPs/seq all open", "FLOPs red.%",
           "paper FLOPs/seq (T=512)"], rows, csv_tables)

    # ---- Table 4: gate patterns
    rows = []
    for t in TYPES:
        for i in np.flatnonzero(g.sel(t))[:3]:
            pattern = "".join("1" if x else "0" for x in g.hard[i])
            rows.append([STEP_NAMES[t], int(i), int(g.n_tokens[i]), pattern, 100 * (1 - g.hard[i].mean())])
    table("Table 4: gate patterns of example inputs (1 = block ran, 0 = skipped; layer 0 first)",
          ["step type", "sample", "tokens", "pattern", "skip%"], rows, csv_tables)

    # ---- Table 5: PPL
    rows = []
    for t in TYPES:
        p, q = res["ppl"][STEP_NAMES[t]], res["ppl_paper_definition"][STEP_NAMES[t]]
        rows.append([STEP_NAMES[t], p["base"], p["full"], p["gated"], p["gated"] - p["full"], q["full"], q["gated"],
                     q["gated"] - q["full"]])
    table(f"Table 5: PPL = exp(token-mean CE) on held-out rows; beside it the paper's exp(CE + {lam:g} x mean soft gate)",
          ["step type", "base", "full (LoRA)", "gated", "dPPL", "paper-def full", "paper-def gated",
           "paper-def dPPL"], rows, csv_tables)

    # ---- per-layer gates
    res["per_layer"] = {}
    print("\nPer-layer gates: mean soft gate p and hard-skip rate, tool | planning")
    rows = []
    for i in range(L):
        vals = []
        for t in TYPES:
            m = g.sel(t)
            vals += [float(g.soft[m, i].mean()), float(1 - g.hard[m, i].mean())]
        res["per_layer"][i] = dict(zip(["p_tool", "skip_tool", "p_plan", "skip_plan"], vals))
        bar = lambda x: ("#" * int(round(20 * x))).ljust(20)  # noqa: E731
        print(f"  layer {i:2d}  p {vals[0]:.3f} {bar(vals[0])} skip {100 * vals[1]:5.1f}% | "
              f"p {vals[2]:.3f} {bar(vals[2])} skip {100 * vals[3]:5.1f}%")
        rows.append([i, *vals])
    csv_tables.append(("per-layer gates", ["layer", "p_tool", "skip_tool", "p_plan", "skip_plan"], rows))
    plot_figures(res, Path(res["checkpoint"]).parent)

    # ---- matched-compute controls
    controls = {"learned routing": g, "static mask": run_pass(route, ev, pad_id, "gated", np.tile(static_mask(g), (len(ev), 1)), **kw),
                "random mask": run_pass(route, ev, pad_id, "gated", random_masks(g, args.seed), **kw),
                "all open": passes["full"]}
    rows, res["controls"] = [], {}
    for name, p in controls.items():
        d = {"layers_run": float(p.layers_run.mean()), "ce": p.ce(), "ce_tool": p.ce(TOOL), "ce_plan": p.ce(1),
             "dce_vs_learned": p.ce() - g.ce()}
        res["controls"][name] = d
        rows.append([name, d["layers_run"], d["ce"], d["ce_tool"], d["ce_plan"], d["dce_vs_learned"]])
    table("Controls at matched compute: CE of each gate choice (dCE > 0: worse than the learned routing)",
          ["gates", "layers run", "CE", "CE tool", "CE plan", "dCE vs learned"], rows, csv_tables)

    # ---- length confound
    gm = run_pass(route, matched, pad_id, "gated", **kw)
    score = np.concatenate([g.soft.mean(1), gm.soft.mean(1)])
    lengths = np.concatenate([g.n_tokens, gm.n_tokens])
    tool = np.concatenate([g.step_type == TOOL, gm.step_type == TOOL])
    reg = length_regression(lengths, tool, score)
    res["length_confound"] = {"matched_pairs": int((gm.step_type == TOOL).sum()),
                              "matched_skip_tool": gm.skip_pct(TOOL), "matched_skip_planning": gm.skip_pct(1),
                              "matched_diff": gm.skip_pct(TOOL) - gm.skip_pct(1), "regression": reg}
    lc = res["length_confound"]
    table("Length confound: differential on length-matched pairs; OLS of mean soft gate on length and step type",
          ["set", "pairs", "skip% tool", "skip% plan", "diff", "coef /100 tok", "coef tool", "R2", "r(len,score)",
           "r(tool,score)", "r(len,tool)"],
          [["held-out eval", "", g.skip_pct(TOOL), g.skip_pct(1), res["skip_diff"], "", "", "", "", "", ""],
           ["length-matched", lc["matched_pairs"], lc["matched_skip_tool"], lc["matched_skip_planning"],
            lc["matched_diff"], reg["per_100_tokens"], reg["tool"], reg["r2"], reg["r_length_score"],
            reg["r_tool_score"], reg["r_length_tool"]]], csv_tables)

    if not args.no_timing:
        res["timing"] = timing(route, ev, pad_id, g, args, device, csv_tables)
    if args.tasks:
        from minroute.tasks import run_tasks
        tok = load_tokenizer(args.model or meta["args"]["model"])
        masks = {"static mask": static_mask(g), "random mask": random_masks(g, args.seed)}
        res["tasks"] = run_tasks(route, ev, g, tok, args, device, csv_tables, table, masks)
    return res


def timing(route, ev: TokenSplit, pad_id, g, args, device, csv_tables) -> dict:
    """Prefill (batch 1 and 8) and decode ms/token with the KV cache: gated vs all open, LoRA merged."""
    cfg, L = route.config, route.config.num_hidden_layers
    n = min(args.time_prompts, len(ev))
    order = np.concatenate([np.flatnonzero(g.sel(t))[: max(1, n // 2)] for t in TYPES])[:max(n, 2)]
    merge_lora(route.base)
    out, rows = {}, []
    try:
        for name, forced in (("all open", torch.ones(L, dtype=torch.bool)), ("gated", None)):
            with route.forcing(forced):
                for bs in (1, 8):
                    batch = collate(ev, order[:bs], pad_id, side="left", prompt_only=True)
                    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
                    stats = measure(lambda: prefill(route, ids, mask), 1, args.repeats, device)
                    out[f"prefill_b{bs}_{name}"] = stats
                one = collate(ev, order[:1], pad_id, prompt_only=True)["input_ids"].to(device)
                out[f"decode_{name}"] = decode_ms_per_token(route, one, args.new_tokens, 1, args.repeats, device)
    finally:
        unmerge_lora(route.base)
    k = L - float(g.layers_run[order].mean())  # layers skipped on the timed prompts
    dec_bound, pre_bound = skip_bound_speedup(cfg, k)
    for what in ("prefill_b1", "prefill_b8"):
        a, b = out[f"{what}_all open"], out[f"{what}_gated"]
        rows.append([what, a["median_ms"], b["median_ms"], f"{b['p25_ms']:.2f}-{b['p75_ms']:.2f}",
                     a["median_ms"] / b["median_ms"], pre_bound])
    a, b = out["decode_all open"], out["decode_gated"]
    rows.append(["decode ms/token (b1)", a["ms_per_token"], b["ms_per_token"], f"iqr {b['iqr_ms_per_token']:.2f}",
                 a["ms_per_token"] / b["ms_per_token"], dec_bound])
    out["layers_skipped_on_timed_prompts"] = k
    out["bound"] = {"prefill": pre_bound, "decode": dec_bound}
    table(f"Wall-clock on {len(order)} held-out prompts ({device}, LoRA merged, median of {args.repeats} after 1 "
          f"warm-up; {k:.2f} of {L} blocks skipped)", ["measure", "all open ms", "gated ms", "gated spread",
                                                         "speedup", "bound"], rows, csv_tables)
    return out


def across_seeds(args, device, autocast, csv_tables) -> dict:
    per = []
    for path in args.runs:
        route, meta, data, pad_id = evaluate_run(path, args.which, args.model, args.data, device, autocast)
        check_held_out(data)
        ev = TokenSplit(data, "eval")
        kw = dict(batch_size=args.batch_size, device=device, autocast=autocast)
        gp, fp = run_pass(route, ev, pad_id, "gated", **kw), run_pass(route, ev, pad_id, "full", **kw)
        per.append({"run": str(path), "seed": meta["args"].get("seed"), "skip_tool": gp.skip_pct(TOOL),
                    "skip_planning": gp.skip_pct(1), "diff": gp.skip_pct(TOOL) - gp.skip_pct(1),
                    "ppl_gated_tool": gp.ppl(TOOL), "ppl_gated_planning": gp.ppl(1),
                    "dppl_tool": gp.ppl(TOOL) - fp.ppl(TOOL), "dppl_planning": gp.ppl(1) - fp.ppl(1)})
        if args.tasks:  # task accuracy of LoRA all open vs gated, per seed
            from minroute.tasks import run_tasks
            tok = load_tokenizer(args.model or meta["args"]["model"])
            t = run_tasks(route, ev, gp, tok, args, device, [], lambda *a, **k: None, include_base=False)["summary"]
            for m in ("full", "gated"):
                per[-1].update({f"tool_exact_{m}": t[m]["tool"]["exact"], f"gsm8k_acc_{m}": t[m]["planning"]["accuracy"]})
    table("Per seed", ["run", "seed", "skip% tool", "skip% plan", "diff", "dPPL tool", "dPPL plan"],
          [[p["run"], p["seed"], p["skip_tool"], p["skip_planning"], p["diff"], p["dppl_tool"], p["dppl_planning"]]
           for p in per], csv_tables)
    summary, rows = {}, []
    keys = ["skip_tool", "skip_planning", "diff", "ppl_gated_tool", "ppl_gated_planning", "dppl_tool", "dppl_planning"]
    if args.tasks:
        keys += ["tool_exact_full", "tool_exact_gated", "gsm8k_acc_full", "gsm8k_acc_gated"]
    for key in keys:
        v = np.array([p[key] for p in per])
        lo, hi = bootstrap_ci(v, seed=args.seed)
        summary[key] = {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
                        "ci95": [lo, hi]}
        rows.append([key, summary[key]["mean"], summary[key]["sd"], lo, hi])
    positive = sum(p["diff"] > 0 for p in per)
    table(f"Across {len(per)} seeds (bootstrap 95% CI of the mean); differential > 0 in {positive} of {len(per)}",
          ["metric", "mean", "sd", "CI low", "CI high"], rows, csv_tables)
    return {"runs": per, "summary": summary, "positive_diff": positive, "n": len(per)}


def plot_figures(res, out_dir: Path):
    """PNG figures when matplotlib is installed (pip install 'minroute[plot]'); silently absent otherwise."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    layers = sorted(res["per_layer"])
    fig, ax = plt.subplots(figsize=(8, 3))
    for key, label in (("p_tool", "tool"), ("p_plan", "planning")):
        ax.plot(layers, [res["per_layer"][i][key] for i in layers], marker="o", label=label)
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.set(xlabel="layer", ylabel="mean soft gate p", title="Router gates per layer (held-out eval)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "gates_per_layer.png", dpi=120)
    log = out_dir / "train_log.csv"
    if log.exists():
        rows = list(csv.DictReader(open(log)))
        rows = [r for r in rows if r.get("ce")]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3))
        steps = [int(r["step"]) for r in rows]
        a1.plot(steps, [float(r["ce"]) for r in rows], label="train CE")
        a1.set(xlabel="update", ylabel="CE")
        a2.plot(steps, [float(r["skip_tool"]) for r in rows], label="tool")
        a2.plot(steps, [float(r["skip_plan"]) for r in rows], label="planning")
        a2.set(xlabel="update", ylabel="skip %")
        a2.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "training_curves.png", dpi=120)
    plt.close("all")


if __name__ == "__main__":
    sys.exit(main())
