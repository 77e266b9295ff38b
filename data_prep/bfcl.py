"""Berkeley Function Calling Leaderboard v4 (Apache-2.0): real user requests, function docs and
ground-truth calls.

Layout (as in the PyPI package bfcl-eval, `bfcl_eval/data/`, and GitHub ShishirPatil/gorilla):
`bfcl-v4/BFCL_v4_<category>.json` (JSON lines: `id`, `question` = list of turns, each a list of
{role, content}; `function` = list of function docs) and
`bfcl-v4/possible_answer/BFCL_v4_<category>.json` (`id`, `ground_truth` = list of {function_name:
{argument: [accepted values]}}). Every question file with a ground-truth file beside it is read,
whatever its category; a question file without one (the irrelevance categories, whose right answer
is no call) is listed in the manifest and not read.

A row becomes a chat sample:
- tools: each function doc as {"type": "function", "function": doc}, with BFCL's type names that
  JSON Schema lacks mapped to JSON Schema's ("dict" -> "object", "float" -> "number", "tuple" ->
  "array"; "any" left as written): the model sees ordinary JSON-Schema tools. The original docs stay
  in `meta["functions"]`, since BFCL's checker decides by its own type names.
- messages: the turn's messages (a system message, where BFCL gives one, stays the chat's system
  turn), then the reference answer: an assistant message calling every ground-truth function with,
  per argument, its first accepted value. An argument whose first accepted value is "" (BFCL's "may
  be left out") is left out, unless the function doc requires it, when its first other accepted
  value is used.
- meta: `id`, `category`, `ground_truth` and `functions`, for scoring generations
  (minroute/bfcl.py). Excluded, each under its own reason: rows of more than one turn (`multi_turn`;
  the multi-turn categories need an executable environment), rows whose id has no ground truth
  (`no_ground_truth`), a ground truth that is not a list of single-function objects
  (`bad_ground_truth`).
"""

from __future__ import annotations

from pathlib import Path

from minroute.run.safety import MissingFile

from .records import TOOL, Malformed, Sample, read_json_records

FOLDER = "bfcl-v4"
ANSWERS = "possible_answer"
PREFIX = "BFCL_v4_"
JSON_SCHEMA_TYPES = {"dict": "object", "float": "number", "tuple": "array"}


class Excluded(Malformed):
    """A well-formed record this mixture does not use (counted by reason, apart from malformed
    ones)."""


def files(source_dir: Path) -> tuple[list[tuple[Path, Path]], dict[str, str]]:
    """([(question file, answer file)] in category order, {question file without answers: why})."""
    root = Path(source_dir) / FOLDER
    if not root.is_dir():
        raise MissingFile(
            f"bfcl: {root} not found; --source-dir must hold BFCL v4's data folder as {FOLDER}/ "
            f"(BFCL_v4_<category>.json + {ANSWERS}/BFCL_v4_<category>.json), e.g. from "
            "`pip download --no-deps bfcl-eval` (bfcl_eval/data/)"
        )
    pairs, skipped = [], {}
    for q in sorted(root.glob(f"{PREFIX}*.json")):
        a = root / ANSWERS / q.name
        if a.is_file():
            pairs.append((q, a))
        else:
            skipped[q.name] = f"no {ANSWERS}/{q.name} (no ground truth: not read)"
    if not pairs:
        raise MissingFile(
            f"bfcl: no {PREFIX}<category>.json in {root} has a ground-truth file in"
            f" {root / ANSWERS}"
        )
    return pairs, skipped


def category(path: Path) -> str:
    return path.stem.removeprefix(PREFIX)


