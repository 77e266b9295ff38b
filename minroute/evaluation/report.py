"""The study report: every run's eval.json summarised across seeds per variant, as REPORT.md, CSV
and PNG figures.

A study folder (what reproduce.sh writes) holds `runs/<variant>-s<seed>/` (a train.py run with its
eval.json) and `commands.log`. `write_report(study)` reads only those files (no model is loaded), so
the report's numbers are exactly the runs' eval.json numbers: per variant the mean over seeds with a
Student-t 95% CI of the mean (n - 1 degrees of freedom; a percentile bootstrap beside it in
study.json, too narrow for a few seeds), beside the paper's single-seed claim and the authors' own
10-seed rerun (quoted from docs/reference.md).

Outputs (names are stable):
  REPORT.md                 the report
  study.json                {"variants": {variant: {metric: {"mean", "sd", "ci95",
                              "ci95_bootstrap", "n", "values"}}},
                             "runs": [{"run", "variant", "seed", "eval": path}],
                             "figures": [...], "left_out": [...]}
  tables/claim.csv          source, skip% tool, skip% planning, differential (mean, CI per variant)
  tables/table2.csv         per variant: skip%, differential, FLOPs reduction, dPPL, positive seeds
  tables/table5.csv         per variant and step type: PPL base / full / gated (CE only),
                            assistant-only, paper's
  tables/controls.csv       per variant: dCE of static mask, random mask, all open vs learned
  tables/length_confound.csv  per variant: length-matched differential, regression coefficients
  tables/gates.csv          per variant, step type and layer: hard-skip rate and mean soft gate
  tables/seeds.csv          one row per run
  figures/*.png             gates_heatmap, training_curves, differential_forest, skip_vs_length
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np

from minroute.evaluation.over_training import sections
from minroute.evaluation.stats import bootstrap_ci, log_t_ci, t_ci, t_ci_clipped
from minroute.run.checkpoint import atomic_write_text

VARIANTS = ("paper", "paper-all-tokens", "author", "noreg", "uniform-init", "bce", "lora-only")
PAPER = {
    "skip_tool": 15.25,
    "skip_planning": 2.34,
    "diff": 12.91,
    "ppl": {"tool": (4.747, 3.454), "planning": (4.928, 3.631)},
}  # docs/reference.md §1, Tables 2 and 5
AUTHORS_RERUN = {
    "skip_tool": (4.27, 3.16),
    "skip_planning": (9.98, 5.79),
    "diff": (-5.71, 8.37),
    "positive": "2 of 10",
}  # docs/reference.md §2: mean (sd) over the authors' 10 seeds
METRICS = {  # study.json metric -> where it sits in a run's eval.json
    "skip_tool": ("skip_pct", "tool"),
    "skip_planning": ("skip_pct", "planning"),
    "diff": ("skip_diff",),
    "tf_diff": ("teacher_forced", "skip_diff"),
    "flops_red_tool_paper": ("methods", None, "flops_red_tool_paper"),
    "flops_red_tool_whole": ("methods", None, "flops_red_tool_whole"),
    "ppl_full_tool": ("ppl", "tool", "full"),
    "ppl_gated_tool": ("ppl", "tool", "gated"),
    "ppl_full_planning": ("ppl", "planning", "full"),
    "ppl_gated_planning": ("ppl", "planning", "gated"),
    "ppl_base_tool": ("ppl", "tool", "base"),
    "ppl_base_planning": ("ppl", "planning", "base"),
    "asst_ppl_full_tool": ("ppl_assistant", "tool", "full"),
    "asst_ppl_gated_tool": ("ppl_assistant", "tool", "gated"),
    "asst_ppl_full_planning": ("ppl_assistant", "planning", "full"),
    "asst_ppl_gated_planning": ("ppl_assistant", "planning", "gated"),
    "paperdef_ppl_full_tool": ("ppl_paper_definition", "tool", "full"),
    "paperdef_ppl_gated_tool": ("ppl_paper_definition", "tool", "gated"),
    "paperdef_ppl_full_planning": ("ppl_paper_definition", "planning", "full"),
    "paperdef_ppl_gated_planning": ("ppl_paper_definition", "planning", "gated"),
    "dce_static": ("controls", "static mask", "dce_vs_learned"),
    "dce_random": ("controls", "random mask", "dce_vs_learned"),
    "dce_all_open": ("controls", "all open", "dce_vs_learned"),
    "matched_diff": ("length_confound", "matched_diff"),
    "len_coef": ("length_confound", "regression", "per_100_tokens"),
    "tool_coef": ("length_confound", "regression", "tool"),
    "r_length_score": ("length_confound", "regression", "r_length_score"),
    "matched_pairs": ("length_confound", "matched_pairs"),
    "layers_run_learned": ("controls", "learned routing", "layers_run"),
    "layers_run_static": ("controls", "static mask", "layers_run"),
    "layers_run_random": ("controls", "random mask", "layers_run"),
    "eval_seconds": ("seconds", "passes"),
    "eval_floor_seconds": ("seconds", "floor"),
    **{
        f"{task}_{m.split()[0]}": ("tasks", "summary", m, *where)
        for m in ("base", "full", "gated", "static mask", "random mask")
        for task, where in (
            ("bfcl", ("tool", "bfcl")),
            ("tool_parsable", ("tool", "parsable")),
            ("tool_exact", ("tool", "exact")),
            ("gsm8k", ("planning", "accuracy")),
            ("layers_tool", ("tool", "layers_run")),
            ("layers_planning", ("planning", "layers_run")),
        )
    },
}
BOUNDED = {
    "skip_tool": (0, 100),
    "skip_planning": (0, 100),
    "diff": (-100, 100),
    "tf_diff": (-100, 100),
    "matched_diff": (-100, 100),
    "r_length_score": (-1, 1),
}  # the ranges these quantities can take
METHOD_KEYS = (
    "preset",
    "ablation",
    "bce_target",
    "route_on",
    "pool",
    "gate_reg",
    "init",
    "ce_mean",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lr",
    "steps",
    "batch_size",
    "accum",
    "warmup",
    "clip",
    "model",
    "data",
)


def variant_of(args: dict) -> str:
    """The study variant a run's recorded train.py settings make (`collect` renames a paper run
    whose loss counted every token paper-all-tokens, in a study whose other runs counted the
    assistant's)."""
    if args.get("preset") == "author":
        return "author"
    return {
        "noreg": "noreg",
        "uniform-init": "uniform-init",
        "bce": "bce",
        "lora-only": "lora-only",
    }.get(args.get("ablation"), "paper")


