"""The study report's sections on answers and on training: what skipping costs in right answers,
what the learned routing is worth against masks of the same compute, whether a differential emerges
over training, what drives the routers, and the LoRA-only learning curve.

Sources, all files a study folder already holds (no model is loaded):
- each run's eval.json `tasks` (greedy generations scored per row: eval.py --tasks --task-controls);
- each run's train_log.csv (per log interval: skip% by step type on the training batches, the
  gradient norm per parameter group before the clip, the share of updates clipped; per validation:
  skip% by step type on the validation rows) and gates.csv (per layer and log interval: the
  hard-skip rate);
- `curves/<run>/update-<update>.json`: eval.py --tasks-only on the checkpoints a LoRA-only run kept
  (train.py --keep-every), the learning curve.

`sections(study, runs, variants)` returns (markdown lines, a JSON-able dict of every number shown,
figure names); report.py puts them into REPORT.md and study.json.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from minroute.evaluation.stats import bootstrap_ci, t_ci, wilson_ci

AUTHORS_DIFF = (-5.71, 8.37)  # docs/reference.md §2: the authors' 10 seeds, mean (sd)
PAPER_DIFF = 12.91
TASK_METHODS = (  # (eval.json method, what the report calls it)
    ("full", "all blocks open"),
    ("gated", "gated (learned routing)"),
    ("static mask", "static mask, same compute"),
    ("random mask", "random masks, same compute"),
)
TASKS = (  # (key, step type, sample field, column)
    ("bfcl", "tool_call", "bfcl", "BFCL AST %"),
    ("parsable", "tool_call", "parsable", "tool parsable %"),
    ("exact", "tool_call", "exact", "tool exact %"),
    ("gsm8k", "planning", "correct", "GSM8K %"),
)


def read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="", errors="replace") as f:  # a damaged line is not a lost report
        return list(csv.DictReader(f))


def number(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _rows(res: dict, method: str, step_type: str, field: str) -> dict[int, bool]:
    """{eval row: scored right} of one method's generations in a run's eval.json."""
    return {
        s["sample"]: bool(s[field])
        for s in res.get("tasks", {}).get("samples", [])
        if s["method"] == method and s["step_type"] == step_type and field in s
    }


def rate(res: dict, method: str, step_type: str, field: str) -> dict | None:
    """k of n rows right, in %, with its Wilson 95% interval; None when the method was not run."""
    got = _rows(res, method, step_type, field)
    if not got:
        return None
    k, n = sum(got.values()), len(got)
    lo, hi = wilson_ci(k, n)
    return {"pct": 100 * k / n, "k": k, "n": n, "ci95": [100 * lo, 100 * hi]}


def across(values: list[dict]) -> dict:
    """One cell over seeds: a run's own Wilson interval for one seed, else the mean of the runs'
    rates with a Student-t 95% CI (clipped to [0, 100]). Seeds that agree exactly (3 x 1/80) give a
    t interval of width 0, which would claim a certainty the rows do not have: then the interval is
    the Wilson interval of the seeds' rows pooled ("pooled": True)."""
    if len(values) == 1:
        return {**values[0], "seeds": 1}
    p = [v["pct"] for v in values]
    out = {"pct": float(np.mean(p)), "seeds": len(p), "values": p}
    if max(p) == min(p) and all("k" in v for v in values):
        k, n = sum(v["k"] for v in values), sum(v["n"] for v in values)
        return {**out, "ci95": [100 * x for x in wilson_ci(k, n)], "pooled": True}
    return {**out, "ci95": list(t_ci(p, bounds=(0.0, 100.0)))}


def cell(x: dict | None, digits: int = 1) -> str:
    if x is None:
        return "n/a"
    lo, hi = x["ci95"]
    seeds = f", {x['seeds']} seeds" if x.get("seeds", 1) > 1 else ""
    seeds += ", rows pooled" if x.get("pooled") else ""
    count = f" ({x['k']}/{x['n']})" if "k" in x else ""
    return f"{x['pct']:.{digits}f}{count} [{lo:.{digits}f}, {hi:.{digits}f}{seeds}]"


def paired(res: dict, a: str, b: str, step_type: str, field: str, seed: int = 0) -> dict | None:
    """Method a minus method b on the same eval rows, in points, with a percentile-bootstrap 95% CI
    over the rows (the rows are paired: one prompt, two gate settings)."""
    ra, rb = _rows(res, a, step_type, field), _rows(res, b, step_type, field)
    common = sorted(set(ra) & set(rb))
    if not common:
        return None
    d = np.array([100.0 * (ra[i] - rb[i]) for i in common])
    lo, hi = bootstrap_ci(d, n=4000, seed=seed) if d.size > 1 else (float("nan"),) * 2
    return {"diff": float(d.mean()), "ci95": [lo, hi], "n": int(d.size)}