def read(source_dir: Path) -> tuple[list, dict]:
    """Every question record of every category with a ground truth, each paired with its answer (or
    Malformed), in category then file order; plus the manifest's file facts."""
    pairs, skipped = files(source_dir)
    records, facts = [], {"categories": {}, "files_not_read": skipped}
    for q, a in pairs:
        answers = {}
        for rec in read_json_records(a, f"bfcl {a.name}"):
            if isinstance(rec, dict) and isinstance(rec.get("id"), str):
                answers[rec["id"]] = rec.get("ground_truth")
        rows = read_json_records(q, f"bfcl {q.name}")
        cat = category(q)
        for rec in rows:
            if isinstance(rec, dict) and not isinstance(rec, Malformed):
                rec = {
                    **rec,
                    "_category": cat,
                    "_ground_truth": answers.get(rec.get("id"), _MISSING),
                }
            records.append(rec)
        facts["categories"][cat] = {
            "read": len(rows),
            "questions": q.name,
            "answers": f"{ANSWERS}/{a.name}",
        }
    return records, facts


_MISSING = object()


def to_json_schema(x):
    """BFCL's parameter schema with JSON Schema's type names (dict -> object, float -> number, tuple
    -> array)."""
    if isinstance(x, dict):
        return {
            k: (
                JSON_SCHEMA_TYPES.get(v, v)
                if k == "type" and isinstance(v, str)
                else to_json_schema(v)
            )
            for k, v in x.items()
        }
    if isinstance(x, list):
        return [to_json_schema(v) for v in x]
    return x


def reference_call(name: str, accepted: dict, doc: dict | None) -> dict:
    """The ground truth's call with each argument's first accepted value ("" first: left out unless
    required)."""
    required = set((doc or {}).get("parameters", {}).get("required", []) or [])
    args = {}
    for arg, values in accepted.items():
        if not isinstance(values, list) or not values:
            raise Malformed("bad_ground_truth", f"{name}.{arg} lists no accepted value")
        if values[0] == "":
            others = [v for v in values if v != ""]
            if arg in required and others:
                args[arg] = others[0]
            continue
        args[arg] = values[0]
    return {"name": name, "arguments": args}


def to_sample(record, row: int, source: str = "bfcl") -> Sample:
    if not isinstance(record, dict):
        raise Malformed("wrong_type", "record is not an object")
    rid, question, functions = record.get("id"), record.get("question"), record.get("function")
    if (
        not isinstance(rid, str)
        or not isinstance(question, list)
        or not isinstance(functions, list)
    ):
        raise Malformed("missing_field", "id, question or function")
    if len(question) != 1:
        raise Excluded("multi_turn", f"{len(question)} turns")
    truth = record.get("_ground_truth", _MISSING)
    if truth is _MISSING:
        raise Excluded("no_ground_truth", rid)
    if (
        not isinstance(truth, list)
        or not truth
        or not all(isinstance(c, dict) and len(c) == 1 for c in truth)
    ):
        raise Malformed("bad_ground_truth", rid)
    turn = question[0]
    if not isinstance(turn, list) or not all(
        isinstance(m, dict)
        and isinstance(m.get("content"), str)
        and m.get("role") in ("system", "user", "assistant")
        for m in turn
    ):
        raise Malformed("bad_turn", rid)
    messages = [{"role": m["role"], "content": m["content"]} for m in turn]
    if not any(m["role"] == "user" for m in messages) or messages[-1]["role"] != "user":
        raise Malformed("bad_turn_order", rid)
    if any(m["role"] == "system" for m in messages[1:]):
        raise Malformed("bad_turn_order", f"{rid}: system message after the first")
    if not all(isinstance(f, dict) and isinstance(f.get("name"), str) for f in functions):
        raise Malformed("bad_function", rid)
    docs = {f["name"]: f for f in functions}
    calls = []
    for c in truth:
        ((name, accepted),) = c.items()
        if not isinstance(accepted, dict):
            raise Malformed("bad_ground_truth", f"{rid}: arguments of {name} are not an object")
        calls.append(reference_call(name, accepted, docs.get(name)))
    messages.append({"role": "assistant", "content": "", "tool_calls": calls})
    tools = [{"type": "function", "function": to_json_schema(f)} for f in functions]
    meta = {
        "id": rid,
        "category": record.get("_category"),
        "ground_truth": truth,
        "functions": functions,
    }
    return Sample(messages, tools, TOOL, source, row, meta)