def _get(d, path):
    for key in path:
        if key is None:  # methods: the run's own (first) row
            d = next(iter(d.values())) if d else None
        else:
            d = d.get(key) if isinstance(d, dict) else None
        if d is None:
            return None
    return d


def summarise(values, metric: str = "", seed: int = 0) -> dict:
    """Mean, sd and the Student-t 95% CI of the mean over seeds: clipped to the quantity's range
    (and flagged), or on log scale for a perplexity; the bootstrap beside it."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if not v.size:
        return {
            "mean": float("nan"),
            "sd": float("nan"),
            "ci95": [float("nan")] * 2,
            "ci95_bootstrap": [float("nan")] * 2,
            "n": 0,
            "values": [],
            "clipped": False,
        }
    bounds = BOUNDED.get(metric) or (
        (0, 100) if metric.startswith(("bfcl", "tool_exact", "gsm8k")) else None
    )
    if "ppl" in metric:
        lo, hi, clipped = (*log_t_ci(v), False)
    else:
        lo, hi, clipped = t_ci_clipped(v, bounds=bounds)
    return {
        "mean": float(v.mean()),
        "sd": float(v.std(ddof=1)) if v.size > 1 else float("nan"),
        "ci95": [lo, hi],
        "ci95_bootstrap": list(bootstrap_ci(v, seed=seed)),
        "n": int(v.size),
        "values": v.tolist(),
        "clipped": clipped,
    }


def run_method(run: Path, res: dict, study: Path) -> dict:
    """The run's recorded method settings (its checkpoint's meta.json; the eval's provenance if it
    is gone), its model and data by what they are (a moved study's runs record other paths)."""
    prov = res.get("provenance", {})
    meta = {"args": {**prov, **prov.get("train_settings", {})}}
    for d in (run / res.get("checkpoint", ""), run):  # eval.json's paths: from its own folder
        if (d / "meta.json").is_file():
            try:
                meta = json.loads((d / "meta.json").read_text())
                break
            except (OSError, ValueError):
                pass
    args, inputs = meta.get("args", {}), meta.get("inputs") or {}
    method = {k: args.get(k) for k in METHOD_KEYS}
    model = inputs.get("model", {})
    method["model"] = model.get("hub") or (model.get("sha256") and f"sha256:{model['sha256'][:16]}")
    here = {"run": str(run.relative_to(study))}
    method["model"] = method["model"] or study_path(study, here, args.get("model"))
    data = inputs.get("data", {}).get("sha256") or meta.get("data_sha256")
    method["data"] = f"sha256:{data[:16]}" if data else study_path(study, here, args.get("data"))
    return method


def study_path(study: Path, r: dict, value):
    """A path an eval.json records (relative to the run folder, or absolute from an older eval.py),
    as the report says it: relative to the study folder; a Hub id as it is."""
    if not value or not isinstance(value, str):
        return value
    p = Path(value) if Path(value).is_absolute() else study / r["run"] / value
    if not p.exists() and not Path(value).is_absolute() and value.count("/") == 1:
        return value  # a Hub id (owner/name)
    return os.path.relpath(p.resolve() if p.exists() else p, study.resolve())


def current_checkpoint(run: Path) -> tuple[str, str | None] | None:
    """(name, adapter sha256) of the run's latest checkpoint (its meta.json records the sha256)."""
    try:
        name = json.loads((run / "latest.json").read_text())["dir"]
        files = json.loads((run / name / "meta.json").read_text()).get("files", {})
        return name, files.get("adapter.safetensors", {}).get("sha256")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def collect(study: Path) -> tuple[list[dict], list[dict]]:
    """(usable runs, runs left out with why) of a study folder. Left out: a run reproduce.sh listed
    as failed, an unreadable or non-finite eval.json, one made for an older checkpoint than the
    run's latest (the run moved on), and a second copy of a checkpoint already counted (the same
    adapter sha256: a backup is not a seed).
    """
    runs, left_out, seen = [], [], {}
    failed = {}
    if (study / "failed.txt").exists():
        for line in (study / "failed.txt").read_text().splitlines():
            name, _, why = line.partition(" ")
            failed[name] = why
    for run in sorted((study / "runs").glob("*")):
        if not run.is_dir() or ".replaced-" in run.name:
            continue
        name = str(run.relative_to(study))  # what the report calls it: relative to the study
        if run.name in failed:
            left_out.append(
                {"run": name, "why": failed[run.name] or "failed in this study's last run"}
            )
            continue
        ev = run / "eval.json"
        try:
            res = json.loads(ev.read_text())
            prov = res["provenance"]
            finite = all(math.isfinite(x) for x in (res["skip_diff"], res["ppl"]["tool"]["gated"]))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            left_out.append({"run": name, "why": f"no usable eval.json ({type(e).__name__})"})
            continue
        if not finite:
            left_out.append({"run": name, "why": "non-finite metrics"})
            continue
        latest = current_checkpoint(run)
        settings = res.get("settings", {})
        # None for runs older than data identities
        trained_on = res["provenance"].get("trained_on_data_sha256")
        adhoc = settings and (
            settings.get("which") != "latest"
            or settings.get("model")
            or (trained_on is not None and settings.get("data_sha256") != trained_on)
        )
        if adhoc:
            left_out.append(
                {
                    "run": name,
                    "why": (
                        "eval.json is an ad-hoc evaluation (another checkpoint choice, model or"
                        " data than the run's own); re-run the study to evaluate it as the study"
                        " does"
                    ),
                }
            )
            continue
        sha = prov.get("checkpoint_sha256", {}).get("adapter.safetensors")
        if sha and sha in seen:
            left_out.append(
                {"run": name, "why": f"the same checkpoint as {seen[sha]} (counted once)"}
            )
            continue
        if latest is not None and latest[1] is not None and sha != latest[1]:
            # whether eval.json is of the run's latest checkpoint: by the adapter's content
            left_out.append(
                {
                    "run": name,
                    "why": (
                        f"eval.json is of {Path(res.get('checkpoint', '?')).name}, not of the"
                        f" run's latest checkpoint {latest[0]}: re-evaluate it"
                    ),
                }
            )
            continue
        seen[sha] = run.name
        runs.append(
            {
                "run": name,
                "variant": variant_of(prov),
                "seed": prov.get("seed"),
                "eval": str(ev.relative_to(study)),
                "res": res,
                "method": run_method(run, res, study),
            }
        )
    # a study that trains on both loss choices names the runs with the loss on every token
    if len({r["res"]["provenance"].get("data_loss_on", "all") for r in runs}) > 1:
        for r in runs:
            if r["variant"] == "paper" and r["res"]["provenance"].get("data_loss_on") == "all":
                r["variant"] = "paper-all-tokens"
    # runs of one variant name but different method settings are different methods: never averaged
    # together
    for v in {r["variant"] for r in runs}:
        keys = sorted(
            {
                json.dumps(r["method"], sort_keys=True, default=str)
                for r in runs
                if r["variant"] == v
            }
        )
        if len(keys) > 1:
            for r in runs:
                if r["variant"] == v:
                    k = keys.index(json.dumps(r["method"], sort_keys=True, default=str))
                    r["variant"] = f"{v}#{k + 1}"
    return runs, left_out


def fmt(s: dict, digits: int = 2) -> str:
    if not s["n"]:
        return "n/a"
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f} (1 seed)"
    return f"{s['mean']:.{digits}f} [{s['ci95'][0]:.{digits}f}, {s['ci95'][1]:.{digits}f}]"


