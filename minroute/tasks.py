"""Does skipping cost answers? Tool-call and GSM8K scoring of greedy generations, per method.

Tool calls: the output's `<tool_call>` blocks are parsed as JSON ({"name", "arguments"}). A sample is
*parsable* if it has at least one block and every block parses to an object with a string name; *name
match* if the list of called names equals the reference's; *exact* if the list of (name, arguments) equals
the reference's, arguments compared as parsed JSON (key order and spacing do not matter).
GSM8K: the number after '####' if the output has the marker, else the last number in the output
(`how` says which); correct if it equals the reference final answer as a number.

BFCL tool-call scoring (`bfcl_check` / `bfcl_correct`, the field's abstract-syntax match) lives in bfcl.py.
"""
from __future__ import annotations

import json
import re
import time

import numpy as np
import torch

from .bfcl import bfcl_check, bfcl_correct, parse_tool_calls_tolerant, standardize_string  # noqa: F401
from .data import TOOL, TokenSplit
from .generate import generate

CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def parse_tool_calls(text: str) -> list[dict] | None:
    """The calls in a model output; None if there is none or any block is not a JSON object with a name."""
    blocks = CALL_RE.findall(text)
    if not blocks:
        return None
    calls = []
    for b in blocks:
        try:
            obj = json.loads(b.strip())
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get("arguments", {})
        if isinstance(args, str):  # some models write arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        calls.append({"name": obj["name"], "arguments": args})
    return calls


def score_tool_call(output: str, reference: list[dict]) -> dict:
    calls = parse_tool_calls(output)
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
    return {"correct": value is not None and ref is not None and abs(value - ref) < 1e-6, "how": how}


def reference_of(row: dict):
    """The reference tool calls (tool rows) or final answer (planning rows) of an eval sample."""
    last = row["messages"][-1]
    if row["step_type"] == "tool_call":
        return last.get("tool_calls") or []
    return row.get("meta", {}).get("final_answer")


@torch.no_grad()
def generate_one(route, tokenizer, ids: torch.Tensor, max_new_tokens: int, eos_ids, pad_id) -> tuple[str, int, float]:
    """Greedy output text, number of new tokens and wall time of one prompt (batch 1, KV cache)."""
    t0 = time.perf_counter()
    out = [int(t) for t in generate(route, ids, max_new_tokens, eos_ids=eos_ids, pad_id=pad_id)]
    dt = time.perf_counter() - t0
    text = tokenizer.decode([t for t in out if t not in eos_ids], skip_special_tokens=False)
    return text, len(out), dt


def run_tasks(route, ev: TokenSplit, gated_pass, tok, args, device, csv_tables, table, masks: dict | None = None,
              include_base: bool = True):
    """Generate for every eval prompt under each method and score it; returns per-method summaries and rows."""
    from contextlib import nullcontext

    from .lora import lora_disabled
    L = route.config.num_hidden_layers
    ones = torch.ones(L, dtype=torch.bool)
    methods = {"base": (ones, True), "full": (ones, False), "gated": (None, False)}
    if not include_base:
        methods.pop("base")
    for name, m in (masks or {}).items():
        methods[name] = (torch.as_tensor(m), False)
    results, samples = {}, []
    for name, (forced, no_lora) in methods.items():
        recs = []
        for i, row in enumerate(ev.rows):
            ids = torch.as_tensor(ev.get(i)[0][: ev.prompt_len[i]])[None].to(device)
            f = forced if forced is None or forced.dim() == 1 else forced[i]
            with (lora_disabled(route.base) if no_lora else nullcontext()), route.forcing(f):
                text, n_new, dt = generate_one(route, tok.tokenizer, ids, args.max_new_tokens, tok.eos_ids, tok.pad_id)
                layers = int(route.last.hard[0].sum()) if route.last is not None else L
            rec = {"method": name, "sample": i, "step_type": row["step_type"], "layers_run": layers,
                   "new_tokens": n_new, "hit_cap": n_new >= args.max_new_tokens, "seconds": dt}
            ref = reference_of(row)
            rec.update(score_tool_call(text, ref) if row["step_type"] == "tool_call" else score_gsm8k(text, ref or ""))
            recs.append(rec)
        samples += recs
        results[name] = summarize(recs)
    rows = []
    for name, r in results.items():
        t, p = r["tool"], r["planning"]
        rows.append([name, t["parsable"], t["name_match"], t["exact"], p["accuracy"], t["layers_run"],
                     p["layers_run"], t["new_tokens"], p["new_tokens"], r["hit_cap"], t["seconds"], p["seconds"]])
    table(f"Task accuracy of greedy generation (held-out prompts, cap {args.max_new_tokens} new tokens; % of samples)",
          ["method", "tool parsable", "tool name", "tool exact", "GSM8K acc", "layers tool", "layers plan",
           "new tok tool", "new tok plan", "hit cap %", "s/task tool", "s/task plan"], rows, csv_tables, "tasks")
    return {"summary": results, "samples": samples}


def summarize(recs: list[dict]) -> dict:
    def mean(xs):
        return float(np.mean(xs)) if xs else float("nan")
    tool = [r for r in recs if r["step_type"] == "tool_call"]
    plan = [r for r in recs if r["step_type"] != "tool_call"]
    out = {"tool": {k: 100 * mean([r[k] for r in tool]) for k in ("parsable", "name_match", "exact")},
           "planning": {"accuracy": 100 * mean([r["correct"] for r in plan]),
                        "no_marker": sum(r["how"] != "marker" for r in plan)},
           "hit_cap": 100 * mean([r["hit_cap"] for r in recs])}
    for key, rs in (("tool", tool), ("planning", plan)):
        out[key].update(layers_run=mean([r["layers_run"] for r in rs]), new_tokens=mean([r["new_tokens"] for r in rs]),
                        seconds=mean([r["seconds"] for r in rs]))
    return out


__all__ = ["parse_tool_calls", "score_tool_call", "parse_tool_calls_tolerant", "standardize_string",
           "bfcl_check", "bfcl_correct", "gsm8k_prediction", "score_gsm8k", "run_tasks", "TOOL"]