def signed(x: dict | None) -> str:
    if x is None:
        return "n/a"
    lo, hi = x["ci95"]
    return f"{x['diff']:+.1f} [{lo:+.1f}, {hi:+.1f}]"


# ----------------------------------------------------------------------------- answers


def answers(runs: list[dict], variants: list[str]) -> tuple[list[str], dict]:
    """## What does skipping cost in answers? One row per (variant, gate setting), plus the base
    model: BFCL AST, parsable and GSM8K with intervals, and the layers each ran."""
    tasked = [r for r in runs if r["res"].get("tasks", {}).get("samples")]
    md = ["## Task accuracy: what does skipping cost in answers?", ""]
    if not tasked:
        return md + ["Not measured (eval.py --tasks).", ""], {}
    out, rows = {}, []
    base = [rate(tasked[0]["res"], "base", t, f) for _, t, f, _ in TASKS]
    if base[0] is not None or base[2] is not None:
        out["base"] = dict(zip([k for k, *_ in TASKS], base))
        rows.append(["base model (no LoRA)", "", *[cell(b) for b in base], "all", "all"])
    for v in variants:
        mine = [r for r in tasked if r["variant"] == v]
        methods = TASK_METHODS[:1] if v == "lora-only" else TASK_METHODS
        for m, label in methods:
            cells = {}
            for key, t, f, _ in TASKS:
                got = [x for x in (rate(r["res"], m, t, f) for r in mine) if x is not None]
                cells[key] = across(got) if got else None
            if all(c is None for c in cells.values()):
                continue
            layers = [
                np.mean([r["res"]["tasks"]["summary"][m][k]["layers_run"] for r in mine])
                for k in ("tool", "planning")
            ]
            out[f"{v} / {m}"] = {**cells, "layers_tool": layers[0], "layers_planning": layers[1]}
            name = "LoRA alone, every block (no routers)" if v == "lora-only" else label
            rows.append(
                [f"`{v}`", name, *[cell(cells[k]) for k, *_ in TASKS]]
                + [f"{layers[0]:.2f}", f"{layers[1]:.2f}"]
            )
    n = [
        rate(tasked[0]["res"], "full", t, f)
        for t, f in (("tool_call", "parsable"), ("planning", "correct"))
    ]
    md += [
        (
            f"Greedy generation on the held-out prompts ({n[0]['n'] if n[0] else 0} tool-call rows"
            f" and {n[1]['n'] if n[1] else 0} GSM8K rows) under each"
            " gate setting. One seed: the run's own Wilson 95% interval over its rows (k/n right);"
            " several: the mean over seeds with a Student-t 95% CI. Parsable = the calls BFCL's"
            " AST check reads (minroute/evaluation/bfcl.py; a call cut off by the token cap is not"
            " one). The static and random masks run exactly the learned routing's layers (each row"
            " skips k or k + 1 blocks)."
        ),
        "",
        _table(
            ["variant", "gates", *[c for *_, c in TASKS], "layers run tool", "layers run planning"],
            rows,
        ),
        "",
    ]
    return md, out


