"""What eval.py prints and records from the passes: each table a function that fills its part of
eval.json and prints one aligned table (also kept as a CSV). The measurements are
minroute/passes.py's and evaluate.py's; the numbers here are arithmetic on them, named as the paper
names them.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import torch

from minroute.evaluation.evaluate import STEP_NAMES
from minroute.evaluation.flops import (
    decode_bound,
    paper_flops,
    sequence_flops,
    skip_bound_speedup,
)
from minroute.evaluation.stats import length_regression, log_t_ci, t_ci_clipped
from minroute.evaluation.timing import decode_ms_per_token, measure, prefill
from minroute.run.checkpoint import atomic_write_text
from minroute.run.data import TOOL, collate
from minroute.run.safety import UserError

TYPES = (TOOL, 1)


def table(
    title: str, header: list[str], rows: list[list], out: list | None = None, name: str = ""
) -> str:
    """Aligned plain-text table; also appended to `out` as (CSV name, header, rows)."""
    cells = [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)
    ]
    lines = [
        f"\n{title}",
        "  ".join(h.ljust(w) for h, w in zip(header, widths)),
        "  ".join("-" * w for w in widths),
    ]
    lines += [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in cells
    ]
    print("\n".join(lines))
    if out is not None:
        out.append(
            (
                name
                or "".join(ch if ch.isalnum() else "_" for ch in title.lower())[:40].strip("_"),
                header,
                rows,
            )
        )
    return "\n".join(lines)


def method_name(path, meta) -> str:
    a, name = meta["args"], Path(path).name
    if a.get("ablation") == "bce":
        name += f" (BCE, tool = {'1: open' if a.get('bce_target') == 'open' else '0: skip'})"
    return name


def differential_table(p: dict, res: dict, seed: int, tables):
    """The run's differential on deployment gates (bootstrap CI, permutation p), teacher-forced and
    authors' beside."""
    g, tf = p["gated"], p["teacher-forced"]
    st = g.differential(seed)
    res.update(
        skip_pct={STEP_NAMES[t]: g.skip_pct(t) for t in TYPES},
        skip_diff=st["diff"],
        skip_diff_ci95=st["ci95"],
        skip_diff_p_permutation=st["p_permutation"],
        teacher_forced={
            "skip_pct": {STEP_NAMES[t]: tf.skip_pct(t) for t in TYPES},
            "skip_diff": tf.skip_pct(TOOL) - tf.skip_pct(1),
            "gates_differ_pct": 100 * float((tf.hard != g.hard).any(1).mean()),
        },
        layers_run={STEP_NAMES[t]: float(g.layers_run[g.sel(t)].mean()) for t in TYPES},
    )
    rows = [
        [
            "routed on the prompt (deployment: prefill gates)",
            g.skip_pct(TOOL),
            g.skip_pct(1),
            st["diff"],
            0.0,
        ],
        [
            "routed on prompt + answer (teacher-forced)",
            tf.skip_pct(TOOL),
            tf.skip_pct(1),
            res["teacher_forced"]["skip_diff"],
            res["teacher_forced"]["gates_differ_pct"],
        ],
    ]
    if "authors' protocol" in p:
        a = p["authors' protocol"]
        res["authors_protocol"] = {
            "skip_pct": {STEP_NAMES[t]: a.skip_pct(t) for t in TYPES},
            "skip_diff": a.skip_pct(TOOL) - a.skip_pct(1),
            "gates_differ_pct": 100 * float((a.hard != g.hard).any(1).mean()),
        }
        rows.append(
            [
                "authors' protocol (batch 1, unpadded, prompt + answer)",
                a.skip_pct(TOOL),
                a.skip_pct(1),
                res["authors_protocol"]["skip_diff"],
                res["authors_protocol"]["gates_differ_pct"],
            ]
        )
    table(
        f"Skip differential of this run: tool - planning = {st['diff']:+.2f} points, 95% CI"
        f" [{st['ci95'][0]:+.2f}, {st['ci95'][1]:+.2f}] (stratified bootstrap over {st['n_tool']} +"
        f" {st['n_planning']} eval rows), permutation p = {st['p_permutation']:.4f}",
        ["gates", "skip% tool", "skip% plan", "diff", "rows whose gates differ from deployment %"],
        rows,
        tables,
        "differential",
    )


