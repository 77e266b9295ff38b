"""Does skipping cost answers? Tool-call and GSM8K scoring of greedy generations, per method.

Tool calls: the output's `<tool_call>` blocks are read by one parser, bfcl.py's
`parse_tool_calls_tolerant` (what it forgives is listed there; a call cut off by the token cap is
not a call). A sample is *parsable* if that parser reads it; *name match* if the list of called
names equals the reference's; *exact* if the list of (name, arguments) equals the reference's,
arguments compared as parsed values (key order and spacing do not matter); *BFCL* (rows with a
BFCL ground truth) if BFCL's AST match accepts the same calls. GSM8K: the number after '####' if
the output has the marker, else the last number in the output (`how` says which); correct if it
equals the reference final answer as a number.

BFCL tool-call scoring (`bfcl_check` / `bfcl_correct`, the field's abstract-syntax match) lives in
bfcl.py.
"""

from __future__ import annotations

import re
import time

import numpy as np
import torch

from minroute.evaluation.bfcl import (
    bfcl_check,
    bfcl_correct,
    parse_tool_calls_tolerant,
    standardize_string,
)
from minroute.evaluation.generate import generate
from minroute.run.data import TOOL, TokenSplit

NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def score_tool_call(output: str, reference: list[dict], cut_off: bool = False) -> dict:
    """parsable / name_match / exact of one output against the reference calls; cut_off: the output
    stopped at the token cap."""
    calls = parse_tool_calls_tolerant(output, cut_off)
    if calls is None:
        return {"parsable": False, "name_match": False, "exact": False}
    names = [c["name"] for c in calls] == [r["name"] for r in reference]
    exact = names and all(c["arguments"] == r["arguments"] for c, r in zip(calls, reference))
    return {"parsable": True, "name_match": names, "exact": exact}


# ---- BFCL AST scoring (rules in the module docstring) ----


def to_number(s: str) -> float | None:
    try:
        return float(s.replace(",", "").rstrip("."))
    except ValueError:
        return None


def gsm8k_prediction(output: str) -> tuple[float | None, str]:
    """(value, how): how is 'marker' (after ####), 'last_number' (no marker) or 'none'."""
    if "####" in output:
        m = NUMBER_RE.search(output.split("####")[-1])
        return (to_number(m.group(0)), "marker") if m else (None, "none")
    found = NUMBER_RE.findall(output)
    return (to_number(found[-1]), "last_number") if found else (None, "none")


def score_gsm8k(output: str, reference: str) -> dict:
    value, how = gsm8k_prediction(output)
    ref = to_number(reference)
    return {
        "correct": value is not None and ref is not None and abs(value - ref) < 1e-6,
        "how": how,
    }


def reference_of(row: dict):
    """The reference tool calls (tool rows) or final answer (planning rows) of an eval sample."""
    last = row["messages"][-1]
    if row["step_type"] == "tool_call":
        return last.get("tool_calls") or []
    return row.get("meta", {}).get("final_answer")


@torch.no_grad()
def generate_batch(
    route,
    prompts: list[np.ndarray],
    max_new_tokens: int,
    eos_ids,
    pad_id,
    device,
    gates: torch.Tensor | None = None,
) -> list[tuple[list[int], int]]:
    """Greedy outputs of several prompts at once (left-padded, KV cache; a left-padded row decodes
    as it would alone). gates (B, L) imposes each row's gates; None lets the routers decide at
    prefill. Returns per row (new token ids without the stop token, new tokens generated), and the
    layers each row ran in route.last.
    """
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, T - len(p) :] = torch.as_tensor(np.asarray(p, dtype=np.int64))
        mask[b, T - len(p) :] = 1
    steps = []
    with route.forcing(gates):
        for nxt in generate(
            route,
            ids.to(device),
            max_new_tokens,
            attention_mask=mask.to(device),
            eos_ids=eos_ids,
            pad_id=pad_id,
        ):
            steps.append(nxt.cpu())
    out = torch.stack(steps, 1).tolist() if steps else [[] for _ in prompts]
    eos = set(eos_ids)
    results = []
    for row in out:
        stop = next((k for k, t in enumerate(row) if t in eos), None)
        results.append(
            (row[:stop] if stop is not None else row, stop + 1 if stop is not None else len(row))
        )
    return results


def score_row(text: str, row: dict, cut_off: bool = False) -> dict:
    """Every score a generation gets: tool rows the match against the reference calls (and BFCL's
    AST match when the row carries a BFCL ground truth), both on the same parse; planning rows
    GSM8K's final number. cut_off: the generation stopped at its token cap."""
    if row["step_type"] != "tool_call":
        return score_gsm8k(text, reference_of(row) or "")
    out = score_tool_call(text, reference_of(row), cut_off)
    truth = row.get("meta", {}).get("ground_truth")
    if truth is not None:
        check = bfcl_check(text, truth, row["meta"].get("functions"), cut_off)
        out.update(bfcl=check["correct"], bfcl_reason=(check["reason"] or "").split(":")[0] or None)
    return out