def routing_worth(runs: list[dict]) -> tuple[list[str], dict]:
    """## Is the learned routing worth its routers? Per routed run: gated against the static and
    random masks at the same layers run, in CE (the controls pass) and in answers (paired over the
    same rows)."""
    md = ["## Is the learned routing worth its routers?", ""]
    routed = [
        r
        for r in runs
        if r["variant"] != "lora-only"
        and "static mask" in r["res"].get("tasks", {}).get("summary", {})
    ]
    if not routed:
        return md + ["Not measured (eval.py --tasks --task-controls).", ""], {}
    out, rows = {}, []
    for r in routed:
        res, c = r["res"], r["res"].get("controls", {})
        rec = {
            "layers_run": {
                k: c.get(k, {}).get("layers_run")
                for k in ("learned routing", "static mask", "random mask")
            },
            "dce_static": c.get("static mask", {}).get("dce_vs_learned"),
            "dce_random": c.get("random mask", {}).get("dce_vs_learned"),
        }
        for key, t, f, _ in (TASKS[0], TASKS[3]):
            for other in ("full", "static mask", "random mask"):
                rec[f"{key}_gated_minus_{other.split()[0]}"] = paired(res, "gated", other, t, f)
        out[r["run"]] = rec
        lr = rec["layers_run"]
        rows.append(
            [
                f"`{Path(r['run']).name}`",
                " / ".join("n/a" if lr[k] is None else f"{lr[k]:.2f}" for k in lr),
                "n/a" if rec["dce_static"] is None else f"{rec['dce_static']:+.3f}",
                "n/a" if rec["dce_random"] is None else f"{rec['dce_random']:+.3f}",
                signed(rec["bfcl_gated_minus_full"]),
                signed(rec["bfcl_gated_minus_static"]),
                signed(rec["bfcl_gated_minus_random"]),
                signed(rec["gsm8k_gated_minus_static"]),
                signed(rec["gsm8k_gated_minus_random"]),
                signed(rec["gsm8k_gated_minus_full"]),
            ]
        )
    md += [
        (
            "dCE = CE of the mask minus CE of the learned routing on the held-out rows (> 0: the"
            " routing is better). Answers: gated minus mask in points on the same rows, with a"
            " percentile-bootstrap 95% CI over rows (> 0: the routing is better); gated minus all"
            " open is what skipping cost this run's own LoRA. A routing that skips nothing has"
            " nothing to compare: its masks close nothing either."
        ),
        "",
        _table(
            [
                "run",
                "layers run: learned / static / random",
                "dCE static",
                "dCE random",
                "BFCL gated − all open",
                "BFCL gated − static",
                "BFCL gated − random",
                "GSM8K gated − static",
                "GSM8K gated − random",
                "GSM8K gated − all open",
            ],
            rows,
        ),
        "",
    ]
    return md, out


# ----------------------------------------------------------------------------- training


def differential_over_training(study: Path, runs: list[dict]) -> tuple[list[str], dict]:
    """## Does a differential emerge over training? Each routed run's skip% by step type at every
    validation (its validation rows, prompt-routed gates), its final held-out differential, beside
    the paper's and the authors'."""
    md = ["## Does a differential emerge over training?", ""]
    routed = [r for r in runs if r["variant"] != "lora-only"]
    out, steps = {}, set()
    for r in routed:
        val = [x for x in read_csv(study / r["run"] / "train_log.csv") if x.get("val_ce")]
        pts = {
            int(x["step"]): (number(x["val_skip_tool"]), number(x["val_skip_plan"])) for x in val
        }
        train = [x for x in read_csv(study / r["run"] / "train_log.csv") if x.get("ce")]
        out[r["run"]] = {
            "validation": {
                s: {"tool": t, "planning": p, "diff": t - p} for s, (t, p) in pts.items()
            },
            "train_intervals": {
                int(x["step"]): number(x["skip_tool"]) - number(x["skip_plan"]) for x in train
            },
            "final_eval": {"diff": r["res"]["skip_diff"], "ci95": r["res"]["skip_diff_ci95"]},
        }
        steps |= set(pts)
    if not out:
        return md + ["No routed run.", ""], {}
    rows = []
    for s in sorted(steps):
        cells = []
        for r in routed:
            v = out[r["run"]]["validation"].get(s)
            cells.append(
                "" if v is None else f"{v['diff']:+.1f} ({v['tool']:.1f} / {v['planning']:.1f})"
            )
        rows.append([s, *cells])
    finals = []
    for r in routed:
        f = out[r["run"]]["final_eval"]
        finals.append(f"{f['diff']:+.2f} [{f['ci95'][0]:+.2f}, {f['ci95'][1]:+.2f}]")
    rows.append(["held-out eval, final", *finals])
    md += [
        (
            "Differential = skip% tool − skip% planning, in points, at each validation (its"
            " validation rows; in brackets skip% tool / planning), and on the held-out eval rows at"
            " the end (95% bootstrap CI over rows). The paper claims"
            f" {PAPER_DIFF:+.2f}; the authors' own code over 10 seeds gave"
            f" {AUTHORS_DIFF[0]:+.2f} (sd {AUTHORS_DIFF[1]})."
        ),
        "",
        _table(["update", *[f"`{Path(r['run']).name}`" for r in routed]], rows),
        "",
    ]
    return md, out