def table2_row(p: dict, cfg, seed: int) -> dict:
    gp, fp, tfp = p["gated"], p["full"], p["teacher-forced"]
    return {
        "skip_tool": gp.skip_pct(TOOL),
        "skip_planning": gp.skip_pct(1),
        "diff": gp.skip_pct(TOOL) - gp.skip_pct(1),
        "diff_ci95": gp.differential(seed)["ci95"],
        "flops_red_tool_paper": gp.flops_reduction(cfg, TOOL, False),
        "flops_red_tool_whole": gp.flops_reduction(cfg, TOOL),
        "dppl_tool": gp.ppl(TOOL) - fp.ppl(TOOL),
        "dppl_planning": gp.ppl(1) - fp.ppl(1),
        "tf_skip_tool": tfp.skip_pct(TOOL),
        "tf_skip_planning": tfp.skip_pct(1),
    }


def tables_3_to_5(cfg, lam: float, p: dict, res: dict, tables):
    """Table 3 (layers run, FLOPs per step type), 4 (gate patterns), 5 (PPL base / full / gated)."""
    g, L = p["gated"], cfg.num_hidden_layers
    rows, res["per_type"] = [], {}
    for t in TYPES:
        m = g.sel(t)
        f_run = float(
            np.mean(
                [
                    sequence_flops(cfg, int(T), int(k))
                    for T, k in zip(g.n_tokens[m], g.layers_run[m])
                ]
            )
        )
        f_full = float(
            np.mean([sequence_flops(cfg, int(T), L, routers=False) for T in g.n_tokens[m]])
        )
        d = res["per_type"][STEP_NAMES[t]] = {
            "n": int(m.sum()),
            "mean_tokens": float(g.n_tokens[m].mean()),
            "layers_run": float(g.layers_run[m].mean()),
            "skip_pct": g.skip_pct(t),
            "flops_per_seq": f_run,
            "flops_full": f_full,
            "flops_red_pct": 100 * (1 - f_run / f_full),
            "paper_flops_per_seq": float(
                np.mean([paper_flops(cfg, 512, k) for k in g.layers_run[m]])
            ),
        }
        rows.append(
            [
                STEP_NAMES[t],
                d["n"],
                d["mean_tokens"],
                d["layers_run"],
                d["skip_pct"],
                f"{f_run:.3e}",
                f"{f_full:.3e}",
                d["flops_red_pct"],
                f"{d['paper_flops_per_seq']:.3e}",
            ]
        )
    table(
        f"Table 3: layers run and FLOPs per sequence at real lengths (of {L} layers)",
        [
            "step type",
            "n",
            "tokens",
            "layers run",
            "skip%",
            "FLOPs/seq",
            "FLOPs/seq all open",
            "FLOPs red.%",
            "paper FLOPs/seq (T=512)",
        ],
        rows,
        tables,
        "table3",
    )
    rows = [
        [
            STEP_NAMES[t],
            int(i),
            int(g.n_tokens[i]),
            "".join("1" if x else "0" for x in g.hard[i]),
            100 * (1 - g.hard[i].mean()),
        ]
        for t in TYPES
        for i in np.flatnonzero(g.sel(t))[:3]
    ]
    table(
        "Table 4: gate patterns of example inputs (1 = block ran, 0 = skipped; layer 0 first)",
        ["step type", "sample", "tokens", "pattern", "skip%"],
        rows,
        tables,
        "table4",
    )
    methods = ("base", "full", "gated")
    res["ppl"] = {STEP_NAMES[t]: {m: p[m].ppl(t) for m in methods} for t in TYPES}
    res["ppl_assistant"] = {
        STEP_NAMES[t]: {m: p[m].ppl(t, assistant=True) for m in methods} for t in TYPES
    }
    res["ppl_paper_definition"] = {
        STEP_NAMES[t]: {m: p[m].paper_ppl(t, lam, forced=m != "gated") for m in methods}
        for t in TYPES
    }
    rows = []
    for t in TYPES:
        a, b, q = (
            res["ppl"][STEP_NAMES[t]],
            res["ppl_assistant"][STEP_NAMES[t]],
            res["ppl_paper_definition"][STEP_NAMES[t]],
        )
        rows.append(
            [
                STEP_NAMES[t],
                a["base"],
                a["full"],
                a["gated"],
                a["gated"] - a["full"],
                b["base"],
                b["full"],
                b["gated"],
                q["full"],
                q["gated"],
                q["gated"] - q["full"],
            ]
        )
    table(
        "Table 5: PPL = exp(token-mean CE) on held-out rows, over all tokens and over the"
        " assistant's output alone (asst); beside them the paper's definition, the mean over rows"
        f" of exp(CE_i + {lam:g} x R_i)",
        [
            "step type",
            "base",
            "full (LoRA)",
            "gated",
            "dPPL",
            "asst base",
            "asst full",
            "asst gated",
            "paper-def full",
            "paper-def gated",
            "paper-def dPPL",
        ],
        rows,
        tables,
        "table5",
    )