def write_csv(path: Path, header, rows):
    import io

    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def save_figure(fig, path: Path):
    """A PNG written under a temporary name and renamed: a half-written figure never replaces a good
    one."""
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=120, format="png")
    os.replace(tmp, path)


def write_report(study, title: str = "LayerRoute reproduction") -> dict:
    """Summarise the study folder's runs into REPORT.md, study.json, tables/ and figures/; return
    study.json."""
    study = Path(study)
    runs, left_out = collect(study)
    if not runs:
        raise ValueError(
            f"{study}: no run with a usable eval.json under runs/ "
            + "; ".join(f"{x['run']}: {x['why']}" for x in left_out)
        )
    variants = sorted(
        {r["variant"] for r in runs}, key=lambda v: (VARIANTS.index(v.split("#")[0]), v)
    )
    summary = {
        v: {
            m: summarise([_get(r["res"], path) for r in runs if r["variant"] == v], m)
            for m, path in METRICS.items()
        }
        for v in variants
    }
    for v in variants:
        diffs = summary[v]["diff"]["values"]
        summary[v]["positive"] = f"{sum(d > 0 for d in diffs)} of {len(diffs)}"
    figures, why_no_figures = make_figures(study, runs, variants)
    extra_md, extra, more = sections(study, runs, variants, plot=not why_no_figures)
    figures += more
    out = {
        "variants": summary,
        "runs": [{k: r[k] for k in ("run", "variant", "seed", "eval")} for r in runs],
        "left_out": left_out,
        "figures": figures,
    }
    out["methods"] = {v: next(r["method"] for r in runs if r["variant"] == v) for v in variants}
    out.update(extra)  # answers, routing_worth, differential_over_training, gradient_norms, curve
    atomic_write_text(study / "study.json", json.dumps(out, indent=2, default=float))
    _tables(study, runs, variants, summary)
    atomic_write_text(
        study / "REPORT.md",
        _markdown(
            study, title, runs, left_out, variants, summary, figures, why_no_figures, extra_md
        ),
    )
    return out


