"""Evaluate LayerRoute checkpoints: the paper's tables computed correctly, plus the checks it lacks.

    python eval.py --ckpt runs/paper-s42 --json runs/paper-s42/eval.json
    python eval.py --ckpt runs/paper-s42 --compare runs/noreg-s42 runs/bce-s42     # more Table 2 rows
    python eval.py --runs runs/paper-s*                                            # across seeds
    python eval.py --report studies/demo                                           # a reproduce.sh study's report
    python eval.py --demo --ckpt runs/demo                                         # the offline demo

Everything is measured on the held-out eval split that data_prep built (rows the run never trained on:
checked against the content hashes its checkpoint lists), with real skipping, on the final checkpoint
unless --which best. Gates are the deployment's (routed on the prompt, as at prefill), teacher-forced ones
beside them. PPL = exp(token-mean CE); the paper's exp(CE + lambda * mean soft gate) is printed beside it.
Tables: the run's differential with a bootstrap CI and permutation p, 2 (skip %, differential, FLOPs, dPPL
per method), 3 (layers run and FLOPs per step type at real lengths), 4 (gate patterns), 5 (PPL base / full /
gated, all tokens and assistant-only), per-layer gates, matched-compute controls (static mask, random mask,
all open), the length confound (length-matched differential; regression of the gate score on length and
step type), wall-clock prefill and decode with the KV cache next to the FLOP bound, task accuracy (--tasks),
and mean / sd / bootstrap CI across seeds (--runs).

eval.json keys (one checkpoint): checkpoint, step, updates, which, data, n_eval, route_on, eval_batching;
skip_pct {tool, planning}, skip_diff, skip_diff_ci95, skip_diff_p_permutation; teacher_forced {skip_pct,
skip_diff, gates_differ_pct}; layers_run; ppl, ppl_assistant, ppl_paper_definition {type: {base, full,
gated}}; methods {name: Table 2 row}; per_type {type: Table 3 row}; per_layer {layer: {p_tool, skip_tool,
p_plan, skip_plan}}; controls {name: {layers_run, ce, ce_tool, ce_plan, dce_vs_learned}}; length_confound
{matched_pairs, matched_skip_tool, matched_skip_planning, matched_diff, regression}; timing {prefill_b*_*,
decode_*, timed_gates, layers_skipped, bound}; tasks {summary, samples}; samples {step_type, n_tokens,
prompt_tokens, skip_pct, mean_soft} per eval row; provenance {command, python, torch, devices, preset,
ablation, seed, model, data, manifest hashes, checkpoint_sha256}. With --runs: seeds {runs, summary,
positive_diff, n, n_given, left_out}. Skip% and differentials are in percentage points.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from minroute.checkpoint import load_layerroute, resolve_checkpoint, trained_rows
from minroute.data import TOOL, TokenSplit, check_tokenizer, collate, manifest_hash, read_manifest
from minroute.evaluate import (STEP_NAMES, bootstrap_ci, differential_stats, length_regression, random_masks, run_pass,
                               static_mask, t_ci)
from minroute.flops import paper_flops, sequence_flops, skip_bound_speedup
from minroute.load import load_tokenizer
from minroute.safety import UserError, default_device, device, nonneg_int, positive_int, run_cli
from minroute.timing import decode_ms_per_token, measure, prefill

TYPES = (TOOL, 1)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="a train.py run folder (or one of its ckpt-* folders)")
    ap.add_argument("--which", choices=["latest", "best"], default="latest",
                    help="checkpoint of a run folder: latest = the final one (what the paper reports), best = lowest "
                         "validation CE")
    ap.add_argument("--compare", nargs="*", default=[], help="more checkpoints (ablations) as Table 2 rows")
    ap.add_argument("--runs", nargs="*", default=[], help="run folders of several seeds: mean, sd, bootstrap CI")
    ap.add_argument("--data", help="data folder (default: the one the checkpoint was trained on)")
    ap.add_argument("--model", help="base model (default: the one the checkpoint was trained on)")
    ap.add_argument("--batch-size", type=positive_int, default=8)
    ap.add_argument("--device", type=device, default=default_device(), help="cpu, cuda or cuda:N")
    ap.add_argument("--json", help="write all results to this JSON file (default: <ckpt>/eval.json)")
    ap.add_argument("--csv", help="folder for the CSV tables (default: <ckpt>/eval)")
    ap.add_argument("--no-timing", action="store_true", help="skip the wall-clock measurements")
    ap.add_argument("--time-prompts", type=positive_int, default=8, help="held-out prompts to time")
    ap.add_argument("--new-tokens", type=positive_int, default=16, help="decode steps timed per prompt")
    ap.add_argument("--repeats", type=positive_int, default=3, help="timed repeats (after one warm-up)")
    ap.add_argument("--tasks", action="store_true", help="generate and score tool calls and GSM8K answers")
    ap.add_argument("--max-new-tokens", type=positive_int, default=256, help="generation cap for --tasks")
    ap.add_argument("--seed", type=nonneg_int, default=0, help="random-mask control and bootstrap seed")
    ap.add_argument("--demo", action="store_true", help="evaluate the demo checkpoint (CPU, offline)")
    ap.add_argument("--report", metavar="STUDY_DIR", help="write STUDY_DIR/REPORT.md (+ study.json, tables/, figures/) "
                    "from the eval.json of every run in STUDY_DIR/runs/ (what reproduce.sh lays out); loads no model")
    return ap.parse_args(argv)


def table(title: str, header: list[str], rows: list[list], out: list | None = None, name: str = "") -> str:
    """Aligned plain-text table; also appended to `out` as (CSV name, header, rows)."""
    cells = [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    lines = [f"\n{title}", "  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    text = "\n".join(lines)
    print(text)
    if out is not None:
        out.append((name or "".join(ch if ch.isalnum() else "_" for ch in title.lower())[:40].strip("_"), header, rows))
    return text


def check_data(data_dir, meta: dict, ckpt_dir: Path, model_path: str, say=print) -> dict:
    """The data an evaluation may use: verified files, the checkpoint's tokenizer, rows it never trained on."""
    manifest = read_manifest(data_dir, verify=True)
    check_tokenizer(manifest, data_dir, model_path)
    if manifest_hash(data_dir) != meta.get("manifest_sha256"):
        say(f"note: {data_dir} is not the data folder {ckpt_dir.name} was trained on (its manifest differs); its "
            "held-out rows are checked against the rows the run trained on")
    trained = trained_rows(ckpt_dir)
    if trained is None:  # checkpoints written before trained_rows.txt: the data folder's own train/val
        trained = {r["hash"] for split in ("train", "val") for r in TokenSplit(data_dir, split).rows}
    for split in ("eval", "eval_matched"):
        leak = [r for r in TokenSplit(data_dir, split).rows if r["hash"] in trained]
        if leak:
            raise UserError(f"{len(leak)} rows of {data_dir}/{split} (e.g. {leak[0]['source']} row {leak[0]['row']}) "
                            f"were trained on by {ckpt_dir}; evaluate on held-out data (rebuild it without them)")
    return manifest