def per_layer(p: dict, res: dict, tables):
    g, res["per_layer"], rows = p["gated"], {}, []
    print("\nPer-layer gates: mean soft gate p and hard-skip rate, tool | planning")
    for i in range(g.hard.shape[1]):
        vals = [
            x
            for t in TYPES
            for x in (float(g.soft[g.sel(t), i].mean()), float(1 - g.hard[g.sel(t), i].mean()))
        ]
        res["per_layer"][i] = dict(zip(["p_tool", "skip_tool", "p_plan", "skip_plan"], vals))
        bar = "#" * int(round(20 * vals[0]))
        print(
            f"  layer {i:2d}  p {vals[0]:.3f} {bar:20s} skip {100 * vals[1]:5.1f}% | p"
            f" {vals[2]:.3f} {'#' * int(round(20 * vals[2])):20s} skip {100 * vals[3]:5.1f}%"
        )
        rows.append([i, *vals])
    tables.append(("gates", ["layer", "p_tool", "skip_tool", "p_plan", "skip_plan"], rows))


def controls_table(p: dict, res: dict, tables):
    g, rows, res["controls"] = p["gated"], [], {}
    for name in ("gated", "static mask", "random mask", "full"):
        c = p[name]
        label = {"gated": "learned routing", "full": "all open"}.get(name, name)
        d = res["controls"][label] = {
            "layers_run": float(c.layers_run.mean()),
            "ce": c.ce(),
            "ce_tool": c.ce(TOOL),
            "ce_plan": c.ce(1),
            "dce_vs_learned": c.ce() - g.ce(),
            "layers_run_tool": float(c.layers_run[c.sel(TOOL)].mean()),
            "layers_run_plan": float(c.layers_run[c.sel(1)].mean()),
        }
        rows.append(
            [
                label,
                f"{d['layers_run']:.4f}",
                f"{d['layers_run_tool']:.3f}",
                f"{d['layers_run_plan']:.3f}",
                d["ce"],
                d["ce_tool"],
                d["ce_plan"],
                d["dce_vs_learned"],
            ]
        )
    table(
        "Controls at exactly matched compute (mean layers run equal to the learned routing's;"
        " random masks per step type): CE of each gate choice (dCE > 0: worse than the learned"
        " routing)",
        ["gates", "layers run", "tool", "plan", "CE", "CE tool", "CE plan", "dCE vs learned"],
        rows,
        tables,
        "controls",
    )


def length_confound(
    p: dict, res: dict, route_on: str, split: str | None, matched_on: str | None, tables
):
    """The confound on the length the routers see: pairs matched on it, and the OLS of the gate
    score on it."""
    g = p["gated"]
    what = "prompt" if route_on == "prompt" else "whole row (prompt + answer)"
    gm = p.get("matched")
    lengths, score, tool = g.routed_length(route_on), g.soft.mean(1), g.step_type == TOOL
    if gm is not None:
        lengths = np.concatenate([lengths, gm.routed_length(route_on)])
        score, tool = (
            np.concatenate([score, gm.soft.mean(1)]),
            np.concatenate([tool, gm.step_type == TOOL]),
        )
    reg = length_regression(lengths, tool, score)
    n_pairs = int((gm.step_type == TOOL).sum()) if gm is not None else 0
    lc = res["length_confound"] = {
        "length": f"{what} tokens (what the routers pool)",
        "matched_on": matched_on,
        "matched_split": split,
        "matched_pairs": n_pairs,
        "matched_skip_tool": gm.skip_pct(TOOL) if n_pairs else float("nan"),
        "matched_skip_planning": gm.skip_pct(1) if n_pairs else float("nan"),
        "regression": reg,
    }
    lc["matched_diff"] = lc["matched_skip_tool"] - lc["matched_skip_planning"]
    note = (
        ""
        if n_pairs
        else " (no pair could be matched: the two step types' routed lengths do not overlap)"
    )
    table(
        f"Length confound on the length the routers see ({what} tokens): differential on pairs"
        f" matched in it{note}; OLS of mean soft gate on it and step type",
        [
            "set",
            "pairs",
            "skip% tool",
            "skip% plan",
            "diff",
            "coef /100 tok",
            "coef tool",
            "R2",
            "r(len,score) [95%]",
            "r(tool,score)",
            "r(len,tool)",
        ],
        [
            [
                "held-out eval",
                "",
                g.skip_pct(TOOL),
                g.skip_pct(1),
                res["skip_diff"],
                "",
                "",
                "",
                "",
                "",
                "",
            ],
            [
                f"length-matched ({lc['matched_on']})",
                n_pairs,
                lc["matched_skip_tool"],
                lc["matched_skip_planning"],
                lc["matched_diff"],
                reg["per_100_tokens"],
                reg["tool"],
                reg["r2"],
                (
                    f"{reg['r_length_score']:.3f} [{reg['r_length_score_ci95'][0]:.2f},"
                    f" {reg['r_length_score_ci95'][1]:.2f}]"
                    if "r_length_score_ci95" in reg
                    else ""
                ),
                reg["r_tool_score"],
                reg["r_length_tool"],
            ],
        ],
        tables,
        "length_confound",
    )