def _tables(study, runs, variants, S):
    t = study / "tables"
    write_csv(
        t / "claim.csv",
        ["source", "skip_tool", "skip_planning", "diff", "diff_ci_low", "diff_ci_high", "n"],
        [
            [
                "paper (single seed)",
                PAPER["skip_tool"],
                PAPER["skip_planning"],
                PAPER["diff"],
                "",
                "",
                1,
            ],
            [
                "authors' 10-seed rerun (quoted)",
                AUTHORS_RERUN["skip_tool"][0],
                AUTHORS_RERUN["skip_planning"][0],
                AUTHORS_RERUN["diff"][0],
                "",
                "",
                10,
            ],
        ]
        + [
            [
                f"minroute {v}",
                S[v]["skip_tool"]["mean"],
                S[v]["skip_planning"]["mean"],
                S[v]["diff"]["mean"],
                *S[v]["diff"]["ci95"],
                S[v]["diff"]["n"],
            ]
            for v in variants
        ],
    )
    keys2 = [
        "skip_tool",
        "skip_planning",
        "diff",
        "tf_diff",
        "flops_red_tool_paper",
        "flops_red_tool_whole",
    ]
    write_csv(
        t / "table2.csv",
        [
            "variant",
            *[f"{k}{s}" for k in keys2 for s in ("", "_ci_low", "_ci_high")],
            "positive",
            "n",
        ],
        [
            [
                v,
                *[x for k in keys2 for x in (S[v][k]["mean"], *S[v][k]["ci95"])],
                S[v]["positive"],
                S[v]["diff"]["n"],
            ]
            for v in variants
        ],
    )
    rows = []
    for v in variants:
        for typ in ("tool", "planning"):
            rows.append(
                [v, typ]
                + [
                    S[v][f"{p}_{typ}"]["mean"]
                    for p in (
                        "ppl_base",
                        "ppl_full",
                        "ppl_gated",
                        "asst_ppl_full",
                        "asst_ppl_gated",
                        "paperdef_ppl_full",
                        "paperdef_ppl_gated",
                    )
                ]
            )
    write_csv(
        t / "table5.csv",
        [
            "variant",
            "step_type",
            "ppl_base",
            "ppl_full",
            "ppl_gated",
            "asst_ppl_full",
            "asst_ppl_gated",
            "paperdef_ppl_full",
            "paperdef_ppl_gated",
        ],
        rows,
    )
    write_csv(
        t / "controls.csv",
        ["variant", "dce_static", "dce_random", "dce_all_open"],
        [
            [v, *(S[v][k]["mean"] for k in ("dce_static", "dce_random", "dce_all_open"))]
            for v in variants
        ],
    )
    write_csv(
        t / "length_confound.csv",
        ["variant", "matched_diff", "len_coef_per_100_tokens", "tool_coef", "r_length_score"],
        [
            [
                v,
                *(
                    S[v][k]["mean"]
                    for k in ("matched_diff", "len_coef", "tool_coef", "r_length_score")
                ),
            ]
            for v in variants
        ],
    )
    rows = []
    for v in variants:
        mine = [r["res"]["per_layer"] for r in runs if r["variant"] == v]
        for layer in sorted(mine[0], key=int):
            rows.append(
                [v, int(layer)]
                + [
                    float(np.mean([m[layer][k] for m in mine]))
                    for k in ("skip_tool", "p_tool", "skip_plan", "p_plan")
                ]
            )
    write_csv(
        t / "gates.csv",
        ["variant", "layer", "skip_tool", "p_tool", "skip_planning", "p_planning"],
        rows,
    )
    write_csv(
        t / "seeds.csv",
        [
            "run",
            "variant",
            "seed",
            "skip_tool",
            "skip_planning",
            "diff",
            "diff_ci_low",
            "diff_ci_high",
            "p_permutation",
        ],
        [
            [
                r["run"],
                r["variant"],
                r["seed"],
                r["res"]["skip_pct"]["tool"],
                r["res"]["skip_pct"]["planning"],
                r["res"]["skip_diff"],
                *r["res"]["skip_diff_ci95"],
                r["res"]["skip_diff_p_permutation"],
            ]
            for r in runs
        ],
    )