def run_tasks(
    route, ev: TokenSplit, tok, max_new_tokens: int, device, methods: dict, batch_size: int = 16
):
    """Generate for every eval prompt under each method and score it. methods: {name: (gates, lora)}
    with gates None (the routers), (L,) or (N, L) bool. Prompts are batched by step type and length
    (the outputs of one batch are of similar length). Returns {"summary": {method: ...}, "samples":
    [...]}."""
    from contextlib import nullcontext

    from minroute.core.lora import lora_disabled

    L = route.config.num_hidden_layers
    groups = []
    for t in ("tool_call", "planning"):
        rows = [i for i, r in enumerate(ev.rows) if r["step_type"] == t]
        rows.sort(key=lambda i: int(ev.prompt_len[i]))
        groups += [rows[a : a + batch_size] for a in range(0, len(rows), batch_size)]
    results, samples = {}, []
    for name, (gates, lora) in methods.items():
        recs, t0 = {}, time.perf_counter()
        for rows in groups:
            prompts = [ev.get(i)[0][: ev.prompt_len[i]] for i in rows]
            g = None
            if gates is not None:
                g = torch.as_tensor(np.asarray(gates, dtype=bool))
                g = g.expand(len(rows), L) if g.dim() == 1 else g[torch.as_tensor(rows)]
            tb = time.perf_counter()
            with nullcontext() if lora else lora_disabled(route.base):
                outs = generate_batch(
                    route, prompts, max_new_tokens, tok.eos_ids, tok.pad_id, device, g
                )
            layers = route.last.hard.sum(1).tolist() if route.last is not None else [L] * len(rows)
            dt = (time.perf_counter() - tb) / len(rows)
            for i, (ids, n_new), k in zip(rows, outs, layers):
                text = tok.tokenizer.decode(ids, skip_special_tokens=False)
                cut_off = n_new == len(ids)  # no stop token: the cap ended it
                rec = {
                    "method": name,
                    "sample": i,
                    "step_type": ev.rows[i]["step_type"],
                    "layers_run": int(k),
                    "new_tokens": n_new,
                    "hit_cap": cut_off,
                    "seconds": dt,
                    "output": text[:2000],
                }
                rec.update(score_row(text, ev.rows[i], cut_off=cut_off))
                recs[i] = rec
        recs = [recs[i] for i in sorted(recs)]
        samples += recs
        results[name] = summarize(recs)
        results[name]["seconds_total"] = time.perf_counter() - t0
    return {"summary": results, "samples": samples, "max_new_tokens": max_new_tokens}


def summarize(recs: list[dict]) -> dict:
    """Per step type: % of rows (with a Wilson 95% interval) parsable / name match / exact /
    BFCL-correct, GSM8K accuracy, and the mean layers run, new tokens and seconds."""
    from minroute.evaluation.stats import wilson_ci

    def mean(xs):
        return float(np.mean(xs)) if xs else float("nan")

    def pct(rs, key):
        k = sum(bool(r[key]) for r in rs)
        lo, hi = wilson_ci(k, len(rs))
        return {
            "pct": 100 * k / len(rs) if rs else float("nan"),
            "ci95": [100 * lo, 100 * hi],
            "n": len(rs),
        }

    tool = [r for r in recs if r["step_type"] == "tool_call"]
    plan = [r for r in recs if r["step_type"] != "tool_call"]
    bfcl = [r for r in tool if "bfcl" in r]
    out = {
        "tool": {k: 100 * mean([r[k] for r in tool]) for k in ("parsable", "name_match", "exact")},
        "planning": {
            "accuracy": 100 * mean([r["correct"] for r in plan]),
            "no_marker": sum(r["how"] != "marker" for r in plan),
        },
        "hit_cap": 100 * mean([r["hit_cap"] for r in recs]),
        "ci95": {"tool_exact": pct(tool, "exact")["ci95"], "gsm8k": pct(plan, "correct")["ci95"]},
    }
    if bfcl:
        out["tool"]["bfcl"] = pct(bfcl, "bfcl")["pct"]
        out["ci95"]["bfcl"] = pct(bfcl, "bfcl")["ci95"]
        reasons = {}
        for r in bfcl:
            if not r["bfcl"]:
                reasons[r["bfcl_reason"]] = reasons.get(r["bfcl_reason"], 0) + 1
        out["tool"]["bfcl_fail_reasons"] = reasons
    for key, rs in (("tool", tool), ("planning", plan)):
        out[key].update(
            layers_run=mean([r["layers_run"] for r in rs]),
            new_tokens=mean([r["new_tokens"] for r in rs]),
            seconds=mean([r["seconds"] for r in rs]),
        )
    return out


__all__ = [
    "score_tool_call",
    "parse_tool_calls_tolerant",
    "standardize_string",
    "bfcl_check",
    "bfcl_correct",
    "gsm8k_prediction",
    "score_gsm8k",
    "run_tasks",
    "generate_batch",
    "TOOL",
]