def timing(route, ev, pad_id: int, g, args, dev, autocast, tables) -> dict:
    """Prefill (batch 1 and 8) and decode ms/token with the KV cache, gated vs all open, under the
    evaluated model's autocast. The timed model is the evaluated model: LoRA unmerged, routers
    deciding at prefill. Each bound uses k from the gates of the prompts it timed; a speedup above
    its bound is flagged, not reported as a result.
    """
    cfg, L = route.config, route.config.num_hidden_layers
    n = min(args.time_prompts, len(ev))
    order = np.concatenate([np.flatnonzero(g.sel(t))[: max(1, n // 2)] for t in TYPES])[: max(n, 2)]
    out, gates, rows = {}, {}, []
    sizes = sorted({1, min(8, len(order))})
    with autocast():
        for name, forced in (("all open", torch.ones(L, dtype=torch.bool)), ("gated", None)):
            with route.forcing(forced):
                for bs in sizes:
                    batch = collate(ev, order[:bs], pad_id, side="left", prompt_only=True)
                    ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
                    out[f"prefill_b{bs}_{name}"] = measure(
                        lambda ids=ids, mask=mask: prefill(route, ids, mask), 1, args.repeats, dev
                    )
                    gates[f"prefill_b{bs}"] = route.last.hard.cpu()
                one = collate(ev, order[:1], pad_id, prompt_only=True)["input_ids"].to(dev)
                out[f"decode_{name}"] = decode_ms_per_token(
                    route, one, args.new_tokens, 1, args.repeats, dev
                )
                gates["decode"] = route.last.hard.cpu()
    out["timed_gates"] = {
        k: ["".join("1" if x else "0" for x in row) for row in v.tolist()] for k, v in gates.items()
    }
    out["layers_skipped"], out["bound"], out["above_bound"], out["bound_model"] = {}, {}, {}, {}
    for what in [f"prefill_b{bs}" for bs in sizes] + ["decode"]:
        k = L - float(gates[what].float().sum(1).mean())
        if what == "decode":
            bound, out["bound_model"][what] = decode_bound(cfg, k, dev.type)
        else:  # prefill is compute-bound on the blocks
            bound, out["bound_model"][what] = skip_bound_speedup(cfg, k)[1], "blocks run"
        if what == "decode":
            a, b = out["decode_all open"]["ms_per_token"], out["decode_gated"]["ms_per_token"]
            spread = f"iqr {out['decode_gated']['iqr_ms_per_token']:.2f}"
        else:
            a, b = out[f"{what}_all open"]["median_ms"], out[f"{what}_gated"]["median_ms"]
            spread = f"{out[f'{what}_gated']['p25_ms']:.2f}-{out[f'{what}_gated']['p75_ms']:.2f}"
        # faster than skipping can make it: the machine's noise, not a result
        above = a / b > 1.05 * bound
        out["layers_skipped"][what], out["bound"][what], out["above_bound"][what] = k, bound, above
        rows.append(
            [
                what,
                a,
                b,
                spread,
                f"{a / b:.3f}" + (" (above bound: noisy measurement)" if above else ""),
                k,
                bound,
            ]
        )
    table(
        f"Wall-clock on {len(order)} held-out prompts ({dev}, LoRA unmerged = the evaluated model,"
        f" median of {args.repeats} after 1 warm-up; k = blocks skipped by the timed prompts' own"
        " gates)",
        ["measure", "all open ms", "gated ms", "gated spread", "speedup", "k", "bound"],
        rows,
        tables,
        "timing",
    )
    return out


VARIANT_KEYS = (
    "preset",
    "ablation",
    "bce_target",
    "route_on",
    "pool",
    "gate_reg",
    "init",
    "lora_r",
    "ce_mean",
)


def seeds_tables(per: list[dict], n_given: int, tables) -> dict:
    """Per seed, and across seeds: mean, sd and the Student-t 95% CI of the mean (skip% and
    differentials clipped to their range and flagged, PPL on log scale); a note when the runs are
    not all one method."""
    import json

    if len({json.dumps(p["method"], sort_keys=True, default=str) for p in per}) > 1:
        print(
            "note: these runs differ in method settings ("
            + ", ".join(VARIANT_KEYS)
            + "); their mean mixes methods"
        )
    table(
        "Per seed",
        ["run", "seed", "skip% tool", "skip% plan", "diff", "dPPL tool", "dPPL plan"],
        [
            [
                p["run"],
                p["seed"],
                p["skip_tool"],
                p["skip_planning"],
                p["diff"],
                p["dppl_tool"],
                p["dppl_planning"],
            ]
            for p in per
        ],
        tables,
        "seeds",
    )
    summary, rows = {}, []
    keys = [
        k
        for k in per[0]
        if k
        not in (
            "run",
            "checkpoint",
            "step",
            "seed",
            "diff_ci95",
            "diff_p_permutation",
            "method",
        )
    ]
    for key in keys:
        v = np.array([p[key] for p in per], dtype=float)
        bounds = (
            (0.0, 100.0)
            if key.startswith(("skip", "tool_exact", "gsm8k", "bfcl"))
            else ((-100.0, 100.0) if key == "diff" else None)
        )
        lo, hi, clipped = (
            (*log_t_ci(v), False) if key.startswith("ppl") else t_ci_clipped(v, bounds=bounds)
        )
        summary[key] = {
            "mean": float(v.mean()),
            "sd": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
            "ci95": [lo, hi],
            "ci95_clipped": clipped,
        }
        rows.append(
            [
                key,
                summary[key]["mean"],
                summary[key]["sd"],
                lo,
                hi,
                "clipped to range" if clipped else "",
            ]
        )
    positive = sum(p["diff"] > 0 for p in per)
    table(
        f"Across {len(per)} of {n_given} runs (Student-t 95% CI of the mean, PPL on log scale);"
        f" differential > 0 in {positive} of {len(per)}",
        ["metric", "mean", "sd", "CI low", "CI high", ""],
        rows,
        tables,
        "seeds_summary",
    )
    return {
        "runs": per,
        "summary": summary,
        "positive_diff": positive,
        "n": len(per),
        "n_given": n_given,
    }


PATH_KEYS = ("checkpoint", "data", "model", "run", "cache")


def relative_paths(x, base: Path, key: str = ""):
    """eval.json's paths relative to its own folder, so a run or study that moves keeps its results
    readable: the path-valued keys (PATH_KEYS) and the absolute paths of the recorded command."""
    if isinstance(x, dict):
        return {k: relative_paths(v, base, k) for k, v in x.items()}
    if isinstance(x, list):
        return [relative_paths(v, base, key) for v in x]
    if isinstance(x, str) and key in PATH_KEYS and os.path.isabs(x):
        return os.path.relpath(x, base.resolve())
    if isinstance(x, str) and key == "command":
        words = x.split(" ")
        return " ".join(
            os.path.relpath(w, base.resolve()) if os.path.isabs(w) else w for w in words
        )
    return x


def write_results(results: dict, tables: list, json_path: Path, csv_dir: Path):
    """eval.json (its paths relative to its folder) and the CSV tables, each written atomically
    (temp file, fsync, rename)."""
    try:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        results = relative_paths(results, json_path.parent)
        atomic_write_text(json_path, json.dumps(results, indent=2, default=float))
        csv_dir.mkdir(parents=True, exist_ok=True)
        for name, header, rows in tables:
            buf = io.StringIO()
            w = csv.writer(buf)
            w.writerow(header)
            w.writerows(rows)
            atomic_write_text(csv_dir / f"{name}.csv", buf.getvalue())
    except OSError as e:
        raise UserError(
            f"writing the results failed ({e.strerror or e}): {e.filename or json_path}; the"
            " previous files, if any, are unchanged"
        ) from None
    print(f"\nwrote {json_path} and {len(tables)} CSV tables in {csv_dir}")