def _md_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def _markdown(study, title, runs, left_out, variants, S, figures, why_no_figures, extra) -> str:
    n_seeds = {v: S[v]["diff"]["n"] for v in variants}
    md = [
        f"# {title}: the study report",
        "",
        (
            f"{len(runs)} runs ({', '.join(f'{v}: {n_seeds[v]} seeds' for v in variants)}), each"
            " evaluated on held-out rows with prompt-routed gates (the gates a deployment takes at"
            " prefill). Every minroute figure is the mean over seeds with a Student-t 95% CI of"
            " the mean in brackets (n − 1 degrees of freedom: wide for a few seeds, as it should"
            " be); every one is computed from the runs' `eval.json` files listed at the end."
        ),
        "",
    ]
    if left_out:
        md += ["**Left out:** " + "; ".join(f"`{x['run']}` ({x['why']})" for x in left_out), ""]
    rows = [
        [
            "paper (single seed)",
            PAPER["skip_tool"],
            PAPER["skip_planning"],
            PAPER["diff"],
            f"{PAPER['ppl']['tool'][0]} → {PAPER['ppl']['tool'][1]}",
            f"{PAPER['ppl']['planning'][0]} → {PAPER['ppl']['planning'][1]}",
        ],
        [
            "authors' code, 10 seeds (quoted from docs/reference.md §2; mean (sd))",
            "{} ({})".format(*AUTHORS_RERUN["skip_tool"]),
            "{} ({})".format(*AUTHORS_RERUN["skip_planning"]),
            "{} ({}); > 0 in {}".format(*AUTHORS_RERUN["diff"], AUTHORS_RERUN["positive"]),
            "n/a",
            "n/a",
        ],
    ]
    for v in variants:
        rows.append(
            [
                f"minroute `{v}`",
                fmt(S[v]["skip_tool"]),
                fmt(S[v]["skip_planning"]),
                f"{fmt(S[v]['diff'])}; > 0 in {S[v]['positive']}",
                f"{fmt(S[v]['ppl_full_tool'], 3)} → {fmt(S[v]['ppl_gated_tool'], 3)}",
                f"{fmt(S[v]['ppl_full_planning'], 3)} → {fmt(S[v]['ppl_gated_planning'], 3)}",
            ]
        )
    md += [
        "## The claim, side by side",
        "",
        _md_table(
            [
                "source",
                "skip% tool",
                "skip% planning",
                "differential (tool − planning)",
                "PPL tool full → gated",
                "PPL planning full → gated",
            ],
            rows,
        ),
        "",
        (
            "The paper's PPL is exp(CE + λ·mean soft gate) (docs/reference.md §2, defect 1);"
            " minroute's is exp(CE) alone, with the paper's definition beside it in Table 5."
        ),
        "",
    ]
    rows = [
        [
            f"`{v}`",
            fmt(S[v]["skip_tool"]),
            fmt(S[v]["skip_planning"]),
            fmt(S[v]["diff"]),
            S[v]["positive"],
            fmt(S[v]["tf_diff"]),
            fmt(S[v]["flops_red_tool_paper"]),
            fmt(S[v]["flops_red_tool_whole"]),
        ]
        for v in variants
    ]
    md += [
        "## Table 2: skipping by variant",
        "",
        _md_table(
            [
                "variant",
                "skip% tool",
                "skip% planning",
                "differential",
                "seeds with diff > 0",
                "differential, teacher-forced gates",
                "FLOPs red. tool (paper's formula)",
                "FLOPs red. tool (whole model)",
            ],
            rows,
        ),
        "",
        (
            "Each run on its own (95% percentile-bootstrap intervals over its held-out rows; p:"
            " permutation test of 'the step type does not matter'):"
        ),
        "",
        _md_table(
            ["run", "skip% tool", "skip% planning", "differential", "p"],
            [
                [
                    f"`{Path(r['run']).name}`",
                    *within_run(r["res"]),
                    f"{r['res']['skip_diff_p_permutation']:.4f}",
                ]
                for r in runs
            ],
        ),
        "",
    ]
    md += extra["differential"]
    rows = []
    for v in variants:
        for typ in ("tool", "planning"):
            rows.append(
                [f"`{v}`", typ]
                + [
                    fmt(S[v][f"{p}_{typ}"], 3)
                    for p in (
                        "ppl_base",
                        "ppl_full",
                        "ppl_gated",
                        "asst_ppl_full",
                        "asst_ppl_gated",
                        "paperdef_ppl_full",
                        "paperdef_ppl_gated",
                    )
                ]
            )
    md += [
        "## Table 5: perplexity (CE only), assistant-only, and the paper's definition",
        "",
        _md_table(
            [
                "variant",
                "step type",
                "base",
                "full (LoRA)",
                "gated",
                "assistant full",
                "assistant gated",
                "paper-def full",
                "paper-def gated",
            ],
            rows,
        ),
        "",
    ]
    rows = [
        [
            f"`{v}`",
            fmt(S[v]["layers_run_learned"], 3),
            fmt(S[v]["layers_run_static"], 3),
            fmt(S[v]["layers_run_random"], 3),
            fmt(S[v]["dce_static"], 3),
            fmt(S[v]["dce_random"], 3),
            fmt(S[v]["dce_all_open"], 3),
        ]
        for v in variants
    ]
    md += [
        "## Controls at matched compute",
        "",
        (
            "dCE = CE of the control minus CE of the learned routing (> 0: the learned routing is"
            " better). The controls run exactly the learned routing's mean layers (rows skip k or k"
            " + 1 blocks; the random masks are matched per step type); the layers-run columns"
            " show it."
        ),
        "",
        _md_table(
            [
                "variant",
                "layers run: learned",
                "static",
                "random",
                "dCE static mask (most-skipped layers)",
                "dCE random mask",
                "dCE all open",
            ],
            rows,
        ),
        "",
    ]
    lc0 = runs[0]["res"].get("length_confound", {})
    rows = [
        [
            f"`{v}`",
            fmt(S[v]["matched_pairs"], 0),
            fmt(S[v]["matched_diff"]),
            fmt(S[v]["len_coef"], 4),
            fmt(S[v]["tool_coef"], 4),
            fmt(S[v]["r_length_score"], 3),
        ]
        for v in variants
    ]
    md += [
        "## The length confound",
        "",
        (
            f"On the length the routers see, {lc0.get('length', 'prompt tokens')}: the differential"
            f" on tool/planning pairs matched in it ({lc0.get('matched_on') or 'no matched set'}),"
            " and the OLS of each row's mean soft gate on it (per 100 tokens) and step type. With"
            " no matched pair the two step types' routed lengths do not overlap, and only the"
            " regression speaks to the confound."
        ),
        "",
        _md_table(
            [
                "variant",
                "matched pairs",
                "length-matched differential",
                "coef per 100 tokens",
                "coef tool",
                "r(length, gate score)",
            ],
            rows,
        ),
        "",
    ]
    timed = [r for r in runs if r["res"].get("timing")]
    md += ["## Wall-clock against its bound", ""]
    if timed:
        r = timed[0]
        tm = r["res"]["timing"]
        rows = []
        for what in tm["bound"]:
            if what == "decode":
                a, b = tm["decode_all open"]["ms_per_token"], tm["decode_gated"]["ms_per_token"]
            else:
                a, b = tm[f"{what}_all open"]["median_ms"], tm[f"{what}_gated"]["median_ms"]
            flag = (
                " (above its bound: a noisy measurement, not a result)"
                if tm.get("above_bound", {}).get(what)
                else ""
            )
            rows.append(
                [
                    what,
                    f"{a:.2f}",
                    f"{b:.2f}",
                    f"{a / b:.3f}{flag}",
                    f"{tm['layers_skipped'][what]:.2f}",
                    f"{tm['bound'][what]:.3f}",
                ]
            )
        md += [
            (
                f"Measured on `{r['run']}` ({r['res']['provenance']['eval_device']}); k = blocks"
                " the timed prompts' own gates skipped."
            ),
            "",
            _md_table(["measure", "all open ms", "gated ms", "speedup", "k", "bound"], rows),
            "",
        ]
    else:
        md += ["No run was timed (evaluate one without --no-timing).", ""]
    tasked = [r for r in runs if r["res"].get("tasks")]
    md += extra["answers"]
    if tasked:
        rows = []
        for r in tasked:
            s = r["res"]["tasks"]["summary"]
            for m in s:
                ci = s[m].get("ci95", {})
                b = (
                    f"{s[m]['tool']['bfcl']:.1f} [{ci['bfcl'][0]:.0f}, {ci['bfcl'][1]:.0f}]"
                    if "bfcl" in s[m]["tool"]
                    else "n/a"
                )
                g = ci.get("gsm8k", [float("nan")] * 2)
                rows.append(
                    [
                        f"`{Path(r['run']).name}`",
                        m,
                        b,
                        f"{s[m]['planning']['accuracy']:.1f} [{g[0]:.0f}, {g[1]:.0f}]",
                        f"{s[m]['tool']['layers_run']:.2f}",
                        f"{s[m]['planning']['layers_run']:.2f}",
                        f"{s[m]['hit_cap']:.0f}",
                    ]
                )
        md += [
            "Per run (Wilson 95% intervals over its held-out rows):",
            "",
            _md_table(
                [
                    "run",
                    "method",
                    "BFCL AST %",
                    "GSM8K %",
                    "layers run tool",
                    "layers run planning",
                    "hit the cap %",
                ],
                rows,
            ),
            "",
        ]
    md += extra["worth"] + extra["gradients"] + extra["curve"]
    costed = [r for r in runs if r["res"].get("seconds", {}).get("floor")]
    if costed:
        sec = costed[0]["res"]["seconds"]
        md += [
            "## What the evaluation cost",
            "",
            f"`{Path(costed[0]['run']).name}`: the shared passes over every gate setting took"
            f" {sec['passes']:.1f} s against a floor of {sec['floor']:.1f} s (each setting's own"
            " forward: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in sec["floor_settings"].items())
            + f"), {sec['passes'] / sec['floor']:.2f}x; the whole evaluation {sec['total']:.1f} s.",
            "",
        ]
    md += ["## What these numbers can and cannot support", "", *support(runs, variants, S), ""]
    md += ["## Figures", ""]
    if figures:
        captions = {
            "gates_heatmap": (
                "Hard-skip rate per layer, by step type and variant (mean over seeds; the "
                "routers' real gates on held-out rows, not σ(bias))."
            ),
            "training_curves": (
                "Training curves of every run: loss, CE, skip% by step type, validation CE."
            ),
            "differential_forest": (
                "Skip differential per seed (with its within-run 95% CI) and per variant "
                "(mean with the across-seed 95% CI); the paper's 12.91 dashed."
            ),
            "differential_over_training": (
                "The differential (skip% tool − skip% planning) of every routed run against"
                " updates: dots at each validation, a thin line on the training batches; the"
                " paper's claim dashed, the authors' 10-seed mean ± sd shaded."
            ),
            "gates_over_training": (
                "Hard-skip rate of each layer (rows) against updates (columns) on the training"
                " batches, one panel per routed run (gates.csv)."
            ),
            "learning_curve": (
                "LoRA alone, every block open: BFCL AST and parsable % on the held-out tool rows"
                " at each kept checkpoint (Wilson 95% intervals); update 0 is the base model."
            ),
            "skip_vs_length": (
                "Skip% of each held-out row against its prompt length, by step type (the "
                "first variant's runs): the length confound at a glance."
            ),
        }
        for f in figures:
            md += [f"![{f}](figures/{f}.png)", "", captions.get(f, ""), ""]
    else:
        md += [f"Left out: {why_no_figures}.", ""]
    md += ["## How it was made", ""]
    log = study / "commands.log"
    if log.exists():
        md += [
            "Commands, in order (`commands.log`):",
            "",
            "```",
            *log.read_text().splitlines()[-200:],
            "```",
            "",
        ]
    p0 = runs[0]["res"]["provenance"]
    md += [
        (
            f"- python {p0['python']}, torch {p0['torch']}; training device:"
            f" {', '.join(sorted({str(r['res']['provenance']['train_device']) for r in runs}))};"
            f" evaluation device: {p0['eval_device']}"
        ),
        (
            f"- base model: `{study_path(study, runs[0], p0['model'])}`; data:"
            f" `{study_path(study, runs[0], p0['data'])}`, manifest sha256 "
            + ", ".join(sorted({r["res"]["provenance"]["data_manifest_sha256"][:16] for r in runs}))
            + "…"
        ),
        "",
        _md_table(
            ["run", "variant", "seed", "checkpoint", "adapter sha256", "eval.json"],
            [
                [
                    f"`{Path(r['run']).name}`",
                    r["variant"],
                    r["seed"],
                    f"`{Path(r['res']['checkpoint']).name}`",
                    r["res"]["provenance"]["checkpoint_sha256"].get("adapter.safetensors", "")[:16]
                    + "…",
                    f"`{r['eval']}`",
                ]
                for r in runs
            ],
        ),
        "",
        (
            "CSV tables in `tables/` (claim, table2, table5, controls, length_confound, gates,"
            " seeds) and every number above in `study.json`; the keys are documented in"
            " `minroute/report.py`."
        ),
        "",
    ]
    return "\n".join(md)