def gradient_norms(study: Path, runs: list[dict]) -> tuple[list[str], dict]:
    """## What drives the routers? The gradient norm per parameter group before the clip (logged
    updates), the routers' share of it, and whether the routers set the clip for LoRA."""
    md = ["## What drives the routers?", ""]
    out, rows = {}, []
    for r in runs:
        log = [x for x in read_csv(study / r["run"] / "train_log.csv") if x.get("ce")]
        log = [x for x in log if x.get("grad_lora") not in (None, "")]
        if not log:
            continue
        clip = number(r["method"].get("clip"))
        g = {
            k: np.array([number(x.get(f"grad_{k}")) for x in log])
            for k in ("lora", "router_weight", "router_bias")
        }
        total = np.array([number(x["grad_norm"]) for x in log])
        router = np.sqrt(
            np.nan_to_num(g["router_weight"]) ** 2 + np.nan_to_num(g["router_bias"]) ** 2
        )
        share = router**2 / np.maximum(total**2, 1e-30)
        clipped = [number(x.get("clipped")) for x in log]
        rec = {
            "logged_updates": len(log),
            "clip": clip,
            "median": {
                k: float(np.nanmedian(v)) if np.isfinite(v).any() else None for k, v in g.items()
            },
            "median_total": float(np.median(total)),
            "median_router_share": float(np.median(share)),
            "clipped_pct": 100 * float(np.nanmean(clipped)),
            "lora_alone_above_clip_pct": 100 * float(np.mean(g["lora"] > clip))
            if clip > 0
            else None,
            "routers_set_the_clip_pct": 100 * float(np.mean((total > clip) & (g["lora"] <= clip)))
            if clip > 0
            else None,
        }
        out[r["run"]] = rec
        med = rec["median"]
        rows.append(
            [
                f"`{Path(r['run']).name}`",
                *[
                    "n/a" if med[k] is None else f"{med[k]:.3g}"
                    for k in ("lora", "router_weight", "router_bias")
                ],
                f"{rec['median_total']:.3g}",
                f"{100 * rec['median_router_share']:.1f}",
                f"{rec['clipped_pct']:.0f}",
                "n/a"
                if rec["routers_set_the_clip_pct"] is None
                else f"{rec['routers_set_the_clip_pct']:.0f}",
            ]
        )
    if not rows:
        return md + [
            "The training logs hold no per-group gradient norms (runs from before them).",
            "",
        ], {}
    md += [
        (
            "Gradient norms before the clip, median over the logged updates (one in every"
            " --log-every); the routers' share = (router weight² + router bias²) / total²; clipped"
            " = updates whose total norm exceeded --clip (every update counted); 'routers set the"
            " clip' = logged updates clipped although LoRA's own norm was within the clip, so the"
            " routers' gradients shrank LoRA's step."
        ),
        "",
        _table(
            [
                "run",
                "LoRA",
                "router weights",
                "router biases",
                "total",
                "routers' share %",
                "clipped %",
                "routers set the clip %",
            ],
            rows,
        ),
        "",
    ]
    return md, out