def load_run(path, which, model=None, data=None, device="cpu", say=lambda *a: None):
    """(LayerRoute, meta, checkpoint dir, data dir, pad id): fp32 on CPU (as trained there), bf16 on CUDA."""
    ckpt_dir = resolve_checkpoint(path, which)
    route, meta = load_layerroute(ckpt_dir, which, model=model, device=device,
                                  dtype=torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    data = data or meta["args"]["data"]
    model = model or meta["args"]["model"]
    check_data(data, meta, ckpt_dir, model, say=say)
    return route, meta, ckpt_dir, data, load_tokenizer(model).pad_id


def describe_checkpoint(ckpt_dir: Path, meta: dict, which: str) -> str:
    a = meta["args"]
    total = a.get("updates")
    final = total is not None and meta["step"] == total
    kind = "final" if final else ("best validation CE" if which == "best" else "latest, run not finished")
    return f"{ckpt_dir} (update {meta['step']} of {total}: {kind})"


def eval_batching(meta: dict, batch_size: int) -> tuple[dict, str]:
    """How to batch a checkpoint's eval rows so that no row's gates depend on its batch-mates.

    Mask-aware pooling ignores padding. The authors' forward (pool 'all') pools over it: evaluate at the padded
    length it was trained with, or one row at a time (as the authors' evaluate.py) when it trained unpadded."""
    a = meta["args"]
    if a.get("pool") != "all":
        return {"batch_size": batch_size, "pad_to": None}, "padding excluded from pooling and attention"
    if a.get("pad_to"):
        return ({"batch_size": batch_size, "pad_to": a["pad_to"]},
                f"right-padded to {a['pad_to']} tokens as in training (the authors' forward pools over padding)")
    return {"batch_size": 1, "pad_to": None}, "one row at a time (the authors' forward pools over padding)"


def demo_defaults(args):
    if not args.ckpt:
        args.ckpt = "runs/demo"
    args.device = "cpu"
    args.time_prompts = min(args.time_prompts, 4)
    args.max_new_tokens = min(args.max_new_tokens, 48)
    args.tasks = True


def check_outputs(args) -> tuple[Path, Path]:
    """Where results go, checked before any work: a finished evaluation is never lost to a bad path."""
    if args.ckpt:
        out_dir = Path(resolve_checkpoint(args.ckpt, args.which)).parent
    else:
        out_dir = Path(args.runs[0]).resolve().parent
    json_path = Path(args.json) if args.json else out_dir / "eval.json"
    csv_dir = Path(args.csv) if args.csv else out_dir / "eval"
    if json_path.is_dir():
        raise UserError(f"--json {json_path} is a folder; give a file path")
    if not json_path.parent.is_dir():
        raise UserError(f"--json {json_path}: folder {json_path.parent} does not exist")
    if not os.access(json_path.parent, os.W_OK):
        raise UserError(f"--json {json_path}: folder {json_path.parent} is not writable")
    if csv_dir.exists() and not csv_dir.is_dir():
        raise UserError(f"--csv {csv_dir} is a file; give a folder")
    anchor = next((p for p in [csv_dir, *csv_dir.parents] if p.exists()), None)
    if anchor is None or not os.access(anchor, os.W_OK):
        raise UserError(f"--csv {csv_dir}: cannot create it (no writable parent folder)")
    return json_path, csv_dir


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        from minroute.report import write_report
        study = Path(args.report)
        if not (study / "runs").is_dir():
            raise UserError(f"--report {study}: no runs/ folder in it; pass the --out folder of reproduce.sh")
        try:
            out = write_report(study)
        except ValueError as e:
            raise UserError(str(e)) from None
        print(f"wrote {study / 'REPORT.md'} ({len(out['runs'])} runs, {len(out['left_out'])} left out; figures: "
              f"{', '.join(out['figures']) or 'none'})")
        return 0
    if args.demo:
        demo_defaults(args)
    if not args.ckpt and not args.runs:
        raise UserError("pass --ckpt RUN_DIR (or --runs DIR..., or --report STUDY_DIR)")
    json_path, csv_dir = check_outputs(args)
    device = torch.device(args.device)
    cuda = device.type == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    results, csv_tables = {}, []
    if args.ckpt:
        route, meta, ckpt_dir, data, pad_id = load_run(args.ckpt, args.which, args.model, args.data, device, say=print)
        print(f"checkpoint: {describe_checkpoint(ckpt_dir, meta, args.which)}")
        results.update(evaluate_checkpoint(route, meta, ckpt_dir, data, pad_id, args, device, autocast, csv_tables))
    if args.runs:
        results["seeds"] = across_seeds(args, device, autocast, csv_tables)
    json_path.write_text(json.dumps(results, indent=2, default=float))
    csv_dir.mkdir(parents=True, exist_ok=True)
    for name, header, rows in csv_tables:
        with open(csv_dir / f"{name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
    print(f"\nwrote {json_path} and {len(csv_tables)} CSV tables in {csv_dir}")
    return 0


def provenance(meta: dict, ckpt_dir: Path, data) -> dict:
    """What a report needs to say how a number was made: versions, device, data and checkpoint hashes."""
    import platform
    a = meta["args"]
    return {"command": "python " + " ".join(sys.argv), "python": platform.python_version(), "torch": torch.__version__,
            "eval_device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
            "train_device": a.get("device"), "preset": a.get("preset"), "ablation": a.get("ablation"),
            "seed": a.get("seed"), "model": a.get("model"), "data": str(data),
            "data_manifest_sha256": manifest_hash(data), "trained_on_manifest_sha256": meta.get("manifest_sha256"),
            "checkpoint_sha256": {k: v["sha256"] for k, v in meta.get("files", {}).items()}}


def method_name(path, meta) -> str:
    a = meta["args"]
    name = Path(path).name
    if a.get("ablation") == "bce":
        name += f" (BCE, tool = {'1: open' if a.get('bce_target') == 'open' else '0: skip'})"
    return name


def evaluate_checkpoint(route, meta, ckpt_dir, data, pad_id, args, device, autocast, csv_tables) -> dict:
    cfg, L = route.config, route.config.num_hidden_layers
    lam = meta["args"].get("gate_reg", 1.0)
    ev, matched = TokenSplit(data, "eval"), TokenSplit(data, "eval_matched")
    batching, how = eval_batching(meta, args.batch_size)
    kw = dict(device=device, autocast=autocast, **batching)
    passes = {m: run_pass(route, ev, pad_id, m, **kw) for m in ("base", "full", "gated")}
    g = passes["gated"]  # deployment gates: routed on the prompt, as at prefill
    tf = run_pass(route, ev, pad_id, "gated", route_on="sequence", **kw)  # teacher-forced: prompt + reference answer
    stats = differential_stats(g, seed=args.seed)
    print(f"gates: routed on each eval row's prompt (deployment: prefill gates); {how}. Teacher-forced gates (prompt "
          "+ reference answer, as the authors evaluated) beside them.")
    res = {"checkpoint": str(ckpt_dir), "step": meta["step"], "updates": meta["args"].get("updates"),
           "which": args.which, "data": str(data), "n_eval": len(ev), "route_on": "prompt", "eval_batching": how,
           "skip_pct": {STEP_NAMES[t]: g.skip_pct(t) for t in TYPES},
           "skip_diff": g.skip_pct(TOOL) - g.skip_pct(1), "skip_diff_ci95": stats["ci95"],
           "skip_diff_p_permutation": stats["p_permutation"],
           "teacher_forced": {"skip_pct": {STEP_NAMES[t]: tf.skip_pct(t) for t in TYPES},
                              "skip_diff": tf.skip_pct(TOOL) - tf.skip_pct(1),
                              "gates_differ_pct": 100 * float((tf.hard != g.hard).any(1).mean())},
           "layers_run": {STEP_NAMES[t]: float(g.layers_run[g.sel(t)].mean()) for t in TYPES},
           "ppl": {STEP_NAMES[t]: {m: passes[m].ppl(t) for m in passes} for t in TYPES},
           "ppl_assistant": {STEP_NAMES[t]: {m: passes[m].ppl(t, assistant=True) for m in passes} for t in TYPES},
           "ppl_paper_definition": {STEP_NAMES[t]: {m: passes[m].paper_ppl(t, lam, forced=m != "gated")
                                                    for m in passes} for t in TYPES}}
    res["samples"] = {"step_type": g.step_type.tolist(), "n_tokens": g.n_tokens.tolist(),
                      "prompt_tokens": ev.prompt_len.tolist(), "skip_pct": g.skip_per_sample.tolist(),
                      "mean_soft": g.soft.mean(1).tolist()}
    res["provenance"] = provenance(meta, ckpt_dir, data)
    table(f"Skip differential of this run: tool - planning = {res['skip_diff']:+.2f} points, 95% CI "
          f"[{stats['ci95'][0]:+.2f}, {stats['ci95'][1]:+.2f}] (stratified bootstrap over {stats.get('n_tool', 0)} + "
          f"{stats.get('n_planning', 0)} eval rows), permutation p = {stats['p_permutation']:.4f}",
          ["gates", "skip% tool", "skip% plan", "diff", "rows whose gates differ %"],
          [["prompt (deployment)", g.skip_pct(TOOL), g.skip_pct(1), res["skip_diff"], 0.0],
           ["prompt + answer (teacher-forced)", tf.skip_pct(TOOL), tf.skip_pct(1), res["teacher_forced"]["skip_diff"],
            res["teacher_forced"]["gates_differ_pct"]]], csv_tables, "differential")

    # ---- Table 2: methods
    rows = [["all open (LoRA)", 0.0, 0.0, 0.0, "", 0.0, 0.0, 0.0, 0.0, "", ""]]
    methods = [(method_name(ckpt_dir.parent, meta), passes, tf)]
    for path in args.compare:
        r2, m2, c2, _, _ = load_run(path, args.which, args.model, data, device)
        kw2 = {**kw, **eval_batching(m2, args.batch_size)[0]}
        ps = {m: run_pass(r2, ev, pad_id, m, **kw2) for m in ("full", "gated")}
        name = method_name(c2.parent, m2)
        name = name if name not in [m[0] for m in methods] else f"{name} #{len(methods) + 1}"
        methods.append((name, ps, run_pass(r2, ev, pad_id, "gated", route_on="sequence", **kw2)))
    res["methods"] = {}
    for name, ps, tfp in methods:
        gp, fp = ps["gated"], ps["full"]
        ci = differential_stats(gp, seed=args.seed)["ci95"]
        row = {"skip_tool": gp.skip_pct(TOOL), "skip_planning": gp.skip_pct(1),
               "diff": gp.skip_pct(TOOL) - gp.skip_pct(1), "diff_ci95": ci,
               "flops_red_tool_paper": gp.flops_reduction(cfg, TOOL, whole_model=False),
               "flops_red_tool_whole": gp.flops_reduction(cfg, TOOL),
               "dppl_tool": gp.ppl(TOOL) - fp.ppl(TOOL), "dppl_planning": gp.ppl(1) - fp.ppl(1),
               "tf_skip_tool": tfp.skip_pct(TOOL), "tf_skip_planning": tfp.skip_pct(1)}
        res["methods"][name] = row
        rows.append([name, row["skip_tool"], row["skip_planning"], row["diff"], f"[{ci[0]:+.2f}, {ci[1]:+.2f}]",
                     row["flops_red_tool_paper"], row["flops_red_tool_whole"], row["dppl_tool"], row["dppl_planning"],
                     f"{row['tf_skip_tool']:.2f}", f"{row['tf_skip_planning']:.2f}"])
    table("Table 2: skipping by method (held-out eval, prompt-routed gates; dPPL = gated - all open, same checkpoint; "
          "tf = teacher-forced gates)",
          ["method", "skip% tool", "skip% plan", "diff", "diff 95% CI", "FLOPs red. tool (paper: blocks, T=512)",
           "FLOPs red. tool (whole model, real T)", "dPPL tool", "dPPL plan", "tf skip% tool", "tf skip% plan"],
          rows, csv_tables, "table2")

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
           "paper FLOPs/seq (T=512)"], rows, csv_tables, "table3")

    # ---- Table 4: gate patterns
    rows = []
    for t in TYPES:
        for i in np.flatnonzero(g.sel(t))[:3]:
            pattern = "".join("1" if x else "0" for x in g.hard[i])
            rows.append([STEP_NAMES[t], int(i), int(g.n_tokens[i]), pattern, 100 * (1 - g.hard[i].mean())])
    table("Table 4: gate patterns of example inputs (1 = block ran, 0 = skipped; layer 0 first)",
          ["step type", "sample", "tokens", "pattern", "skip%"], rows, csv_tables, "table4")

    # ---- Table 5: PPL
    rows = []
    for t in TYPES:
        p, q = res["ppl"][STEP_NAMES[t]], res["ppl_paper_definition"][STEP_NAMES[t]]
        a = res["ppl_assistant"][STEP_NAMES[t]]
        rows.append([STEP_NAMES[t], p["base"], p["full"], p["gated"], p["gated"] - p["full"], a["base"], a["full"],
                     a["gated"], q["full"], q["gated"], q["gated"] - q["full"]])
    table(f"Table 5: PPL = exp(token-mean CE) on held-out rows, over all tokens and over the assistant's output alone "
          f"(asst; a tool row's all-token PPL is mostly its schema); beside them the paper's exp(CE + {lam:g} x mean "
          "soft gate)", ["step type", "base", "full (LoRA)", "gated", "dPPL", "asst base", "asst full", "asst gated",
                         "paper-def full", "paper-def gated", "paper-def dPPL"], rows, csv_tables, "table5")

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
    csv_tables.append(("gates", ["layer", "p_tool", "skip_tool", "p_plan", "skip_plan"], rows))
    plot_figures(res, ckpt_dir.parent)

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
          ["gates", "layers run", "CE", "CE tool", "CE plan", "dCE vs learned"], rows, csv_tables, "controls")

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
            reg["r_tool_score"], reg["r_length_tool"]]], csv_tables, "length_confound")

    if not args.no_timing:
        res["timing"] = timing(route, ev, pad_id, g, args, device, csv_tables)
    if args.tasks:
        from minroute.tasks import run_tasks
        tok = load_tokenizer(args.model or meta["args"]["model"])
        masks = {"static mask": static_mask(g), "random mask": random_masks(g, args.seed)}
        res["tasks"] = run_tasks(route, ev, g, tok, args, device, csv_tables, table, masks)
    return res