def within_run(res: dict, n: int = 4000, seed: int = 0) -> list[str]:
    """One run's skip% per step type and differential, each with a bootstrap 95% CI over its eval
    rows (from the per-row numbers eval.json keeps)."""
    smp = res.get("samples") or {}
    skip, typ = np.asarray(smp.get("skip_pct", []), float), np.asarray(smp.get("step_type", []))
    out = []
    for t in (0, 1):
        v = skip[typ == t]
        lo, hi = bootstrap_ci(v, n=n, seed=seed) if v.size > 1 else (float("nan"),) * 2
        out.append(f"{v.mean():.2f} [{lo:.2f}, {hi:.2f}]" if v.size else "n/a")
    lo, hi = res["skip_diff_ci95"]
    out.append(f"{res['skip_diff']:+.2f} [{lo:+.2f}, {hi:+.2f}]")
    return out


def support(runs, variants, S) -> list[str]:
    """The report's verdict in words, from the numbers themselves: what a CI crossing zero, few
    seeds or a short run can and cannot say."""
    out = []
    steps = sorted({r["res"].get("step") for r in runs if r["res"].get("step") is not None})
    out.append(
        f"- Training length: {', '.join(map(str, steps))} optimizer updates per run (the paper's"
        " recipe: 3,000). Whatever routing these runs learned is the routing of an early phase of"
        " training; a converged router could differ."
    )
    for v in variants:
        d = S[v]["diff"]
        if v == "lora-only":
            out.append(
                f"- `{v}`: no routing (every block open, the routers never trained): the reference"
                " for what skipping costs, not a differential."
            )
            continue
        if d["n"] < 2:
            out.append(
                f"- `{v}`: one seed; its across-seed uncertainty is unknown, and no differential is"
                " claimed."
            )
            continue
        lo, hi = d["ci95"]
        if lo == hi:
            verdict = (
                f"every seed gave the same differential ({lo:+.2f}): the routers did not tell the"
                " step types apart"
            )
        elif lo > 0:
            verdict = (
                "tool calls skip more than planning: the CI of the mean differential lies above"
                " zero"
            )
        elif hi < 0:
            verdict = (
                "planning skips more than tool calls (the reverse of the paper's claim): the CI"
                " lies below zero"
            )
        else:
            verdict = "no differential can be claimed: the CI of the mean differential crosses zero"
        within = [r for r in runs if r["variant"] == v]
        above = sum(r["res"]["skip_diff_ci95"][0] > 0 for r in within)
        below = sum(r["res"]["skip_diff_ci95"][1] < 0 for r in within)
        out.append(
            f"- `{v}` ({d['n']} seeds): differential {d['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}];"
            f" {verdict}. Within runs (CIs over eval rows): {above} of {len(within)} runs lie above"
            f" zero and {below} below it, so a single run's differential, however significant, does"
            f" not carry to another seed; the paper claimed {PAPER['diff']:+.2f}, the authors' own"
            f" 10 seeds gave {AUTHORS_RERUN['diff'][0]:+.2f} (sd {AUTHORS_RERUN['diff'][1]})."
        )
        if d.get("clipped"):
            out.append("  The interval was clipped to the range a differential can take.")
        ds, dr = S[v]["dce_static"], S[v]["dce_random"]
        if ds["n"] >= 2:
            beats = (
                "beats"
                if ds["ci95"][0] > 0
                else ("loses to" if ds["ci95"][1] < 0 else "is not distinguishable from")
            )
            out.append(
                f"  At exactly matched compute the learned routing {beats} a static mask (dCE"
                f" {ds['mean']:+.3f} [{ds['ci95'][0]:+.3f}, {ds['ci95'][1]:+.3f}]) and has dCE"
                f" {dr['mean']:+.3f} against random masks."
            )
        mp = S[v]["matched_pairs"]
        if mp["n"] and mp["mean"] < 5:
            out.append(
                f"  {mp['mean']:.0f} length-matched pairs on the routed length: tool prompts (with"
                " their schemas) are longer than nearly every planning prompt, so length and step"
                " type cannot be told apart by matching; only the regression speaks to it"
                " (r(length, step type) is in each eval.json)."
            )
    return out


