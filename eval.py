"""Evaluate LayerRoute checkpoints: the paper's tables computed correctly, plus the checks it lacks.

    python eval.py --ckpt runs/paper-s42                                           # tables, controls, timing
    python eval.py --ckpt runs/paper-s42 --tasks                                   # + BFCL / GSM8K accuracy
    python eval.py --ckpt runs/paper-s42 --compare runs/noreg-s42 runs/bce-s42     # more Table 2 rows
    python eval.py --runs runs/paper-s*                                            # across seeds
    python eval.py --report studies/demo                                           # a reproduce.sh study's report
    python eval.py --demo --ckpt runs/demo                                         # the offline demo

What one checkpoint's evaluation measures, in order (`evaluate_run`): open the run and its data (every file
verified, the eval rows refused if the run trained on them, by conversation or by prompt); one shared
forward over the held-out rows for every gate setting reported (base, LoRA all open, the deployment gates
routed on each prompt, the teacher-forced gates routed on prompt + answer, the static-mask and random-mask
controls at exactly the learned routing's compute; minroute/passes.py), and the length-matched rows; the
floor those settings would cost one by one, beside its own time; then the tables from those passes: the
run's differential with a bootstrap CI and permutation p, Table 2 (skip %, differential, FLOPs, dPPL per
method), 3 (layers run and FLOPs per step type), 4 (gate patterns), 5 (PPL base / full / gated, all tokens
and assistant-only; the paper's definition beside), per-layer gates, controls, the length confound on the
length the routers see; wall-clock prefill / decode with the KV cache against its bound; task accuracy
(--tasks: BFCL's AST match on BFCL rows, strict JSON match, GSM8K); results to <run>/eval.json and
<run>/eval/*.csv. Author-preset checkpoints also get the authors' own protocol (batch 1, unpadded, prompt
+ answer). Final checkpoint unless --which best; fp32 on CPU, bf16 on CUDA.

eval.json keys (one checkpoint): checkpoint, step, updates, which, data, n_eval, route_on, eval_batching;
skip_pct {tool, planning}, skip_diff, skip_diff_ci95, skip_diff_p_permutation; teacher_forced {skip_pct,
skip_diff, gates_differ_pct}; authors_protocol (author runs); layers_run; ppl, ppl_assistant,
ppl_paper_definition {type: {base, full, gated}}; methods {name: Table 2 row}; per_type; per_layer {layer:
{p_tool, skip_tool, p_plan, skip_plan}}; controls {name: {layers_run, ce, ce_tool, ce_plan, dce_vs_learned}};
length_confound {matched_on, length, matched_pairs, matched_skip_tool, matched_skip_planning, matched_diff,
regression}; seconds {passes, floor, floor_settings, ratio, ...}; timing {prefill_b*_*, decode_*, timed_gates,
layers_skipped, bound, above_bound}; tasks {summary, samples}; samples {step_type, n_tokens, prompt_tokens,
skip_pct, mean_soft}; provenance. With --runs: seeds {runs, summary, positive_diff, n, n_given, left_out,
duplicates}. Skip% and differentials are in percentage points.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minroute.checkpoint import atomic_write_text, load_layerroute, resolve_checkpoint, trained_rows
from minroute.data import TOOL, DataFolder, collate
from minroute.evaluate import STEP_NAMES, PassResult, random_masks, static_mask, static_masks
from minroute.flops import paper_flops, sequence_flops, skip_bound_speedup
from minroute.load import load_tokenizer
from minroute.passes import Setting, floor_seconds, run_settings
from minroute.safety import UserError, default_device, device, nonneg_int, positive_int, run_cli
from minroute.stats import length_regression, log_t_ci, t_ci_clipped
from minroute.timing import decode_ms_per_token, measure, prefill

TYPES = (TOOL, 1)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="a train.py run folder (or one of its ckpt-* folders)")
    ap.add_argument("--which", choices=["latest", "best"], default="latest",
                    help="checkpoint of a run folder: latest = the final one (what the paper reports), best = lowest "
                         "validation CE")
    ap.add_argument("--compare", nargs="*", default=[], help="more checkpoints (ablations) as Table 2 rows")
    ap.add_argument("--runs", nargs="*", default=[], help="run folders of several seeds: mean, sd, Student-t CI")
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
    ap.add_argument("--floor-every", type=nonneg_int, default=4,
                    help="measure the floor on every N-th batch (scaled to all rows); 1 = all rows, 0 = do not measure")
    ap.add_argument("--tasks", action="store_true", help="generate and score tool calls (BFCL AST) and GSM8K answers")
    ap.add_argument("--task-controls", action="store_true", help="with --tasks: also the static and random masks")
    ap.add_argument("--max-new-tokens", type=positive_int, default=256, help="generation cap for --tasks")
    ap.add_argument("--seed", type=nonneg_int, default=0, help="random-mask control and bootstrap seed")
    ap.add_argument("--cache", metavar="DIR", help="keep what does not depend on the run (the base model's pass and "
                    "generations on these eval rows) in DIR, keyed by the model's and data's content, and reuse it "
                    "(reproduce.sh: one base evaluation per study)")
    ap.add_argument("--demo", action="store_true", help="evaluate the demo checkpoint (CPU, offline)")
    ap.add_argument("--report", metavar="STUDY_DIR", help="write STUDY_DIR/REPORT.md (+ study.json, tables/, figures/) "
                    "from the eval.json of every run in STUDY_DIR/runs/ (what reproduce.sh lays out); loads no model")
    a = ap.parse_args(argv)
    a.max_new_tokens = min(a.max_new_tokens, 1 << 16)
    return a


def table(title: str, header: list[str], rows: list[list], out: list | None = None, name: str = "") -> str:
    """Aligned plain-text table; also appended to `out` as (CSV name, header, rows)."""
    cells = [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    lines = [f"\n{title}", "  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    print("\n".join(lines))
    if out is not None:
        out.append((name or "".join(ch if ch.isalnum() else "_" for ch in title.lower())[:40].strip("_"), header, rows))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- a run and its data

@dataclass
class Run:
    route: object
    meta: dict
    ckpt_dir: Path
    data: DataFolder
    tok: object  # LoadedTokenizer
    batching: dict  # batch_size, pad_to
    how: str  # how rows are batched, in words

    @property
    def route_on(self) -> str:
        return self.meta["args"].get("route_on", "sequence")


def check_held_out(data: DataFolder, meta: dict, ckpt_dir: Path, say=print):
    """Refuse eval rows the run trained or selected on: same conversation, or same prompt (first user message)."""
    if not data.same_as_trained(meta):
        say(f"note: {data} is not the data folder {ckpt_dir.name} was trained on (its content differs); its "
            "held-out rows are checked against the rows the run trained on")
    trained = trained_rows(ckpt_dir)
    if trained is None:  # checkpoints written before trained_rows.txt: the data folder's own train/val
        contents, prompts = data.trained_hashes()
        trained = contents | {f"prompt:{h}" for h in prompts}
    for split in ("eval", "eval_matched", "eval_matched_sequence"):
        if not data.has_split(split):
            continue
        leak = [r for r in data.split(split).rows if r["hash"] in trained or f"prompt:{r.get('prompt_hash')}" in trained]
        if leak:
            r = leak[0]
            why = "conversation" if r["hash"] in trained else "prompt"
            raise UserError(f"{len(leak)} rows of {data}/{split} (e.g. {r['source']} row {r['row']}, by its {why}) "
                            f"were trained on by {ckpt_dir}; evaluate on held-out data (rebuild it without them)")


def eval_batching(meta: dict, batch_size: int) -> tuple[dict, str]:
    """How to batch a checkpoint's eval rows so that no row's gates depend on its batch-mates: mask-aware pooling
    ignores padding; the authors' forward (pool 'all') pools over it, so it is evaluated at the padded length
    it trained with, or one row at a time (as the authors' evaluate.py) when it trained unpadded."""
    a = meta["args"]
    if a.get("pool") != "all":
        return {"batch_size": batch_size, "pad_to": None}, "padding excluded from pooling and attention"
    if a.get("pad_to"):
        return ({"batch_size": batch_size, "pad_to": a["pad_to"]},
                f"right-padded to {a['pad_to']} tokens as in training (the authors' forward pools over padding)")
    return {"batch_size": 1, "pad_to": None}, "one row at a time (the authors' forward pools over padding)"


def open_run(path, which, model=None, data=None, device="cpu", batch_size: int = 8, say=lambda *a: None) -> Run:
    """The checkpoint (fp32 on CPU, bf16 on CUDA), its data (verified, held out) and its tokenizer."""
    ckpt_dir = resolve_checkpoint(path, which)
    route, meta = load_layerroute(ckpt_dir, which, model=model, device=device,
                                  dtype=torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    if "args" not in meta or not isinstance(meta["args"], dict):
        raise UserError(f"{ckpt_dir}/meta.json has no 'args'; not a checkpoint train.py wrote")
    folder = DataFolder(data or meta["args"]["data"])
    if not folder.has_split("eval") or len(folder.split("eval")) == 0:
        raise UserError(f"{folder}/eval: no held-out rows to evaluate; rebuild the data with --eval-counts above 0")
    model = model or meta["args"]["model"]
    folder.check_tokenizer(model)
    check_held_out(folder, meta, ckpt_dir, say=say)
    batching, how = eval_batching(meta, batch_size)
    return Run(route, meta, ckpt_dir, folder, load_tokenizer(model), batching, how)


def describe_checkpoint(run: Run, which: str) -> str:
    total = run.meta["args"].get("updates")
    final = total is not None and run.meta["step"] == total
    kind = "final" if final else ("best validation CE" if which == "best" else "latest, run not finished")
    return f"{run.ckpt_dir} (update {run.meta['step']} of {total}: {kind})"


# ----------------------------------------------------------------------------- the passes

class BaseCache:
    """What an evaluation computes of the base model alone (no LoRA, no routers: the same for every run of a study),
    in DIR under a key of the model's files, the data's identity and the evaluation settings; None = no cache."""

    def __init__(self, folder, run: "Run", args):
        self.dir = Path(folder) if folder else None
        if self.dir is None:
            return
        from minroute.load import resolve_dir
        from minroute.safety import sha256_file
        mdir = resolve_dir(run.meta["args"]["model"] if not args.model else args.model)
        weights = sorted(mdir.glob("*.safetensors"))
        ident = {"data": run.data.identity, "config": (mdir / "config.json").read_text(),
                 "weights": [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in weights],
                 "tokenizer": sha256_file(mdir / "tokenizer.json"), "batching": run.batching,
                 "max_new_tokens": args.max_new_tokens, "dtype": str(next(run.route.parameters()).dtype)}
        import hashlib
        self.key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]

    def path(self, what: str) -> Path | None:
        return None if self.dir is None else self.dir / f"base-{what}-{self.key}"

    def load_pass(self):
        p = self.path("pass")
        if p is None or not p.with_suffix(".npz").exists():
            return None
        from minroute.passes import SettingResult
        with np.load(p.with_suffix(".npz")) as z:  # plain arrays only: never unpickles
            return SettingResult(**{k: z[k] for k in z.files})

    def save_pass(self, r):
        p = self.path("pass")
        if p is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(p.name + ".tmp.npz")
            arrays = {k: v for k, v in vars(r).items() if v is not None}
            arrays["soft"] = np.full_like(r.soft, np.nan)  # the routers of this run: meaningless for another
            np.savez(tmp, **arrays)
            os.replace(tmp, p.with_suffix(".npz"))

    def load_json(self, what: str):
        p = self.path(what)
        return json.loads(p.with_suffix(".json").read_text()) if p is not None and p.with_suffix(".json").exists() \
            else None

    def save_json(self, what: str, value):
        p = self.path(what)
        if p is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(p.with_suffix(".json"), json.dumps(value, default=float))


def measure_passes(run: Run, args, dev, autocast, cache: BaseCache) -> tuple[dict[str, PassResult], dict]:
    """Every setting on the eval rows in shared passes, the length-matched rows, and the floor beside the cost."""
    L, ev = run.route.config.num_hidden_layers, run.data.split("eval")
    pad, kw = run.tok.pad_id, dict(device=dev, autocast=autocast, **run.batching)
    ones = np.ones(L, bool)
    base = cache.load_pass()
    first = ([] if base is not None else [Setting("base", ones, lora=False)]) + [
        Setting("full", ones), Setting("gated", route_on="prompt"),
        Setting("teacher-forced", route_on="sequence", loss=False)]
    t0 = time.perf_counter()
    res = run_settings(run.route, ev, pad, first, **kw)
    if base is None:
        cache.save_pass(res["base"])
    else:
        res["base"] = base
        print(f"base model pass: from the cache {cache.dir}")
    g = PassResult.of(ev, res["gated"])
    controls = [Setting("static mask", static_masks(g, args.seed)), Setting("random mask", random_masks(g, args.seed))]
    res.update(run_settings(run.route, ev, pad, controls, **kw))
    passes = {k: PassResult.of(ev, v) for k, v in res.items()}
    settings = first + controls  # the floor of what this evaluation computed (a cached base pass costs nothing)
    matched = run.data.matched_split(run.route_on)
    if matched and len(run.data.split(matched)):
        passes["matched"] = PassResult.of(run.data.split(matched), run_settings(
            run.route, run.data.split(matched), pad, [Setting("gated", route_on=run.route_on)], **kw)["gated"])
    if run.meta["args"].get("pool") == "all":  # the authors' protocol: batch 1, unpadded, prompt + answer
        passes["authors' protocol"] = PassResult.of(ev, run_settings(
            run.route, ev, pad, [Setting("a", route_on="sequence", loss=False)], 1, dev, autocast)["a"])
    seconds = {"passes": time.perf_counter() - t0}
    if args.floor_every:
        floor = floor_seconds(run.route, ev, pad, settings, res, every=args.floor_every, **kw)
        seconds.update(floor=sum(floor.values()), floor_settings=floor, floor_every=args.floor_every)
    return passes, seconds


# ----------------------------------------------------------------------------- the tables

def method_name(path, meta) -> str:
    a, name = meta["args"], Path(path).name
    if a.get("ablation") == "bce":
        name += f" (BCE, tool = {'1: open' if a.get('bce_target') == 'open' else '0: skip'})"
    return name


def differential_table(p: dict, res: dict, args, tables):
    g, tf = p["gated"], p["teacher-forced"]
    st = g.differential(args.seed)
    res.update(skip_pct={STEP_NAMES[t]: g.skip_pct(t) for t in TYPES}, skip_diff=st["diff"], skip_diff_ci95=st["ci95"],
               skip_diff_p_permutation=st["p_permutation"],
               teacher_forced={"skip_pct": {STEP_NAMES[t]: tf.skip_pct(t) for t in TYPES},
                               "skip_diff": tf.skip_pct(TOOL) - tf.skip_pct(1),
                               "gates_differ_pct": 100 * float((tf.hard != g.hard).any(1).mean())},
               layers_run={STEP_NAMES[t]: float(g.layers_run[g.sel(t)].mean()) for t in TYPES})
    rows = [["routed on the prompt (deployment: prefill gates)", g.skip_pct(TOOL), g.skip_pct(1), st["diff"], 0.0],
            ["routed on prompt + answer (teacher-forced)", tf.skip_pct(TOOL), tf.skip_pct(1),
             res["teacher_forced"]["skip_diff"], res["teacher_forced"]["gates_differ_pct"]]]
    if "authors' protocol" in p:
        a = p["authors' protocol"]
        res["authors_protocol"] = {"skip_pct": {STEP_NAMES[t]: a.skip_pct(t) for t in TYPES},
                                   "skip_diff": a.skip_pct(TOOL) - a.skip_pct(1),
                                   "gates_differ_pct": 100 * float((a.hard != g.hard).any(1).mean())}
        rows.append(["authors' protocol (batch 1, unpadded, prompt + answer)", a.skip_pct(TOOL), a.skip_pct(1),
                     res["authors_protocol"]["skip_diff"], res["authors_protocol"]["gates_differ_pct"]])
    table(f"Skip differential of this run: tool - planning = {st['diff']:+.2f} points, 95% CI [{st['ci95'][0]:+.2f}, "
          f"{st['ci95'][1]:+.2f}] (stratified bootstrap over {st['n_tool']} + {st['n_planning']} eval rows), "
          f"permutation p = {st['p_permutation']:.4f}",
          ["gates", "skip% tool", "skip% plan", "diff", "rows whose gates differ from deployment %"], rows, tables,
          "differential")


def table2_row(p: dict, cfg, seed: int) -> dict:
    gp, fp, tfp = p["gated"], p["full"], p["teacher-forced"]
    return {"skip_tool": gp.skip_pct(TOOL), "skip_planning": gp.skip_pct(1), "diff": gp.skip_pct(TOOL) - gp.skip_pct(1),
            "diff_ci95": gp.differential(seed)["ci95"], "flops_red_tool_paper": gp.flops_reduction(cfg, TOOL, False),
            "flops_red_tool_whole": gp.flops_reduction(cfg, TOOL), "dppl_tool": gp.ppl(TOOL) - fp.ppl(TOOL),
            "dppl_planning": gp.ppl(1) - fp.ppl(1), "tf_skip_tool": tfp.skip_pct(TOOL),
            "tf_skip_planning": tfp.skip_pct(1)}


def table2(run: Run, p: dict, res: dict, args, dev, autocast, tables):
    cfg, methods = run.route.config, [(method_name(run.ckpt_dir.parent, run.meta), p)]
    for path in args.compare:
        other = open_run(path, args.which, args.model, str(run.data), dev, args.batch_size)
        L = other.route.config.num_hidden_layers
        r = run_settings(other.route, run.data.split("eval"), other.tok.pad_id,
                         [Setting("full", np.ones(L, bool)), Setting("gated"),
                          Setting("teacher-forced", route_on="sequence", loss=False)], device=dev, autocast=autocast,
                         **other.batching)
        name = method_name(other.ckpt_dir.parent, other.meta)
        name = name if name not in [m[0] for m in methods] else f"{name} #{len(methods) + 1}"
        methods.append((name, {k: PassResult.of(run.data.split("eval"), v) for k, v in r.items()}))
    rows, res["methods"] = [["all open (LoRA)", 0.0, 0.0, 0.0, "", 0.0, 0.0, 0.0, 0.0, "", ""]], {}
    for name, mp in methods:
        row = res["methods"][name] = table2_row(mp, cfg, args.seed)
        ci = row["diff_ci95"]
        rows.append([name, row["skip_tool"], row["skip_planning"], row["diff"], f"[{ci[0]:+.2f}, {ci[1]:+.2f}]",
                     row["flops_red_tool_paper"], row["flops_red_tool_whole"], row["dppl_tool"], row["dppl_planning"],
                     f"{row['tf_skip_tool']:.2f}", f"{row['tf_skip_planning']:.2f}"])
    table("Table 2: skipping by method (held-out eval, prompt-routed gates; dPPL = gated - all open, same checkpoint; "
          "tf = teacher-forced gates)",
          ["method", "skip% tool", "skip% plan", "diff", "diff 95% CI", "FLOPs red. tool (paper: blocks, T=512)",
           "FLOPs red. tool (whole model, real T)", "dPPL tool", "dPPL plan", "tf skip% tool", "tf skip% plan"],
          rows, tables, "table2")


def tables_3_to_5(run: Run, p: dict, res: dict, tables):
    cfg, g = run.route.config, p["gated"]
    L, lam = cfg.num_hidden_layers, run.meta["args"].get("gate_reg", 1.0)
    rows, res["per_type"] = [], {}
    for t in TYPES:
        m = g.sel(t)
        f_run = float(np.mean([sequence_flops(cfg, int(T), int(k)) for T, k in zip(g.n_tokens[m], g.layers_run[m])]))
        f_full = float(np.mean([sequence_flops(cfg, int(T), L, routers=False) for T in g.n_tokens[m]]))
        d = res["per_type"][STEP_NAMES[t]] = {
            "n": int(m.sum()), "mean_tokens": float(g.n_tokens[m].mean()), "layers_run": float(g.layers_run[m].mean()),
            "skip_pct": g.skip_pct(t), "flops_per_seq": f_run, "flops_full": f_full,
            "flops_red_pct": 100 * (1 - f_run / f_full),
            "paper_flops_per_seq": float(np.mean([paper_flops(cfg, 512, k) for k in g.layers_run[m]]))}
        rows.append([STEP_NAMES[t], d["n"], d["mean_tokens"], d["layers_run"], d["skip_pct"], f"{f_run:.3e}",
                     f"{f_full:.3e}", d["flops_red_pct"], f"{d['paper_flops_per_seq']:.3e}"])
    table(f"Table 3: layers run and FLOPs per sequence at real lengths (of {L} layers)",
          ["step type", "n", "tokens", "layers run", "skip%", "FLOPs/seq", "FLOPs/seq all open", "FLOPs red.%",
           "paper FLOPs/seq (T=512)"], rows, tables, "table3")
    rows = [[STEP_NAMES[t], int(i), int(g.n_tokens[i]), "".join("1" if x else "0" for x in g.hard[i]),
             100 * (1 - g.hard[i].mean())] for t in TYPES for i in np.flatnonzero(g.sel(t))[:3]]
    table("Table 4: gate patterns of example inputs (1 = block ran, 0 = skipped; layer 0 first)",
          ["step type", "sample", "tokens", "pattern", "skip%"], rows, tables, "table4")
    methods = ("base", "full", "gated")
    res["ppl"] = {STEP_NAMES[t]: {m: p[m].ppl(t) for m in methods} for t in TYPES}
    res["ppl_assistant"] = {STEP_NAMES[t]: {m: p[m].ppl(t, assistant=True) for m in methods} for t in TYPES}
    res["ppl_paper_definition"] = {STEP_NAMES[t]: {m: p[m].paper_ppl(t, lam, forced=m != "gated") for m in methods}
                                   for t in TYPES}
    rows = []
    for t in TYPES:
        a, b, q = res["ppl"][STEP_NAMES[t]], res["ppl_assistant"][STEP_NAMES[t]], res["ppl_paper_definition"][STEP_NAMES[t]]
        rows.append([STEP_NAMES[t], a["base"], a["full"], a["gated"], a["gated"] - a["full"], b["base"], b["full"],
                     b["gated"], q["full"], q["gated"], q["gated"] - q["full"]])
    table(f"Table 5: PPL = exp(token-mean CE) on held-out rows, over all tokens and over the assistant's output alone "
          f"(asst); beside them the paper's definition, the mean over rows of exp(CE_i + {lam:g} x R_i)",
          ["step type", "base", "full (LoRA)", "gated", "dPPL", "asst base", "asst full", "asst gated",
           "paper-def full", "paper-def gated", "paper-def dPPL"], rows, tables, "table5")


def per_layer(p: dict, res: dict, tables):
    g, res["per_layer"], rows = p["gated"], {}, []
    print("\nPer-layer gates: mean soft gate p and hard-skip rate, tool | planning")
    for i in range(g.hard.shape[1]):
        vals = [x for t in TYPES for x in (float(g.soft[g.sel(t), i].mean()), float(1 - g.hard[g.sel(t), i].mean()))]
        res["per_layer"][i] = dict(zip(["p_tool", "skip_tool", "p_plan", "skip_plan"], vals))
        bar = "#" * int(round(20 * vals[0]))
        print(f"  layer {i:2d}  p {vals[0]:.3f} {bar:20s} skip {100 * vals[1]:5.1f}% | p {vals[2]:.3f} "
              f"{'#' * int(round(20 * vals[2])):20s} skip {100 * vals[3]:5.1f}%")
        rows.append([i, *vals])
    tables.append(("gates", ["layer", "p_tool", "skip_tool", "p_plan", "skip_plan"], rows))


def controls_table(p: dict, res: dict, tables):
    g, rows, res["controls"] = p["gated"], [], {}
    for name in ("gated", "static mask", "random mask", "full"):
        c = p[name]
        label = {"gated": "learned routing", "full": "all open"}.get(name, name)
        d = res["controls"][label] = {"layers_run": float(c.layers_run.mean()), "ce": c.ce(), "ce_tool": c.ce(TOOL),
                                      "ce_plan": c.ce(1), "dce_vs_learned": c.ce() - g.ce(),
                                      "layers_run_tool": float(c.layers_run[c.sel(TOOL)].mean()),
                                      "layers_run_plan": float(c.layers_run[c.sel(1)].mean())}
        rows.append([label, f"{d['layers_run']:.4f}", f"{d['layers_run_tool']:.3f}", f"{d['layers_run_plan']:.3f}",
                     d["ce"], d["ce_tool"], d["ce_plan"], d["dce_vs_learned"]])
    table("Controls at exactly matched compute (mean layers run equal to the learned routing's; random masks per step "
          "type): CE of each gate choice (dCE > 0: worse than the learned routing)",
          ["gates", "layers run", "tool", "plan", "CE", "CE tool", "CE plan", "dCE vs learned"], rows, tables, "controls")


def length_confound(run: Run, p: dict, res: dict, tables):
    g, route_on = p["gated"], run.route_on
    what = "prompt" if route_on == "prompt" else "whole row (prompt + answer)"
    gm = p.get("matched")
    split = run.data.matched_split(route_on)
    lengths, score, tool = g.routed_length(route_on), g.soft.mean(1), g.step_type == TOOL
    if gm is not None:
        lengths = np.concatenate([lengths, gm.routed_length(route_on)])
        score, tool = np.concatenate([score, gm.soft.mean(1)]), np.concatenate([tool, gm.step_type == TOOL])
    reg = length_regression(lengths, tool, score)
    n_pairs = int((gm.step_type == TOOL).sum()) if gm is not None else 0
    lc = res["length_confound"] = {
        "length": f"{what} tokens (what the routers pool)", "matched_on": run.data.matched_on(split) if split else None,
        "matched_split": split, "matched_pairs": n_pairs,
        "matched_skip_tool": gm.skip_pct(TOOL) if n_pairs else float("nan"),
        "matched_skip_planning": gm.skip_pct(1) if n_pairs else float("nan"), "regression": reg}
    lc["matched_diff"] = lc["matched_skip_tool"] - lc["matched_skip_planning"]
    note = "" if n_pairs else " (no pair could be matched: the two step types' routed lengths do not overlap)"
    table(f"Length confound on the length the routers see ({what} tokens): differential on pairs matched in it"
          f"{note}; OLS of mean soft gate on it and step type",
          ["set", "pairs", "skip% tool", "skip% plan", "diff", "coef /100 tok", "coef tool", "R2", "r(len,score) [95%]",
           "r(tool,score)", "r(len,tool)"],
          [["held-out eval", "", g.skip_pct(TOOL), g.skip_pct(1), res["skip_diff"], "", "", "", "", "", ""],
           [f"length-matched ({lc['matched_on']})", n_pairs, lc["matched_skip_tool"], lc["matched_skip_planning"],
            lc["matched_diff"], reg["per_100_tokens"], reg["tool"], reg["r2"],
            f"{reg['r_length_score']:.3f} [{reg['r_length_score_ci95'][0]:.2f}, {reg['r_length_score_ci95'][1]:.2f}]"
            if "r_length_score_ci95" in reg else "", reg["r_tool_score"], reg["r_length_tool"]]], tables,
          "length_confound")


# ----------------------------------------------------------------------------- timing, tasks

def timing(run: Run, g: PassResult, args, dev, autocast, tables) -> dict:
    """Prefill (batch 1 and 8) and decode ms/token with the KV cache, gated vs all open, under the evaluated model's
    autocast. The timed model is the evaluated model: LoRA unmerged, routers deciding at prefill. Each bound uses
    k from the gates of the prompts it timed; a speedup above its bound is flagged, not reported as a result."""
    route, ev = run.route, run.data.split("eval")
    cfg, L = route.config, route.config.num_hidden_layers
    n = min(args.time_prompts, len(ev))
    order = np.concatenate([np.flatnonzero(g.sel(t))[: max(1, n // 2)] for t in TYPES])[:max(n, 2)]
    out, gates, rows = {}, {}, []
    sizes = sorted({1, min(8, len(order))})
    with autocast():
        for name, forced in (("all open", torch.ones(L, dtype=torch.bool)), ("gated", None)):
            with route.forcing(forced):
                for bs in sizes:
                    batch = collate(ev, order[:bs], run.tok.pad_id, side="left", prompt_only=True)
                    ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
                    out[f"prefill_b{bs}_{name}"] = measure(lambda: prefill(route, ids, mask), 1, args.repeats, dev)
                    gates[f"prefill_b{bs}"] = route.last.hard.cpu()
                one = collate(ev, order[:1], run.tok.pad_id, prompt_only=True)["input_ids"].to(dev)
                out[f"decode_{name}"] = decode_ms_per_token(route, one, args.new_tokens, 1, args.repeats, dev)
                gates["decode"] = route.last.hard.cpu()
    out["timed_gates"] = {k: ["".join("1" if x else "0" for x in row) for row in v.tolist()] for k, v in gates.items()}
    out["layers_skipped"], out["bound"], out["above_bound"] = {}, {}, {}
    for what in [f"prefill_b{bs}" for bs in sizes] + ["decode"]:
        k = L - float(gates[what].float().sum(1).mean())
        dec_bound, pre_bound = skip_bound_speedup(cfg, k)
        bound = dec_bound if what == "decode" else pre_bound
        if what == "decode":
            a, b = out["decode_all open"]["ms_per_token"], out["decode_gated"]["ms_per_token"]
            spread = f"iqr {out['decode_gated']['iqr_ms_per_token']:.2f}"
        else:
            a, b = out[f"{what}_all open"]["median_ms"], out[f"{what}_gated"]["median_ms"]
            spread = f"{out[f'{what}_gated']['p25_ms']:.2f}-{out[f'{what}_gated']['p75_ms']:.2f}"
        above = a / b > 1.05 * bound  # faster than skipping can make it: the machine's noise, not a result
        out["layers_skipped"][what], out["bound"][what], out["above_bound"][what] = k, bound, above
        rows.append([what, a, b, spread, f"{a / b:.3f}" + (" (above bound: noisy measurement)" if above else ""), k,
                     bound])
    table(f"Wall-clock on {len(order)} held-out prompts ({dev}, LoRA unmerged = the evaluated model, median of "
          f"{args.repeats} after 1 warm-up; k = blocks skipped by the timed prompts' own gates)",
          ["measure", "all open ms", "gated ms", "gated spread", "speedup", "k", "bound"], rows, tables, "timing")
    return out


def tasks(run: Run, g: PassResult, args, dev, autocast, tables, include_base=True, quiet=False,
          cache: "BaseCache | None" = None) -> dict:
    from minroute.tasks import run_tasks
    L = run.route.config.num_hidden_layers
    methods = {"base": (np.ones(L, bool), False), "full": (np.ones(L, bool), True), "gated": (None, True)}
    cached = cache.load_json("tasks") if cache is not None and include_base else None
    if not include_base or cached is not None:
        methods.pop("base")
    if args.task_controls:
        methods.update({"static mask": (static_mask(g), True), "random mask": (random_masks(g, args.seed), True)})
    with autocast():
        out = run_tasks(run.route, run.data.split("eval"), run.tok, args.max_new_tokens, dev, methods)
    if cached is not None:  # the base model's generations: the same for every run of a study
        out["summary"] = {"base": cached["summary"], **out["summary"]}
        out["samples"] = cached["samples"] + out["samples"]
        print(f"base model generations: from the cache {cache.dir}")
    elif cache is not None and include_base:
        cache.save_json("tasks", {"summary": out["summary"]["base"],
                                  "samples": [r for r in out["samples"] if r["method"] == "base"]})
    rows = []
    for name, r in out["summary"].items():
        t, q, ci = r["tool"], r["planning"], r["ci95"]
        bfcl = f"{t['bfcl']:.1f} [{ci['bfcl'][0]:.0f}, {ci['bfcl'][1]:.0f}]" if "bfcl" in t else "-"
        rows.append([name, bfcl, t["parsable"], f"{t['exact']:.1f} [{ci['tool_exact'][0]:.0f}, {ci['tool_exact'][1]:.0f}]",
                     f"{q['accuracy']:.1f} [{ci['gsm8k'][0]:.0f}, {ci['gsm8k'][1]:.0f}]", t["layers_run"],
                     q["layers_run"], t["new_tokens"], q["new_tokens"], r["hit_cap"], r["seconds_total"]])
    if not quiet:
        table(f"Task accuracy of greedy generation on the held-out prompts (% of rows, Wilson 95% CI; cap "
              f"{args.max_new_tokens} new tokens)", ["method", "BFCL AST", "tool parsable", "tool exact (JSON)",
                                                     "GSM8K acc", "layers tool", "layers plan", "new tok tool",
                                                     "new tok plan", "hit cap %", "seconds"], rows, tables, "tasks")
    return out


# ----------------------------------------------------------------------------- one checkpoint, several seeds

def provenance(run: Run) -> dict:
    """What a report needs to say how a number was made: versions, device, data and checkpoint hashes."""
    import platform
    a = run.meta["args"]
    return {"command": "python " + " ".join(sys.argv), "python": platform.python_version(), "torch": torch.__version__,
            "eval_device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
            "train_device": a.get("device"), "preset": a.get("preset"), "ablation": a.get("ablation"),
            "seed": a.get("seed"), "model": a.get("model"), "model_revision": run.meta.get("model_revision"),
            "data": str(run.data), "data_sha256": run.data.identity, "data_manifest_sha256": run.data.raw_sha256,
            "trained_on_manifest_sha256": run.meta.get("manifest_sha256"),
            "trained_on_data_sha256": run.meta.get("data_sha256"),
            "checkpoint_sha256": {k: v["sha256"] for k, v in run.meta.get("files", {}).items()}}


def evaluate_run(run: Run, args, dev, autocast, tables) -> dict:
    """One checkpoint: the passes, then each table from them, then timing and tasks (see the module docstring)."""
    t0 = time.perf_counter()
    print(f"checkpoint: {describe_checkpoint(run, args.which)}\ngates: routed on each eval row's prompt (deployment: "
          f"prefill gates); {run.how}. Teacher-forced gates (prompt + reference answer) beside them.")
    cache = BaseCache(args.cache, run, args)
    p, seconds = measure_passes(run, args, dev, autocast, cache)
    ev = run.data.split("eval")
    res = {"checkpoint": str(run.ckpt_dir), "step": run.meta["step"], "updates": run.meta["args"].get("updates"),
           "which": args.which, "data": str(run.data), "n_eval": len(ev), "route_on": "prompt", "eval_batching": run.how}
    differential_table(p, res, args, tables)
    table2(run, p, res, args, dev, autocast, tables)
    tables_3_to_5(run, p, res, tables)
    per_layer(p, res, tables)
    plot_gates(res, run.ckpt_dir.parent)
    controls_table(p, res, tables)
    length_confound(run, p, res, tables)
    g = p["gated"]
    res["samples"] = {"step_type": g.step_type.tolist(), "n_tokens": g.n_tokens.tolist(),
                      "prompt_tokens": g.prompt_tokens.tolist(), "skip_pct": g.skip_per_sample.tolist(),
                      "mean_soft": g.soft.mean(1).tolist()}
    res["provenance"] = provenance(run)
    seconds["tables"] = time.perf_counter() - t0
    if not args.no_timing:
        res["timing"] = timing(run, g, args, dev, autocast, tables)
    if args.tasks:
        t1 = time.perf_counter()
        res["tasks"] = tasks(run, g, args, dev, autocast, tables, cache=cache)
        seconds["tasks"] = time.perf_counter() - t1
    seconds["total"] = time.perf_counter() - t0
    if "floor" in seconds:
        seconds["ratio"] = seconds["passes"] / seconds["floor"]
        print(f"\nevaluation passes {seconds['passes']:.1f}s against a floor of {seconds['floor']:.1f}s (each gate "
              f"setting's own forward, measured on every {seconds['floor_every']}th batch and scaled: "
              f"{', '.join(f'{k} {v:.1f}s' for k, v in seconds['floor_settings'].items())}) = "
              f"{seconds['ratio']:.2f}x; whole evaluation {seconds['total']:.1f}s")
    res["seconds"] = seconds
    return res


def across_seeds(args, dev, autocast, tables) -> dict:
    """Each run evaluated alone; a run that cannot be used (unreadable, refused data, non-finite metrics) or that
    is the same checkpoint as one already counted is named and left out; the others count."""
    per, skipped, duplicates, seen = [], [], [], {}
    for path in args.runs:
        try:
            run = open_run(path, args.which, args.model, args.data, dev, args.batch_size)
        except (UserError, OSError) as e:
            skipped.append({"run": str(path), "why": str(e)})
            print(f"skipped {path}: {e}")
            continue
        a = run.meta["args"]
        ident = run.meta.get("files", {}).get("adapter.safetensors", {}).get("sha256") or str(run.ckpt_dir.resolve())
        key = json.dumps({k: a.get(k) for k in sorted(a) if k not in ("out", "resume", "device", "given")},
                         sort_keys=True, default=str)
        if ident in seen or key in seen:
            first = seen.get(ident) or seen.get(key)
            duplicates.append({"run": str(path), "same_as": first})
            print(f"counted once: {path} is the same checkpoint or the same seed and settings as {first}")
            continue
        seen[ident] = seen[key] = str(path)
        ev = run.data.split("eval")
        L = run.route.config.num_hidden_layers
        r = run_settings(run.route, ev, run.tok.pad_id, [Setting("full", np.ones(L, bool)), Setting("gated")],
                         device=dev, autocast=autocast, **run.batching)
        gp, fp = PassResult.of(ev, r["gated"]), PassResult.of(ev, r["full"])
        st = gp.differential(args.seed)
        rec = {"run": str(path), "checkpoint": str(run.ckpt_dir), "step": run.meta["step"], "seed": a.get("seed"),
               "skip_tool": gp.skip_pct(TOOL), "skip_planning": gp.skip_pct(1), "diff": st["diff"],
               "diff_ci95": st["ci95"], "diff_p_permutation": st["p_permutation"], "ppl_gated_tool": gp.ppl(TOOL),
               "ppl_gated_planning": gp.ppl(1), "dppl_tool": gp.ppl(TOOL) - fp.ppl(TOOL),
               "dppl_planning": gp.ppl(1) - fp.ppl(1)}
        if args.tasks:  # task accuracy of LoRA all open vs gated, per seed
            t = tasks(run, gp, args, dev, autocast, [], include_base=False, quiet=True)["summary"]
            for m in ("full", "gated"):
                rec.update({f"tool_exact_{m}": t[m]["tool"]["exact"], f"gsm8k_acc_{m}": t[m]["planning"]["accuracy"]})
                if "bfcl" in t[m]["tool"]:
                    rec[f"bfcl_{m}"] = t[m]["tool"]["bfcl"]
        bad = [k for k, v in rec.items() if isinstance(v, float) and not np.isfinite(v)]
        if bad:
            skipped.append({"run": str(path), "why": f"non-finite {', '.join(bad)}"})
            print(f"skipped {path}: non-finite {', '.join(bad)}")
            continue
        per.append(rec)
    print(f"used {len(per)} of {len(args.runs)} runs" + (f"; left out: {', '.join(x['run'] for x in skipped)}"
                                                        if skipped else "")
          + (f"; counted once: {', '.join(x['run'] for x in duplicates)}" if duplicates else ""))
    if not per:
        raise UserError(f"none of the {len(args.runs)} runs could be evaluated: "
                        + "; ".join(f"{x['run']}: {x['why']}" for x in skipped))
    variants = {json.dumps({k: open_meta_args(p_["checkpoint"]).get(k) for k in VARIANT_KEYS}, sort_keys=True)
                for p_ in per}
    if len(variants) > 1:
        print("note: these runs differ in method settings (" + ", ".join(VARIANT_KEYS) + "); their mean mixes methods")
    table("Per seed", ["run", "seed", "skip% tool", "skip% plan", "diff", "dPPL tool", "dPPL plan"],
          [[p_["run"], p_["seed"], p_["skip_tool"], p_["skip_planning"], p_["diff"], p_["dppl_tool"], p_["dppl_planning"]]
           for p_ in per], tables, "seeds")
    summary, rows = {}, []
    keys = [k for k in per[0] if k not in ("run", "checkpoint", "step", "seed", "diff_ci95", "diff_p_permutation")]
    for key in keys:
        v = np.array([p_[key] for p_ in per], dtype=float)
        bounds = (0.0, 100.0) if key.startswith(("skip", "tool_exact", "gsm8k", "bfcl")) else (
            (-100.0, 100.0) if key == "diff" else None)
        lo, hi, clipped = (*log_t_ci(v), False) if key.startswith("ppl") else t_ci_clipped(v, bounds=bounds)
        summary[key] = {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
                        "ci95": [lo, hi], "ci95_clipped": clipped}
        rows.append([key, summary[key]["mean"], summary[key]["sd"], lo, hi, "clipped to range" if clipped else ""])
    positive = sum(p_["diff"] > 0 for p_ in per)
    table(f"Across {len(per)} of {len(args.runs)} runs (Student-t 95% CI of the mean, PPL on log scale); differential "
          f"> 0 in {positive} of {len(per)}", ["metric", "mean", "sd", "CI low", "CI high", ""], rows, tables,
          "seeds_summary")
    return {"runs": per, "summary": summary, "positive_diff": positive, "n": len(per), "n_given": len(args.runs),
            "left_out": skipped, "duplicates": duplicates}


VARIANT_KEYS = ("preset", "ablation", "bce_target", "route_on", "pool", "gate_reg", "init", "lora_r", "ce_mean")


def open_meta_args(ckpt_dir) -> dict:
    return json.loads((Path(ckpt_dir) / "meta.json").read_text()).get("args", {})


# ----------------------------------------------------------------------------- writing

def plot_gates(res, out_dir: Path):
    """gates_per_layer.png in the run folder when matplotlib is installed and the folder is writable."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    if not os.access(out_dir, os.W_OK):
        print(f"note: {out_dir} is not writable; gates_per_layer.png not drawn")
        return
    layers = sorted(res["per_layer"])
    fig, ax = plt.subplots(figsize=(8, 3))
    for key, label in (("p_tool", "tool"), ("p_plan", "planning")):
        ax.plot(layers, [res["per_layer"][i][key] for i in layers], marker="o", label=label)
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.set(xlabel="layer", ylabel="mean soft gate p", title="Router gates per layer (held-out eval)")
    ax.legend()
    fig.tight_layout()
    tmp = out_dir / ".gates_per_layer.png.tmp"
    fig.savefig(tmp, dpi=120, format="png")
    os.replace(tmp, out_dir / "gates_per_layer.png")
    plt.close("all")


RUN_OWN = {"train_log.csv", "gates.csv", "latest.json", "best.json", ".lock"}  # a run's files eval never writes


def check_outputs(args) -> tuple[Path, Path]:
    """Where results go, checked before any work: a finished evaluation is never lost to a bad path, and never
    written over a run's own files (its logs, its pointers) or a study's runs folder."""
    if args.ckpt:
        out_dir = Path(resolve_checkpoint(args.ckpt, args.which)).parent
        default_json, default_csv = out_dir / "eval.json", out_dir / "eval"
    else:  # beside the runs, never inside a study's runs/ folder (the report would take it for a run)
        base = Path(args.runs[0]).resolve().parent
        base = base.parent if base.name == "runs" else base
        default_json, default_csv = base / "seeds_eval.json", base / "seeds_eval"
    json_path = Path(args.json) if args.json else default_json
    csv_dir = Path(args.csv) if args.csv else default_csv
    if json_path.is_dir():
        raise UserError(f"--json {json_path} is a folder; give a file path")
    if json_path.name in RUN_OWN or json_path.name.startswith("ckpt-") or (json_path.parent / "meta.json").exists():
        raise UserError(f"--json {json_path}: a run's own file (or inside a checkpoint); choose another name")
    if not json_path.parent.is_dir():
        raise UserError(f"--json {json_path}: folder {json_path.parent} does not exist")
    if csv_dir.exists() and not csv_dir.is_dir():
        raise UserError(f"--csv {csv_dir} is a file; give a folder")
    if (csv_dir / "latest.json").exists() or (csv_dir / "train_log.csv").exists() or (csv_dir / "meta.json").exists():
        raise UserError(f"--csv {csv_dir} is a run folder (or a checkpoint); its gates.csv and logs would be "
                        "overwritten. Choose another folder, e.g. the default <run>/eval")
    for p in (json_path.parent, csv_dir):
        anchor = next((q for q in [p, *p.parents] if q.exists()), None)
        if anchor is None or not os.access(anchor, os.W_OK):
            raise UserError(f"{p}: cannot write there (no writable folder)")
    return json_path, csv_dir


def write_results(results: dict, tables: list, json_path: Path, csv_dir: Path):
    """eval.json and the CSV tables, each written atomically (temp file, fsync, rename)."""
    import io
    try:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json_path, json.dumps(results, indent=2, default=float))
        csv_dir.mkdir(parents=True, exist_ok=True)
        for name, header, rows in tables:
            buf = io.StringIO()
            w = csv.writer(buf)
            w.writerow(header)
            w.writerows(rows)
            atomic_write_text(csv_dir / f"{name}.csv", buf.getvalue())
    except OSError as e:
        raise UserError(f"writing the results failed ({e.strerror or e}): {e.filename or json_path}; the previous "
                        "files, if any, are unchanged") from None
    print(f"\nwrote {json_path} and {len(tables)} CSV tables in {csv_dir}")


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
        args.ckpt = args.ckpt or "runs/demo"
        args.device, args.tasks = "cpu", True
        args.time_prompts, args.max_new_tokens = min(args.time_prompts, 4), min(args.max_new_tokens, 48)
    if not args.ckpt and not args.runs:
        raise UserError("pass --ckpt RUN_DIR (or --runs DIR..., or --report STUDY_DIR)")
    json_path, csv_dir = check_outputs(args)
    dev = torch.device(args.device)

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()

    results, tables = {}, []
    if args.ckpt:
        run = open_run(args.ckpt, args.which, args.model, args.data, dev, args.batch_size, say=print)
        results.update(evaluate_run(run, args, dev, autocast, tables))
        results["settings"] = {"which": args.which, "data": str(run.data), "data_sha256": run.data.identity,
                               "checkpoint": str(run.ckpt_dir), "tasks": args.tasks, "timing": not args.no_timing,
                               "model": args.model}
    if args.runs:
        results["seeds"] = across_seeds(args, dev, autocast, tables)
    write_results(results, tables, json_path, csv_dir)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