def timing(route, ev: TokenSplit, pad_id, g, args, device, csv_tables) -> dict:
    """Prefill (batch 1 and 8) and decode ms/token with the KV cache, gated vs all open.

    The timed model is the evaluated model: LoRA unmerged (merging into bf16 weights would round most of the
    update away), routers deciding at prefill. Each bound uses k from the gates of the prompts it timed."""
    cfg, L = route.config, route.config.num_hidden_layers
    n = min(args.time_prompts, len(ev))
    order = np.concatenate([np.flatnonzero(g.sel(t))[: max(1, n // 2)] for t in TYPES])[:max(n, 2)]
    out, gates, rows = {}, {}, []
    sizes = sorted({1, min(8, len(order))})
    for name, forced in (("all open", torch.ones(L, dtype=torch.bool)), ("gated", None)):
        with route.forcing(forced):
            for bs in sizes:
                batch = collate(ev, order[:bs], pad_id, side="left", prompt_only=True)
                ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
                out[f"prefill_b{bs}_{name}"] = measure(lambda: prefill(route, ids, mask), 1, args.repeats, device)
                gates[f"prefill_b{bs}"] = route.last.hard.cpu()
            one = collate(ev, order[:1], pad_id, prompt_only=True)["input_ids"].to(device)
            out[f"decode_{name}"] = decode_ms_per_token(route, one, args.new_tokens, 1, args.repeats, device)
            gates["decode"] = route.last.hard.cpu()
    out["timed_gates"] = {k: ["".join("1" if x else "0" for x in row) for row in v.tolist()] for k, v in gates.items()}
    out["layers_skipped"], out["bound"] = {}, {}
    for what in [f"prefill_b{bs}" for bs in sizes] + ["decode"]:
        k = L - float(gates[what].float().sum(1).mean())
        dec_bound, pre_bound = skip_bound_speedup(cfg, k)
        bound = dec_bound if what == "decode" else pre_bound
        out["layers_skipped"][what], out["bound"][what] = k, bound
        if what == "decode":
            a, b = out["decode_all open"], out["decode_gated"]
            rows.append(["decode ms/token (b1)", a["ms_per_token"], b["ms_per_token"],
                         f"iqr {b['iqr_ms_per_token']:.2f}", a["ms_per_token"] / b["ms_per_token"], k, bound])
        else:
            a, b = out[f"{what}_all open"], out[f"{what}_gated"]
            rows.append([what, a["median_ms"], b["median_ms"], f"{b['p25_ms']:.2f}-{b['p75_ms']:.2f}",
                         a["median_ms"] / b["median_ms"], k, bound])
    table(f"Wall-clock on {len(order)} held-out prompts ({device}, LoRA unmerged = the evaluated model, median of "
          f"{args.repeats} after 1 warm-up; k = blocks skipped by the timed prompts' own gates)",
          ["measure", "all open ms", "gated ms", "gated spread", "speedup", "k", "bound"], rows, csv_tables, "timing")
    return out


def across_seeds(args, device, autocast, csv_tables) -> dict:
    """Each run evaluated alone; a run that cannot be used (unreadable, refused data, non-finite metrics) is
    named and left out of the means and CIs, and the others still count."""
    per, skipped = [], []
    for path in args.runs:
        try:
            route, meta, ckpt_dir, data, pad_id = load_run(path, args.which, args.model, args.data, device)
        except (UserError, OSError) as e:
            skipped.append({"run": str(path), "why": str(e)})
            print(f"skipped {path}: {e}")
            continue
        ev = TokenSplit(data, "eval")
        kw = dict(device=device, autocast=autocast, **eval_batching(meta, args.batch_size)[0])
        gp, fp = run_pass(route, ev, pad_id, "gated", **kw), run_pass(route, ev, pad_id, "full", **kw)
        st = differential_stats(gp, seed=args.seed)
        rec = {"run": str(path), "checkpoint": str(ckpt_dir), "step": meta["step"], "seed": meta["args"].get("seed"),
               "skip_tool": gp.skip_pct(TOOL), "skip_planning": gp.skip_pct(1), "diff": gp.skip_pct(TOOL) - gp.skip_pct(1),
               "diff_ci95": st["ci95"], "diff_p_permutation": st["p_permutation"],
               "ppl_gated_tool": gp.ppl(TOOL), "ppl_gated_planning": gp.ppl(1),
               "dppl_tool": gp.ppl(TOOL) - fp.ppl(TOOL), "dppl_planning": gp.ppl(1) - fp.ppl(1)}
        if args.tasks:  # task accuracy of LoRA all open vs gated, per seed
            from minroute.tasks import run_tasks
            tok = load_tokenizer(args.model or meta["args"]["model"])
            t = run_tasks(route, ev, gp, tok, args, device, [], lambda *a, **k: None, include_base=False)["summary"]
            for m in ("full", "gated"):
                rec.update({f"tool_exact_{m}": t[m]["tool"]["exact"], f"gsm8k_acc_{m}": t[m]["planning"]["accuracy"]})
        bad = [k for k, v in rec.items() if isinstance(v, float) and not np.isfinite(v)]
        if bad:
            skipped.append({"run": str(path), "why": f"non-finite {', '.join(bad)}"})
            print(f"skipped {path}: non-finite {', '.join(bad)}")
            continue
        per.append(rec)
    print(f"used {len(per)} of {len(args.runs)} runs" + (f"; left out: {', '.join(x['run'] for x in skipped)}"
                                                        if skipped else ""))
    if not per:
        raise UserError(f"none of the {len(args.runs)} runs could be evaluated: "
                        + "; ".join(f"{x['run']}: {x['why']}" for x in skipped))
    table("Per seed", ["run", "seed", "skip% tool", "skip% plan", "diff", "dPPL tool", "dPPL plan"],
          [[p["run"], p["seed"], p["skip_tool"], p["skip_planning"], p["diff"], p["dppl_tool"], p["dppl_planning"]]
           for p in per], csv_tables, "seeds")
    summary, rows = {}, []
    keys = ["skip_tool", "skip_planning", "diff", "ppl_gated_tool", "ppl_gated_planning", "dppl_tool", "dppl_planning"]
    if args.tasks:
        keys += ["tool_exact_full", "tool_exact_gated", "gsm8k_acc_full", "gsm8k_acc_gated"]
    for key in keys:
        v = np.array([p[key] for p in per])
        lo, hi = t_ci(v)
        summary[key] = {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
                        "ci95": [lo, hi], "ci95_bootstrap": list(bootstrap_ci(v, seed=args.seed))}
        rows.append([key, summary[key]["mean"], summary[key]["sd"], lo, hi])
    positive = sum(p["diff"] > 0 for p in per)
    table(f"Across {len(per)} of {len(args.runs)} runs (Student-t 95% CI of the mean); differential > 0 in {positive} "
          f"of {len(per)}", ["metric", "mean", "sd", "CI low", "CI high"], rows, csv_tables, "seeds_summary")
    return {"runs": per, "summary": summary, "positive_diff": positive, "n": len(per), "n_given": len(args.runs),
            "left_out": skipped}


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
    sys.exit(run_cli(main))