def make_figures(study: Path, runs, variants) -> tuple[list[str], str]:
    """PNG figures under study/figures; ([], why) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return (
            [],
            (
                "matplotlib is not installed (pip install 'minroute[plot]', then eval.py --report"
                " again)"
            ),
        )
    out = study / "figures"
    out.mkdir(exist_ok=True)
    made = []
    # gates heatmap: rows = (variant, step type), columns = layers
    labels, grid = [], []
    for v in variants:
        mine = [r["res"]["per_layer"] for r in runs if r["variant"] == v]
        layers = sorted(mine[0], key=int)
        for key, typ in (("skip_tool", "tool"), ("skip_plan", "planning")):
            labels.append(f"{v} / {typ}")
            grid.append([100 * float(np.mean([m[i][key] for m in mine])) for i in layers])
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(grid[0]) + 3), 0.45 * len(grid) + 1.5))
    im = ax.imshow(np.asarray(grid), aspect="auto", cmap="viridis", vmin=0, vmax=100)
    ax.set(
        yticks=range(len(labels)),
        yticklabels=labels,
        xlabel="layer",
        title="Hard-skip rate per layer (%)",
    )
    ax.set_xticks(range(len(grid[0])))
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    save_figure(fig, out / "gates_heatmap.png")
    made.append("gates_heatmap")
    # training curves
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    colours = dict(zip(variants, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for r in runs:
        log = study / r["run"] / "train_log.csv"
        if not log.exists():
            continue
        with open(log, newline="", errors="replace") as f:  # a damaged line is not a lost figure
            rows = list(csv.DictReader(f))
        tr = [x for x in rows if x.get("ce")]
        va = [x for x in rows if x.get("val_ce")]
        c = colours[r["variant"]]
        lab = r["variant"] if r is next(x for x in runs if x["variant"] == r["variant"]) else None
        if lab and r["method"].get("ablation") == "bce":
            lab += " (loss = CE + λ·BCE)"
        steps = [int(x["step"]) for x in tr]
        axes[0].plot(steps, [float(x["loss"]) for x in tr], color=c, alpha=0.6, label=lab)
        axes[1].plot(steps, [float(x["ce"]) for x in tr], color=c, alpha=0.6)
        axes[2].plot(steps, [float(x["skip_tool"]) for x in tr], color=c, alpha=0.6)
        axes[2].plot(steps, [float(x["skip_plan"]) for x in tr], color=c, alpha=0.6, ls="--")
        axes[3].plot(
            [int(x["step"]) for x in va],
            [float(x["val_ce"]) for x in va],
            color=c,
            alpha=0.6,
            marker=".",
        )
    for a, t in zip(
        axes,
        (
            "loss (CE + λR; BCE runs: CE + λ·BCE)",
            "train CE",
            "skip% (solid tool, dashed planning)",
            "validation CE",
        ),
    ):
        a.set(xlabel="update", title=t)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "training_curves.png")
    made.append("training_curves")
    # forest plot of the differential
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(runs) + 0.6 * len(variants) + 1))
    y, ticks, names = 0, [], []
    for v in variants:
        mine = sorted((r for r in runs if r["variant"] == v), key=lambda r: str(r["seed"]))
        for r in mine:
            d, (lo, hi) = r["res"]["skip_diff"], r["res"]["skip_diff_ci95"]
            ax.errorbar(d, y, xerr=[[d - lo], [hi - d]], fmt="o", color=colours[v], capsize=2)
            ticks.append(y)
            names.append(f"{v} seed {r['seed']}")
            y += 1
        s = [r["res"]["skip_diff"] for r in mine]
        lo, hi = t_ci(s, bounds=(-100, 100)) if len(s) > 1 else (s[0], s[0])
        ax.errorbar(
            np.mean(s),
            y,
            xerr=[[np.mean(s) - lo], [hi - np.mean(s)]],
            fmt="D",
            color=colours[v],
            markersize=8,
            capsize=4,
        )
        ticks.append(y)
        names.append(f"{v} mean")
        y += 1.5
    ax.axvline(0, color="grey", lw=0.8)
    ax.axvline(PAPER["diff"], color="black", ls="--", lw=0.8, label="paper 12.91")
    ax.set(
        yticks=ticks,
        yticklabels=names,
        xlabel="skip% tool − skip% planning",
        title="Skip differential",
    )
    ax.invert_yaxis()
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "differential_forest.png")
    made.append("differential_forest")
    # skip% against the routed length (the prompt), by step type, for the first variant
    v0 = variants[0]
    fig, ax = plt.subplots(figsize=(6, 4))
    for typ, code, marker in (("tool", 0, "o"), ("planning", 1, "^")):
        xs, ys = [], []
        for r in runs:
            smp = r["res"].get("samples")
            if smp and r["variant"] == v0:
                for st, n, sk in zip(smp["step_type"], smp["prompt_tokens"], smp["skip_pct"]):
                    if st == code:
                        xs.append(n)
                        ys.append(sk)
        ax.scatter(xs, ys, marker=marker, alpha=0.4, label=typ)
    ax.set(
        xlabel="prompt tokens (what the routers pool)",
        ylabel="skip% of the row",
        title=f"Skip% against prompt length ({v0}, all seeds)",
    )
    ax.legend()
    fig.tight_layout()
    save_figure(fig, out / "skip_vs_length.png")
    made.append("skip_vs_length")
    plt.close("all")
    return made, ""


def plot_gates(res, out_dir: Path):
    """gates_per_layer.png in the run folder when matplotlib is installed and the folder is
    writable."""
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
    ax.set(
        xlabel="layer", ylabel="mean soft gate p", title="Router gates per layer (held-out eval)"
    )
    ax.legend()
    fig.tight_layout()
    tmp = out_dir / ".gates_per_layer.png.tmp"
    fig.savefig(tmp, dpi=120, format="png")
    os.replace(tmp, out_dir / "gates_per_layer.png")
    plt.close("all")