def learning_curve(study: Path) -> tuple[list[str], dict]:
    """## The learning curve: LoRA alone. Task accuracy of each kept checkpoint of the LoRA-only
    runs (curves/<run>/update-*.json), update 0 being the base model."""
    md = ["## The learning curve (LoRA alone, every block open)", ""]
    out = {}
    for folder in sorted((study / "curves").glob("*")):
        pts = {}
        for f in sorted(folder.glob("update-*.json")):
            try:
                ev = json.loads(f.read_text())
                step = int(ev["step"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if not pts:
                base = {k: rate(ev, "base", t, fl) for k, t, fl, _ in TASKS}
                if base["bfcl"] is not None:
                    pts[0] = base
            pts[step] = {k: rate(ev, "full", t, fl) for k, t, fl, _ in TASKS}
        if pts:
            out[folder.name] = dict(sorted(pts.items()))
    if not out:
        return md + ["No curve (reproduce.sh --real-cpu keeps one for its LoRA-only runs).", ""], {}
    for name, pts in out.items():
        md += [
            f"`{name}`: greedy generation on the held-out rows at each kept checkpoint (update 0 ="
            " the base model), Wilson 95% intervals.",
            "",
            _table(
                ["update", *[c for *_, c in TASKS]],
                [[s, *[cell(p[k]) for k, *_ in TASKS]] for s, p in pts.items()],
            ),
            "",
        ]
    return md, out


# ----------------------------------------------------------------------------- figures


def figures(
    study: Path, runs: list[dict], answers_out: dict, diff_out: dict, curve_out: dict
) -> list[str]:
    """differential_over_training, gates_over_training and learning_curve PNGs (matplotlib is
    checked by the caller)."""
    import matplotlib.pyplot as plt

    out, made = study / "figures", []
    if diff_out:
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, rec in diff_out.items():
            t = rec["train_intervals"]
            line = ax.plot(list(t), list(t.values()), alpha=0.3, lw=0.8)[0]
            v = rec["validation"]
            ax.plot(
                list(v),
                [x["diff"] for x in v.values()],
                marker="o",
                color=line.get_color(),
                label=Path(name).name,
            )
        ax.axhline(PAPER_DIFF, color="black", ls="--", lw=0.8, label=f"paper {PAPER_DIFF:+.2f}")
        m, sd = AUTHORS_DIFF
        ax.axhspan(
            m - sd, m + sd, color="grey", alpha=0.15, label=f"authors' 10 seeds {m:+.2f} ± {sd}"
        )
        ax.axhline(0, color="grey", lw=0.5)
        ax.set(
            xlabel="update",
            ylabel="skip% tool − skip% planning",
            title="The differential over training (dots: validation; lines: training batches)",
        )
        ax.legend(fontsize=7)
        fig.tight_layout()
        _save(fig, out / "differential_over_training.png")
        made.append("differential_over_training")
    routed = [r for r in runs if r["variant"] != "lora-only"]
    grids = []
    for r in routed:
        rows = read_csv(study / r["run"] / "gates.csv")
        steps = sorted({int(x["step"]) for x in rows})
        layers = sorted({int(x["layer"]) for x in rows})
        if steps and layers:
            g = np.full((len(layers), len(steps)), np.nan)
            for x in rows:
                g[layers.index(int(x["layer"])), steps.index(int(x["step"]))] = 100 * number(
                    x["hard_skip_rate"]
                )
            grids.append((Path(r["run"]).name, steps, g))
    if grids:
        fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids) + 1, 4), squeeze=False)
        for ax, (name, steps, g) in zip(axes[0], grids):
            im = ax.imshow(
                g,
                aspect="auto",
                origin="lower",
                cmap="viridis",
                vmin=0,
                vmax=100,
                extent=(steps[0], steps[-1], -0.5, g.shape[0] - 0.5),
            )
            ax.set(title=name, xlabel="update", ylabel="layer" if ax is axes[0][0] else None)
        fig.colorbar(im, ax=axes[0].tolist(), label="hard-skip rate % (training batches)")
        _save(fig, out / "gates_over_training.png")
        made.append("gates_over_training")
    if curve_out:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        for name, pts in curve_out.items():
            s = list(pts)
            for ax, key in zip(axes, ("bfcl", "parsable")):
                y = [pts[k][key]["pct"] if pts[k][key] else np.nan for k in s]
                lo = [pts[k][key]["ci95"][0] if pts[k][key] else np.nan for k in s]
                hi = [pts[k][key]["ci95"][1] if pts[k][key] else np.nan for k in s]
                # points with their intervals; the dotted line only links what was measured
                err = np.maximum([np.subtract(y, lo), np.subtract(hi, y)], 0)
                ax.errorbar(s, y, yerr=err, marker="o", ls=":", lw=0.8, capsize=3, label=name)
        for ax, t in zip(axes, ("BFCL AST % (held out)", "tool calls parsable %")):
            ax.set(xlabel="update", title=t, ylim=(0, 100))
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        _save(fig, out / "learning_curve.png")
        made.append("learning_curve")
    plt.close("all")
    return made


def _save(fig, path: Path):
    from minroute.evaluation.report import save_figure

    save_figure(fig, path)


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def sections(
    study: Path, runs: list[dict], variants: list[str], plot: bool
) -> tuple[dict[str, list[str]], dict, list[str]]:
    """Every section this module writes ({name: markdown lines}), the numbers behind them, the
    figures."""
    a_md, a = answers(runs, variants)
    w_md, w = routing_worth(runs)
    d_md, d = differential_over_training(study, runs)
    g_md, g = gradient_norms(study, runs)
    c_md, c = learning_curve(study)
    made = figures(study, runs, a, d, c) if plot else []
    numbers = {
        "answers": a,
        "routing_worth": w,
        "differential_over_training": d,
        "gradient_norms": g,
        "learning_curve": c,
    }
    md = {"differential": d_md, "answers": a_md, "worth": w_md, "gradients": g_md, "curve": c_md}
    return md, _finite(numbers), made


def _finite(x):
    """NaN as None, so study.json stays strict JSON."""
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, np.floating | np.integer):
        return _finite(x.item())
    return x
