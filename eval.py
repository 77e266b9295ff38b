"""Evaluate LayerRoute checkpoints: the paper's tables computed correctly, plus the checks it lacks.

    python eval.py --ckpt runs/paper-s42                    # tables, controls, timing
    python eval.py --ckpt runs/paper-s42 --tasks            # + BFCL / GSM8K accuracy
    python eval.py --ckpt runs/paper-s42 --compare runs/noreg-s42 runs/bce-s42  # more Table 2 rows
    python eval.py --runs runs/paper-s*                                            # across seeds
    python eval.py --report studies/demo                    # a reproduce.sh study's report
    python eval.py --demo --ckpt runs/demo                  # the offline demo

What one checkpoint's evaluation measures, in order (`evaluate_run`): open the run and its data
(every file verified, the eval rows refused if the run trained on them, by conversation or by
prompt); one shared forward over the held-out rows for every gate setting reported (base, LoRA all
open, the deployment gates routed on each prompt, the teacher-forced gates routed on prompt +
answer, the static-mask and random-mask controls at exactly the learned routing's compute;
minroute/passes.py), and the length-matched rows; the floor those settings would cost one by one,
beside its own time; then the tables from those passes: the run's differential with a bootstrap CI
and permutation p, Table 2 (skip %, differential, FLOPs, dPPL per method), 3 (layers run and FLOPs
per step type), 4 (gate patterns), 5 (PPL base / full / gated, all tokens and assistant-only; the
paper's definition beside), per-layer gates, controls, the length confound on the length the routers
see; wall-clock prefill / decode with the KV cache against its bound; task accuracy (--tasks: BFCL's
AST match on BFCL rows, strict JSON match, GSM8K); results to <run>/eval.json and <run>/eval/*.csv.
Author-preset checkpoints also get the authors' own protocol (batch 1, unpadded, prompt + answer).
Final checkpoint unless --which best; fp32 on CPU, bf16 on CUDA.

eval.json keys (one checkpoint): checkpoint, step, updates, which, data, n_eval, route_on,
eval_batching; skip_pct {tool, planning}, skip_diff, skip_diff_ci95, skip_diff_p_permutation;
teacher_forced {skip_pct, skip_diff, gates_differ_pct}; authors_protocol (author runs); layers_run;
ppl, ppl_assistant, ppl_paper_definition {type: {base, full, gated}}; methods {name: Table 2 row};
per_type; per_layer {layer: {p_tool, skip_tool, p_plan, skip_plan}}; controls {name: {layers_run,
ce, ce_tool, ce_plan, dce_vs_learned}}; length_confound {matched_on, length, matched_pairs,
matched_skip_tool, matched_skip_planning, matched_diff, regression}; seconds {passes, floor,
floor_settings, ratio, ...}; timing {prefill_b*_*, decode_*, timed_gates, layers_skipped, bound,
above_bound}; tasks {summary, samples}; samples {step_type, n_tokens, prompt_tokens, skip_pct,
mean_soft}; provenance. With --runs: seeds {runs, summary, positive_diff, n, n_given, left_out,
duplicates}. Skip% and differentials are in percentage points.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minroute.evaluation import tables as T
from minroute.evaluation.evaluate import (
    BaseCache,
    PassResult,
    check_held_out,
    eval_batching,
    random_masks,
    static_masks,
)
from minroute.evaluation.passes import Setting, floor_seconds, run_settings
from minroute.evaluation.report import plot_gates
from minroute.evaluation.tables import method_name, table, write_results
from minroute.run.checkpoint import load_layerroute, resolve_checkpoint
from minroute.run.data import TOOL, DataFolder
from minroute.run.inputs import locate
from minroute.run.load import load_tokenizer
from minroute.run.safety import (
    ArgumentParser,
    UserError,
    default_device,
    device,
    nonneg_int,
    positive_int,
    run_cli,
)


def parse_args(argv=None):
    ap = ArgumentParser(
        prog="eval.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--ckpt", help="a train.py run folder (or one of its ckpt-* folders)")
    ap.add_argument(
        "--which",
        choices=["latest", "best"],
        default="latest",
        help=(
            "checkpoint of a run folder: latest = the final one (what the paper reports), best ="
            " lowest validation CE"
        ),
    )
    ap.add_argument(
        "--compare", nargs="*", default=[], help="more checkpoints (ablations) as Table 2 rows"
    )
    ap.add_argument(
        "--runs", nargs="*", default=[], help="run folders of several seeds: mean, sd, Student-t CI"
    )
    ap.add_argument("--data", help="data folder (default: the one the checkpoint was trained on)")
    ap.add_argument(
        "--unverified-held-out",
        action="store_true",
        help="evaluate a checkpoint that records no trained rows (older runs) on a data folder it"
        " was not trained on, whose rows cannot then be checked as held out",
    )
    ap.add_argument("--model", help="base model (default: the one the checkpoint was trained on)")
    ap.add_argument("--batch-size", type=positive_int, default=8)
    ap.add_argument("--device", type=device, default=default_device(), help="cpu, cuda or cuda:N")
    ap.add_argument(
        "--json", help="write all results to this JSON file (default: <ckpt>/eval.json)"
    )
    ap.add_argument("--csv", help="folder for the CSV tables (default: <ckpt>/eval)")
    ap.add_argument("--no-timing", action="store_true", help="skip the wall-clock measurements")
    ap.add_argument("--time-prompts", type=positive_int, default=8, help="held-out prompts to time")
    ap.add_argument(
        "--new-tokens", type=positive_int, default=16, help="decode steps timed per prompt"
    )
    ap.add_argument(
        "--repeats", type=positive_int, default=3, help="timed repeats (after one warm-up)"
    )
    ap.add_argument(
        "--floor-every",
        type=nonneg_int,
        default=4,
        help=(
            "measure the floor on every N-th batch (scaled to all rows); 1 = all rows, 0 = do not"
            " measure"
        ),
    )
    ap.add_argument(
        "--tasks",
        action="store_true",
        help="generate and score tool calls (BFCL AST) and GSM8K answers",
    )
    ap.add_argument(
        "--tasks-only",
        action="store_true",
        help=(
            "only the task accuracy (implies --tasks): no CE passes, tables or timing (a learning"
            " curve over kept checkpoints)"
        ),
    )
    ap.add_argument(
        "--task-controls",
        action="store_true",
        help="with --tasks: also the static and random masks",
    )
    ap.add_argument(
        "--max-new-tokens", type=positive_int, default=256, help="generation cap for --tasks"
    )
    ap.add_argument(
        "--seed", type=nonneg_int, default=0, help="random-mask control and bootstrap seed"
    )
    ap.add_argument(
        "--cache",
        metavar="DIR",
        help=(
            "keep what does not depend on the run (the base model's pass and generations on these"
            " eval rows) in DIR, keyed by the model's and data's content, and reuse it"
            " (reproduce.sh: one base evaluation per study)"
        ),
    )
    ap.add_argument(
        "--demo", action="store_true", help="evaluate the demo checkpoint (CPU, offline)"
    )
    ap.add_argument(
        "--report",
        metavar="STUDY_DIR",
        help=(
            "write STUDY_DIR/REPORT.md (+ study.json, tables/, figures/) from the eval.json of"
            " every run in STUDY_DIR/runs/ (what reproduce.sh lays out); loads no model"
        ),
    )
    a = ap.parse_args(argv)
    a.max_new_tokens = min(a.max_new_tokens, 1 << 16)
    if a.tasks_only and (a.runs or a.compare or a.report):
        ap.error("--tasks-only evaluates one checkpoint (--ckpt); drop --runs, --compare, --report")
    a.tasks = a.tasks or a.tasks_only
    if a.task_controls and not a.tasks:  # else it would score no answers and say nothing
        ap.error("--task-controls scores the masks' generations; add --tasks (or --tasks-only)")
    return a


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


def open_run(
    path,
    which,
    model=None,
    data=None,
    device="cpu",
    batch_size: int = 8,
    say=lambda *a: None,
    unverified_held_out: bool = False,
) -> Run:
    """The checkpoint (fp32 on CPU, bf16 on CUDA), its data (verified, held out, its token ids in
    the model's vocabulary), its tokenizer."""
    ckpt_dir = resolve_checkpoint(path, which)
    route, meta = load_layerroute(
        ckpt_dir,
        which,
        model=model,
        device=device,
        dtype=torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32,
    )
    if "args" not in meta or not isinstance(meta["args"], dict):
        raise UserError(f"{ckpt_dir}/meta.json has no 'args'; not a checkpoint train.py wrote")
    folder = DataFolder(data or locate(ckpt_dir.parent, meta, "data"))
    if not folder.has_split("eval") or len(folder.split("eval")) == 0:
        raise UserError(
            f"{folder}/eval: no held-out rows to evaluate; rebuild the data with --eval-counts"
            " above 0"
        )
    model = model or meta["args"]["model"]
    folder.check_tokenizer(model)
    folder.check_token_ids(route.config.vocab_size, model, ("eval", "eval_matched"))
    check_held_out(folder, meta, ckpt_dir, say=say, allow_unverified=unverified_held_out)
    batching, how = eval_batching(meta, batch_size)
    return Run(route, meta, ckpt_dir, folder, load_tokenizer(model), batching, how)


def describe_checkpoint(run: Run, which: str) -> str:
    total = run.meta["args"].get("updates")
    final = total is not None and run.meta["step"] == total
    kind = (
        "final"
        if final
        else ("best validation CE" if which == "best" else "latest, run not finished")
    )
    return f"{run.ckpt_dir} (update {run.meta['step']} of {total}: {kind})"


# ----------------------------------------------------------------------------- the passes


def measure_passes(
    run: Run, args, dev, autocast, cache: BaseCache
) -> tuple[dict[str, PassResult], dict]:
    """Every setting on the eval rows in shared passes, the length-matched rows, and the floor
    beside the cost."""
    L, ev = run.route.config.num_hidden_layers, run.data.split("eval")
    pad, kw = run.tok.pad_id, dict(device=dev, autocast=autocast, **run.batching)
    ones = np.ones(L, bool)
    base = cache.load_pass()
    first = ([] if base is not None else [Setting("base", ones, lora=False)]) + [
        Setting("full", ones),
        Setting("gated", route_on="prompt"),
        Setting("teacher-forced", route_on="sequence", loss=False),
    ]
    t0 = time.perf_counter()
    res = run_settings(run.route, ev, pad, first, **kw)
    if base is None:
        cache.save_pass(res["base"])
    else:
        res["base"] = base
        print(f"base model pass: from the cache {cache.dir}")
    g = PassResult.of(ev, res["gated"])
    controls = [
        Setting("static mask", static_masks(g, args.seed)),
        Setting("random mask", random_masks(g, args.seed)),
    ]
    res.update(run_settings(run.route, ev, pad, controls, **kw))
    passes = {k: PassResult.of(ev, v) for k, v in res.items()}
    # the floor of what this evaluation computed (a cached base pass costs nothing)
    settings = first + controls
    matched = run.data.matched_split(run.route_on)
    if matched and len(run.data.split(matched)):
        passes["matched"] = PassResult.of(
            run.data.split(matched),
            run_settings(
                run.route,
                run.data.split(matched),
                pad,
                [Setting("gated", route_on=run.route_on)],
                **kw,
            )["gated"],
        )
    # the authors' protocol: batch 1, unpadded, prompt + answer
    if run.meta["args"].get("pool") == "all":
        passes["authors' protocol"] = PassResult.of(
            ev,
            run_settings(
                run.route,
                ev,
                pad,
                [Setting("a", route_on="sequence", loss=False)],
                1,
                dev,
                autocast,
            )["a"],
        )
    seconds = {"passes": time.perf_counter() - t0}
    if args.floor_every:
        floor = floor_seconds(run.route, ev, pad, settings, res, every=args.floor_every, **kw)
        seconds.update(
            floor=sum(floor.values()), floor_settings=floor, floor_every=args.floor_every
        )
    return passes, seconds


# ----------------------------------------------------------------------------- Table 2 (with other
# runs)


def table2(run: Run, p: dict, res: dict, args, dev, autocast, tables):
    cfg, methods = run.route.config, [(method_name(run.ckpt_dir.parent, run.meta), p)]
    for path in args.compare:
        other = open_run(path, args.which, args.model, str(run.data), dev, args.batch_size)
        L = other.route.config.num_hidden_layers
        r = run_settings(
            other.route,
            run.data.split("eval"),
            other.tok.pad_id,
            [
                Setting("full", np.ones(L, bool)),
                Setting("gated"),
                Setting("teacher-forced", route_on="sequence", loss=False),
            ],
            device=dev,
            autocast=autocast,
            **other.batching,
        )
        name = method_name(other.ckpt_dir.parent, other.meta)
        name = name if name not in [m[0] for m in methods] else f"{name} #{len(methods) + 1}"
        methods.append((name, {k: PassResult.of(run.data.split("eval"), v) for k, v in r.items()}))
    rows, res["methods"] = [["all open (LoRA)", 0.0, 0.0, 0.0, "", 0.0, 0.0, 0.0, 0.0, "", ""]], {}
    for name, mp in methods:
        row = res["methods"][name] = T.table2_row(mp, cfg, args.seed)
        ci = row["diff_ci95"]
        rows.append(
            [
                name,
                row["skip_tool"],
                row["skip_planning"],
                row["diff"],
                f"[{ci[0]:+.2f}, {ci[1]:+.2f}]",
                row["flops_red_tool_paper"],
                row["flops_red_tool_whole"],
                row["dppl_tool"],
                row["dppl_planning"],
                f"{row['tf_skip_tool']:.2f}",
                f"{row['tf_skip_planning']:.2f}",
            ]
        )
    table(
        "Table 2: skipping by method (held-out eval, prompt-routed gates; dPPL = gated - all open,"
        " same checkpoint; tf = teacher-forced gates)",
        [
            "method",
            "skip% tool",
            "skip% plan",
            "diff",
            "diff 95% CI",
            "FLOPs red. tool (paper: blocks, T=512)",
            "FLOPs red. tool (whole model, real T)",
            "dPPL tool",
            "dPPL plan",
            "tf skip% tool",
            "tf skip% plan",
        ],
        rows,
        tables,
        "table2",
    )


# ----------------------------------------------------------------------------- timing, tasks


def tasks(
    run: Run,
    g: PassResult,
    args,
    dev,
    autocast,
    tables,
    include_base=True,
    quiet=False,
    cache: BaseCache | None = None,
) -> dict:
    from minroute.evaluation.tasks import run_tasks

    L = run.route.config.num_hidden_layers
    # a LoRA-only run's routers never trained and keep every gate open: its gated model is the
    # all-open one, generated once (and masks matching its compute close nothing)
    lora_only = run.meta["args"].get("ablation") == "lora-only"
    methods = {
        "base": (np.ones(L, bool), False),
        "full": (np.ones(L, bool), True),
        "gated": (None, True),
    }
    cached = cache.load_json("tasks") if cache is not None and include_base else None
    if not include_base or cached is not None:
        methods.pop("base")
    if lora_only:
        methods.pop("gated")
    elif args.task_controls:  # per row, exactly the learned routing's compute (as the CE controls)
        methods.update(
            {
                "static mask": (static_masks(g, args.seed), True),
                "random mask": (random_masks(g, args.seed), True),
            }
        )
    with autocast():
        out = run_tasks(
            run.route, run.data.split("eval"), run.tok, args.max_new_tokens, dev, methods
        )
    if lora_only:
        out["summary"]["gated"] = out["summary"]["full"]
        out["samples"] += [
            {**r, "method": "gated"} for r in out["samples"] if r["method"] == "full"
        ]
    if cached is not None:  # the base model's generations: the same for every run of a study
        out["summary"] = {"base": cached["summary"], **out["summary"]}
        out["samples"] = cached["samples"] + out["samples"]
        print(f"base model generations: from the cache {cache.dir}")
    elif cache is not None and include_base:
        cache.save_json(
            "tasks",
            {
                "summary": out["summary"]["base"],
                "samples": [r for r in out["samples"] if r["method"] == "base"],
            },
        )
    rows = []
    for name, r in out["summary"].items():
        t, q, ci = r["tool"], r["planning"], r["ci95"]
        bfcl = f"{t['bfcl']:.1f} [{ci['bfcl'][0]:.0f}, {ci['bfcl'][1]:.0f}]" if "bfcl" in t else "-"
        rows.append(
            [
                name,
                bfcl,
                t["parsable"],
                f"{t['exact']:.1f} [{ci['tool_exact'][0]:.0f}, {ci['tool_exact'][1]:.0f}]",
                f"{q['accuracy']:.1f} [{ci['gsm8k'][0]:.0f}, {ci['gsm8k'][1]:.0f}]",
                t["layers_run"],
                q["layers_run"],
                t["new_tokens"],
                q["new_tokens"],
                r["hit_cap"],
                r["seconds_total"],
            ]
        )
    if not quiet:
        table(
            "Task accuracy of greedy generation on the held-out prompts (% of rows, Wilson 95% CI;"
            f" cap {args.max_new_tokens} new tokens)",
            [
                "method",
                "BFCL AST",
                "tool parsable",
                "tool exact (JSON)",
                "GSM8K acc",
                "layers tool",
                "layers plan",
                "new tok tool",
                "new tok plan",
                "hit cap %",
                "seconds",
            ],
            rows,
            tables,
            "tasks",
        )
    return out


# ----------------------------------------------------------------------------- one checkpoint,
# several seeds


def provenance(run: Run) -> dict:
    """What a report needs to say how a number was made: versions, device, data and checkpoint
    hashes."""
    import platform

    a = run.meta["args"]
    return {
        "command": "python " + " ".join(sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "eval_device": (
            torch.cuda.get_device_name()
            if torch.cuda.is_available()
            else platform.processor() or "cpu"
        ),
        "train_device": a.get("device"),
        "preset": a.get("preset"),
        "ablation": a.get("ablation"),
        "seed": a.get("seed"),
        "model": a.get("model"),
        "model_revision": run.meta.get("model_revision"),
        "data": str(run.data),
        "data_sha256": run.data.identity,
        "data_loss_on": run.data.manifest.get("loss_on", "all"),
        "data_manifest_sha256": run.data.raw_sha256,
        "trained_on_manifest_sha256": run.meta.get("manifest_sha256"),
        "trained_on_data_sha256": run.meta.get("data_sha256"),
        "checkpoint_sha256": {k: v["sha256"] for k, v in run.meta.get("files", {}).items()},
        "train_settings": {  # how the run trained, for a report made without its checkpoints
            k: v
            for k, v in a.items()
            if k not in ("given", "resume", "out", "data", "model", "demo_assets")
        },
    }


def evaluate_run(run: Run, args, dev, autocast, tables) -> dict:
    """One checkpoint: the passes, then each table from them, then timing and tasks (see the module
    docstring)."""
    t0 = time.perf_counter()
    print(
        f"checkpoint: {describe_checkpoint(run, args.which)}\ngates: routed on each eval row's"
        f" prompt (deployment: prefill gates); {run.how}. Teacher-forced gates (prompt + reference"
        " answer) beside them."
    )
    cache = BaseCache(args.cache, run, args)
    p, seconds = measure_passes(run, args, dev, autocast, cache)
    ev = run.data.split("eval")
    res = {
        "checkpoint": str(run.ckpt_dir),
        "step": run.meta["step"],
        "updates": run.meta["args"].get("updates"),
        "which": args.which,
        "data": str(run.data),
        "n_eval": len(ev),
        "route_on": "prompt",
        "eval_batching": run.how,
    }
    T.differential_table(p, res, args.seed, tables)
    table2(run, p, res, args, dev, autocast, tables)
    T.tables_3_to_5(run.route.config, run.meta["args"].get("gate_reg", 1.0), p, res, tables)
    T.per_layer(p, res, tables)
    plot_gates(res, getattr(args, "figure_dir", run.ckpt_dir.parent))  # beside eval.json
    T.controls_table(p, res, tables)
    split = run.data.matched_split(run.route_on)
    T.length_confound(
        p, res, run.route_on, split, run.data.matched_on(split) if split else None, tables
    )
    g = p["gated"]
    res["samples"] = {
        "step_type": g.step_type.tolist(),
        "n_tokens": g.n_tokens.tolist(),
        "prompt_tokens": g.prompt_tokens.tolist(),
        "skip_pct": g.skip_per_sample.tolist(),
        "mean_soft": g.soft.mean(1).tolist(),
    }
    res["provenance"] = provenance(run)
    seconds["tables"] = time.perf_counter() - t0
    if not args.no_timing:
        res["timing"] = T.timing(run.route, ev, run.tok.pad_id, g, args, dev, autocast, tables)
    if args.tasks:
        t1 = time.perf_counter()
        res["tasks"] = tasks(run, g, args, dev, autocast, tables, cache=cache)
        seconds["tasks"] = time.perf_counter() - t1
    seconds["total"] = time.perf_counter() - t0
    if "floor" in seconds:
        seconds["ratio"] = seconds["passes"] / seconds["floor"]
        print(
            f"\nevaluation passes {seconds['passes']:.1f}s against a floor of"
            f" {seconds['floor']:.1f}s (each gate setting's own forward, measured on every"
            f" {seconds['floor_every']}th batch and scaled:"
            f" {', '.join(f'{k} {v:.1f}s' for k, v in seconds['floor_settings'].items())}) ="
            f" {seconds['ratio']:.2f}x; whole evaluation {seconds['total']:.1f}s"
        )
    res["seconds"] = seconds
    return res


def tasks_alone(run: Run, args, dev, autocast, tables) -> dict:
    """--tasks-only: the task accuracy of one checkpoint and nothing else. The controls' masks need
    the learned gates: one gate pass (no loss) over the eval rows, only with --task-controls."""
    t0 = time.perf_counter()
    print(f"checkpoint: {describe_checkpoint(run, args.which)}; task accuracy only")
    ev = run.data.split("eval")
    g = None
    if args.task_controls:
        r = run_settings(
            run.route,
            ev,
            run.tok.pad_id,
            [Setting("gated", route_on="prompt", loss=False)],
            device=dev,
            autocast=autocast,
            **run.batching,
        )
        g = PassResult.of(ev, r["gated"])
    out = {
        "checkpoint": str(run.ckpt_dir),
        "step": run.meta["step"],
        "updates": run.meta["args"].get("updates"),
        "which": args.which,
        "data": str(run.data),
        "n_eval": len(ev),
    }
    out["tasks"] = tasks(
        run, g, args, dev, autocast, tables, cache=BaseCache(args.cache, run, args)
    )
    out["provenance"] = provenance(run)
    out["seconds"] = {"tasks": time.perf_counter() - t0, "total": time.perf_counter() - t0}
    return out


def seed_record(run: Run, path, args, dev, autocast) -> dict:
    """One seed's numbers: deployment-gate skip%, differential with its CI, gated PPL and dPPL (and
    task accuracy)."""
    ev, L = run.data.split("eval"), run.route.config.num_hidden_layers
    r = run_settings(
        run.route,
        ev,
        run.tok.pad_id,
        [Setting("full", np.ones(L, bool)), Setting("gated")],
        device=dev,
        autocast=autocast,
        **run.batching,
    )
    gp, fp = PassResult.of(ev, r["gated"]), PassResult.of(ev, r["full"])
    st = gp.differential(args.seed)
    rec = {
        "run": str(path),
        "checkpoint": str(run.ckpt_dir),
        "step": run.meta["step"],
        "seed": run.meta["args"].get("seed"),
        "skip_tool": gp.skip_pct(TOOL),
        "skip_planning": gp.skip_pct(1),
        "diff": st["diff"],
        "diff_ci95": st["ci95"],
        "diff_p_permutation": st["p_permutation"],
        "ppl_gated_tool": gp.ppl(TOOL),
        "ppl_gated_planning": gp.ppl(1),
        "dppl_tool": gp.ppl(TOOL) - fp.ppl(TOOL),
        "dppl_planning": gp.ppl(1) - fp.ppl(1),
        "method": {k: run.meta["args"].get(k) for k in T.VARIANT_KEYS},
    }
    if args.tasks:  # task accuracy of LoRA all open vs gated, per seed
        t = tasks(run, gp, args, dev, autocast, [], include_base=False, quiet=True)["summary"]
        for m in ("full", "gated"):
            rec.update(
                {
                    f"tool_exact_{m}": t[m]["tool"]["exact"],
                    f"gsm8k_acc_{m}": t[m]["planning"]["accuracy"],
                }
            )
            if "bfcl" in t[m]["tool"]:
                rec[f"bfcl_{m}"] = t[m]["tool"]["bfcl"]
    return rec


def across_seeds(args, dev, autocast, tables) -> dict:
    """Each run evaluated alone; a run that cannot be used (unreadable, refused data, non-finite
    metrics) or that is the same checkpoint (or the same seed and settings) as one already counted
    is named and left out.
    """
    per, skipped, duplicates, seen = [], [], [], {}
    for path in args.runs:
        try:
            run = open_run(path, args.which, args.model, args.data, dev, args.batch_size)
        except (UserError, OSError) as e:
            skipped.append({"run": str(path), "why": str(e)})
            print(f"skipped {path}: {e}")
            continue
        a = run.meta["args"]
        ident = run.meta.get("files", {}).get("adapter.safetensors", {}).get("sha256") or str(
            run.ckpt_dir.resolve()
        )
        key = json.dumps(
            {k: a.get(k) for k in sorted(a) if k not in ("out", "resume", "device", "given")},
            sort_keys=True,
            default=str,
        )
        if ident in seen or key in seen:
            duplicates.append({"run": str(path), "same_as": seen.get(ident) or seen.get(key)})
            print(
                f"counted once: {path} is the same checkpoint or the same seed and settings as "
                f"{duplicates[-1]['same_as']}"
            )
            continue
        seen[ident] = seen[key] = str(path)
        rec = seed_record(run, path, args, dev, autocast)
        bad = [k for k, v in rec.items() if isinstance(v, float) and not np.isfinite(v)]
        if bad:
            skipped.append({"run": str(path), "why": f"non-finite {', '.join(bad)}"})
            print(f"skipped {path}: non-finite {', '.join(bad)}")
            continue
        per.append(rec)
    print(
        f"used {len(per)} of {len(args.runs)} runs"
        + (f"; left out: {', '.join(x['run'] for x in skipped)}" if skipped else "")
        + (f"; counted once: {', '.join(x['run'] for x in duplicates)}" if duplicates else "")
    )
    if not per:
        raise UserError(
            f"none of the {len(args.runs)} runs could be evaluated: "
            + "; ".join(f"{x['run']}: {x['why']}" for x in skipped)
        )
    return {
        **T.seeds_tables(per, len(args.runs), tables),
        "left_out": skipped,
        "duplicates": duplicates,
    }


# ----------------------------------------------------------------------------- writing

RUN_OWN = {
    "train_log.csv",
    "gates.csv",
    "latest.json",
    "best.json",
    "run.json",
    ".lock",
}  # a run's files eval never writes


def check_outputs(args) -> tuple[Path, Path]:
    """Where results go, checked before any work: a finished evaluation is never lost to a bad path,
    and never written over a run's own files (its logs, its pointers) or a study's runs folder."""
    if args.ckpt:
        out_dir = Path(resolve_checkpoint(args.ckpt, args.which)).parent
        default_json, default_csv = out_dir / "eval.json", out_dir / "eval"
    # beside the runs, never inside a study's runs/ folder (the report would take it for a run)
    else:
        base = Path(args.runs[0]).resolve().parent
        base = base.parent if base.name == "runs" else base
        default_json, default_csv = base / "seeds_eval.json", base / "seeds_eval"
    json_path = Path(args.json) if args.json else default_json
    csv_dir = Path(args.csv) if args.csv else default_csv
    if json_path.is_dir():
        raise UserError(f"--json {json_path} is a folder; give a file path")
    if (
        json_path.name in RUN_OWN
        or json_path.name.startswith("ckpt-")
        or (json_path.parent / "meta.json").exists()
    ):
        raise UserError(
            f"--json {json_path}: a run's own file (or inside a checkpoint); choose another name"
        )
    if not json_path.parent.is_dir():
        raise UserError(f"--json {json_path}: folder {json_path.parent} does not exist")
    if csv_dir.exists() and not csv_dir.is_dir():
        raise UserError(f"--csv {csv_dir} is a file; give a folder")
    if (
        (csv_dir / "latest.json").exists()
        or (csv_dir / "train_log.csv").exists()
        or (csv_dir / "meta.json").exists()
    ):
        raise UserError(
            f"--csv {csv_dir} is a run folder (or a checkpoint); its gates.csv and logs would be "
            "overwritten. Choose another folder, e.g. the default <run>/eval"
        )
    for p in (json_path.parent, csv_dir):
        anchor = next((q for q in [p, *p.parents] if q.exists()), None)
        if anchor is None or not os.access(anchor, os.W_OK):
            raise UserError(f"{p}: cannot write there (no writable folder)")
    return json_path, csv_dir


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        from minroute.evaluation.report import write_report

        study = Path(args.report)
        if not (study / "runs").is_dir():
            raise UserError(
                f"--report {study}: no runs/ folder in it; pass the --out folder of reproduce.sh"
            )
        try:
            out = write_report(study)
        except ValueError as e:
            raise UserError(str(e)) from None
        print(
            f"wrote {study / 'REPORT.md'} ({len(out['runs'])} runs, {len(out['left_out'])} left"
            f" out; figures: {', '.join(out['figures']) or 'none'})"
        )
        return 0
    if args.demo:
        args.ckpt = args.ckpt or "runs/demo"
        args.device, args.tasks = "cpu", True
        args.time_prompts, args.max_new_tokens = (
            min(args.time_prompts, 4),
            min(args.max_new_tokens, 48),
        )
    if not args.ckpt and not args.runs:
        raise UserError("pass --ckpt RUN_DIR (or --runs DIR..., or --report STUDY_DIR)")
    json_path, csv_dir = check_outputs(args)
    args.figure_dir = json_path.parent
    dev = torch.device(args.device)

    def autocast():
        return (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if dev.type == "cuda"
            else contextlib.nullcontext()
        )

    results, tables = {}, []
    if args.ckpt:
        run = open_run(
            args.ckpt,
            args.which,
            args.model,
            args.data,
            dev,
            args.batch_size,
            say=print,
            unverified_held_out=args.unverified_held_out,
        )
        evaluate = tasks_alone if args.tasks_only else evaluate_run
        results.update(evaluate(run, args, dev, autocast, tables))
        results["settings"] = {
            "which": args.which,
            "data": str(run.data),
            "data_sha256": run.data.identity,
            "checkpoint": str(run.ckpt_dir),
            "tasks": args.tasks,
            **({"tasks_only": True} if args.tasks_only else {"timing": not args.no_timing}),
            "task_controls": args.task_controls,
            "max_new_tokens": args.max_new_tokens,
            "model": args.model,
        }
    if args.runs:
        results["seeds"] = across_seeds(args, dev, autocast, tables)
    write_results(results, tables, json_path, csv_dir)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
