"""BFCL (Berkeley Function Calling Leaderboard) "AST" scoring, `bfcl_check` / `bfcl_correct`, our
own reading of ShishirPatil/gorilla
`berkeley-function-call-leaderboard/bfcl_eval/eval_checker/ast_eval/ast_checker.py`. The output is
parsed by `parse_tool_calls_tolerant` (its docstring lists what it forgives). Ground truth: a list
of {function_name: {argument: [accepted values]}}; `""` among the accepted values = may be omitted.
- As many calls as the ground truth, matched order-free, always: each ground-truth call to its own
  output call (a perfect bipartite matching; BFCL does this only in its parallel categories and
  greedily, in ground-truth order, so it can miss a matching that exists; a single call is the same
  either way).
- A call matches if its name equals the ground truth's (exactly), every required argument is there,
  no argument is one the ground truth (or, given, the function doc) does not list, every value is
  accepted, and every argument the ground truth lists without `""` is there. Required = the doc's
  `required` when a doc of that name is in `functions`, else every argument whose accepted values
  lack `""`.
- With a doc, the parameter's doc type decides as in BFCL (types string, integer, float, boolean,
  array, tuple, dict, any = string): an int is taken for a float; a tuple for a tuple (as a list);
  else the value's Python type must be the doc type exactly (so True is no integer, 5.0 no integer,
  [..] no string), or the type of the first non-`""` accepted value (BFCL's "variable" case: a
  ground truth that lists e.g. None or "dontcare" for an integer). An array's items must each have
  the items type or the accepted list's own element type (so no int for a float inside an array, as
  in BFCL, except that BFCL's item check passes whenever `""` is accepted). Then: strings, and
  strings inside lists, compare standardised (`standardize_string`: lowercased, the characters space
  , . / - _ * ^ removed, ' turned into "); lists element-wise and in order, an explicit [] passing
  where `""` is accepted (as in BFCL); a dict key by key against an accepted dict of accepted-value
  lists (unknown key fails, a missing key fails unless `""` is accepted for it); an array of dicts
  element-wise the same way; a "variable" value as is (not standardised).
- Without a doc (or for a parameter the doc gives no known type), the first non-`""` accepted
  value's type stands in: strings standardised, int and float interchangeable when equal (5.0 passes
  for 5, which BFCL rejects for an integer parameter), booleans only equal booleans, tuples are
  lists, dicts and arrays of dicts as above.
- Deeper than BFCL looks (values inside nested lists or dicts), we compare with the same rules at
  every depth (strings standardised, booleans never equal numbers); BFCL compares those with plain
  Python ==.
- An empty ground truth (the irrelevance categories) is met by an output with no parsable call.
"""

from __future__ import annotations

import ast
import json
import re

BLOCK_RE = re.compile(r"<tool_call>(.*?)(?:</tool_call>|(?=<tool_call>)|\Z)", re.DOTALL)
FENCE_OPEN_RE, FENCE_CLOSE_RE = (
    re.compile(r"\A```[\w+-]*"),
    re.compile(r"```\Z"),
)  # markdown code fence
SPECIAL_RE = re.compile(r"(?:\s*<\|[\w-]+\|>)+\s*\Z")  # e.g. a trailing <|im_end|> left in the text
STANDARDIZE_RE = re.compile(r"[ ,./\-_*^]")
# Python-literal fallback only: longer text is not handed to the ast parser
MAX_LITERAL_CHARS = 100_000
PY_TYPES = {
    "string": str,
    "integer": int,
    "float": float,
    "boolean": bool,
    "array": list,
    "tuple": list,
    "dict": dict,
    "any": str,
}
_BAD = object()  # "did not parse", distinct from any parsed value (None included)
PARSE_ERRORS = (ValueError, TypeError, SyntaxError, RecursionError, MemoryError, OverflowError)


def _literal(text: str):
    """One JSON value, else one Python literal (`ast.literal_eval`, never eval), else _BAD; never
    raises."""
    try:
        # JSONDecodeError and too-long ints are ValueErrors; deep nesting RecursionError
        return json.loads(text)
    except PARSE_ERRORS:
        if len(text) > MAX_LITERAL_CHARS:
            return _BAD
    try:
        return ast.literal_eval(text)
    except PARSE_ERRORS:
        return _BAD


def _block_body(block: str) -> str:
    """A block's text without surrounding whitespace, trailing special tokens and a markdown code
    fence (the opening ```lang and the closing ``` each taken off where present)."""
    body = SPECIAL_RE.sub("", block).strip()
    return FENCE_CLOSE_RE.sub("", FENCE_OPEN_RE.sub("", body)).strip()


def _call_of(obj) -> dict | None:
    """{"name", "arguments"} of one parsed call object, or None if it is not a call (see the
    parser)."""
    if isinstance(obj, dict) and "name" not in obj and isinstance(obj.get("function"), dict):
        obj = obj["function"]  # OpenAI style {"type": "function", "function": {...}}
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"].strip():
        return None
    args = obj["arguments"] if "arguments" in obj else obj.get("parameters")
    if args is None:
        args = {}
    elif isinstance(args, str):
        args = _literal(args.strip()) if args.strip() else {}
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        return None
    return {"name": obj["name"].strip(), "arguments": args}


def parse_tool_calls_tolerant(text: str, cut_off: bool = False) -> list[dict] | None:
    """The calls ({"name", "arguments"}) in a model output, forgiving what models really emit; None
    if unparsable. This is eval's one definition of a *parsable* output: the parsable % and BFCL's
    AST check both read these calls.

    cut_off: the generation stopped at its token cap. Its last block, when no `</tool_call>` closes
    it, is then a call the cap cut (whatever of it happens to parse), and the output is unparsable.

    Forgiven: prose around the blocks; a block that ends at the next `<tool_call>` or at the end of
    the text instead of `</tool_call>`; whitespace, one markdown code fence (```json ... ```) and
    trailing special tokens (`<|im_end|>`) around a block's content; a Python literal instead of
    JSON (single quotes, True/False/None, tuples; `ast.literal_eval` only, never eval, and only up
    to MAX_LITERAL_CHARS); a JSON list of calls in one block; `parameters` instead of `arguments`
    (`arguments` wins when both are there); arguments given as a JSON (or Python-literal) string;
    missing, null or empty-string arguments (= no arguments); an OpenAI-style wrapper {"type":
    "function", "function": {...}}; extra keys beside name and arguments; spaces around the name.
    Not accepted (the whole output is then unparsable): no `<tool_call>` at all (prose, or a bare
    JSON call without the tag); an empty block or an empty list of calls; a block whose content is
    not exactly one JSON value or Python literal (trailing text or an extra brace inside the block);
    a call without a non-empty string name; arguments that are not an object with string keys. Too
    deep or too large input counts as unparsable rather than raising.
    """
    if not isinstance(text, str):
        return None
    if cut_off and text.rfind("<tool_call>") > text.rfind("</tool_call>"):
        return None
    blocks = BLOCK_RE.findall(text)
    if not blocks:
        return None
    calls = []
    for block in blocks:
        body = _block_body(block)
        obj = _literal(body) if body else _BAD
        items = obj if isinstance(obj, list) else [obj]
        if obj is _BAD or not items:
            return None
        for item in items:
            call = _call_of(item)
            if call is None:
                return None
            calls.append(call)
    return calls


def standardize_string(s: str) -> str:
    """BFCL's string form for comparison: the characters space , . / - _ * ^ removed, lowercased, '
    -> "."""
    return STANDARDIZE_RE.sub("", s).lower().replace("'", '"')


def _same(value, want, std: bool = True) -> bool:
    """Type-aware equality at every depth: bool only equals bool, int equals float by value, tuple
    is list, strings compared standardised when `std`, lists element-wise in order, dicts key by
    key."""
    if isinstance(value, bool) or isinstance(want, bool):
        return type(value) is type(want) and value == want
    if isinstance(value, (int, float)) and isinstance(want, (int, float)):
        return value == want
    if isinstance(value, str) and isinstance(want, str):
        return standardize_string(value) == standardize_string(want) if std else value == want
    if isinstance(value, (list, tuple)) and isinstance(want, (list, tuple)):
        return len(value) == len(want) and all(_same(v, w, std) for v, w in zip(value, want))
    if isinstance(value, dict) and isinstance(want, dict):
        return value.keys() == want.keys() and all(_same(value[k], want[k], std) for k in want)
    return type(value) is type(want) and value == want


def _accepted_type(accepted: list):
    """The Python type of the first accepted value that is not the omission marker "", or None."""
    return next((type(a) for a in accepted if not (isinstance(a, str) and a == "")), None)


def _as_list(x) -> list:
    """x itself if it is a list, else [x] (an accepted dict may hold a bare value instead of a
    list)."""
    return x if isinstance(x, list) else [x]


def _dict_ok(value: dict, accepted: list) -> bool:
    """Some accepted dict (of accepted-value lists) takes `value`: known keys, accepted values, no
    missing key."""
    for want in accepted:
        if not isinstance(want, dict):
            continue
        if all(
            k in want and any(_same(v, a) for a in _as_list(want[k])) for k, v in value.items()
        ) and all(k in value or "" in _as_list(w) for k, w in want.items()):
            return True
    return False


def _dict_list_ok(value: list, accepted: list) -> bool:
    """Some accepted list of dicts takes `value`: same length, each dict accepted by its
    counterpart, in order."""
    return any(
        isinstance(want, list)
        and len(want) == len(value)
        and all(isinstance(v, dict) and _dict_ok(v, [w]) for v, w in zip(value, want))
        for want in accepted
    )


def _items_typed(value: list, accepted: list, item_type: type) -> bool:
    """BFCL's one-level check of an array's items: for some accepted value, each item has
    `item_type` or the type of that accepted list's first element (an accepted value that is no
    list, e.g. "", passes).
    """
    for want in accepted:
        if not isinstance(want, list):
            return True
        own = _accepted_type(want)
        if all(type(v) is item_type or type(v) is own for v in value):
            return True
    return False


def _empty_list_for_omitted(accepted: list) -> list:
    """The accepted values with the omission marker "" read as [] (BFCL lets an explicit [] stand
    for it)."""
    return [[] if isinstance(a, str) and a == "" else a for a in accepted]


def _value_reason_typed(value, accepted: list, typ: str, items: str | None) -> str | None:
    """None if `value` is accepted for a parameter of doc type `typ` (items type `items`), else
    "wrong_type" or "wrong_value"; BFCL's Python rules (module docstring)."""
    want = PY_TYPES[typ]
    if typ == "tuple" and type(value) is tuple:
        value = list(value)
    if typ == "float" and type(value) is int:
        value = float(value)
    own = _accepted_type(accepted)
    variable = own is not None and own is not want
    if type(value) is want:
        if (
            typ in ("array", "tuple")
            and items in PY_TYPES
            and not _items_typed(value, accepted, PY_TYPES[items])
        ):
            return "wrong_type"
    elif own is not None and type(value) is own:
        variable = True
    else:
        return "wrong_type"
    if want is list and not variable:
        accepted = _empty_list_for_omitted(accepted)
    if variable:
        ok = any(_same(value, a, std=False) for a in accepted)
    elif want is dict:
        ok = _dict_ok(value, accepted)
    elif want is list and items == "dict":
        ok = _dict_list_ok(value, accepted)
    else:
        ok = any(_same(value, a) for a in accepted)
    return None if ok else "wrong_value"


def _is_dict_list(x) -> bool:
    """A non-empty list of dicts (BFCL's form of an accepted array of dicts)."""
    return isinstance(x, list) and bool(x) and all(isinstance(d, dict) for d in x)


def _value_reason_untyped(value, accepted: list) -> str | None:
    """None if `value` is accepted, judged by the accepted values' own type (no function doc), else
    a reason."""
    own = _accepted_type(accepted)
    number = (int, float)
    if (
        own is not None
        and type(value) is not own
        and not (own in number and type(value) in number)
        and not (own is list and type(value) is tuple)
    ):
        return "wrong_type"
    if isinstance(value, (list, tuple)):
        accepted = _empty_list_for_omitted(accepted)
    if own is dict:
        ok = _dict_ok(value, accepted)
    elif own is list and any(_is_dict_list(a) for a in accepted):
        ok = _dict_list_ok(list(value), accepted)
    else:
        ok = any(_same(value, a) for a in accepted)
    return None if ok else "wrong_value"


def _call_reason(call: dict, name: str, expected: dict, doc: dict | None) -> str | None:
    """None if `call` matches the ground-truth call (name, {arg: accepted}), else why not (see
    bfcl_check)."""
    if call["name"] != name:
        return "wrong_name"
    args = call["arguments"]
    params = (doc or {}).get("parameters") or {}
    props = (params.get("properties") or {}) if doc is not None else None
    required = (
        (params.get("required") or [])
        if doc is not None
        else [k for k, v in expected.items() if "" not in v]
    )
    for k in required:
        if k not in args:
            return f"missing_required:{k}"
    for k, v in args.items():
        if k not in expected or (props is not None and k not in props):
            return f"unknown_argument:{k}"
        spec = props.get(k) if props is not None else None
        typ = spec.get("type") if isinstance(spec, dict) else None
        if typ in PY_TYPES:
            items = spec.get("items")
            reason = _value_reason_typed(
                v, expected[k], typ, items.get("type") if isinstance(items, dict) else None
            )
        else:
            reason = _value_reason_untyped(v, expected[k])
        if reason:
            return f"{reason}:{k}"
    for k, v in expected.items():
        if k not in args and "" not in v:
            return f"missing_required:{k}"
    return None


def _matching(ok: list[list[bool]]) -> list[int | None]:
    """Maximum bipartite matching: for each row (ground-truth call) the column (output call) it
    gets, or None."""
    owner: dict[int, int] = {}

    def augment(i: int, seen: set) -> bool:
        for j, good in enumerate(ok[i]):
            if good and j not in seen:
                seen.add(j)
                if j not in owner or augment(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    for i in range(len(ok)):
        augment(i, set())
    got = {i: j for j, i in owner.items()}
    return [got.get(i) for i in range(len(ok))]


def _docs_by_name(functions) -> dict:
    """Function docs by name from a list (or one doc); OpenAI-style {"function": {...}} wrappers
    unwrapped."""
    if functions is None:
        return {}
    docs = {}
    for f in functions if isinstance(functions, list) else [functions]:
        f = f.get("function", f) if isinstance(f, dict) and "name" not in f else f
        if isinstance(f, dict) and isinstance(f.get("name"), str):
            docs[f["name"]] = f
    return docs


def _ground_truth_calls(ground_truth: list) -> list[tuple[str, dict]]:
    """[(name, {arg: accepted list})] of a BFCL ground truth; ValueError if it is not in BFCL's
    form."""
    if not isinstance(ground_truth, list):
        raise ValueError(
            "ground truth must be a list of {function_name: {argument: [accepted values]}}"
        )
    out = []
    for g in ground_truth:
        if not isinstance(g, dict) or len(g) != 1:
            raise ValueError(f"ground-truth call must be a one-key dict, got {g!r}")
        ((name, args),) = g.items()
        if not isinstance(args, dict) or not all(isinstance(v, list) for v in args.values()):
            raise ValueError(
                f"ground truth of {name!r} must map each argument to a list of accepted values"
            )
        out.append((name, args))
    return out


def bfcl_check(
    text: str, ground_truth: list, functions: list | None = None, cut_off: bool = False
) -> dict:
    """BFCL AST verdict on a model output: {"correct", "reason", "calls"}.

    `reason` is None when correct, else one of "unparsable", "wrong_count", "unexpected_call" (a
    call where the ground truth is empty), "wrong_name", "missing_required:<arg>",
    "unknown_argument:<arg>", "wrong_type:<arg>", "wrong_value:<arg>" (the part before ':' is the
    kind). With several calls and no full matching, the reason is that of the first unmatched
    ground-truth call against a left-over output call of the same name ("wrong_name" if there is
    none). `calls` is what the tolerant parser read (None if nothing). `functions` (BFCL function
    docs) is optional: without it, or for a call whose name has no doc, the rules fall back as the
    module docstring says. `cut_off`: the output stopped at the token cap (see
    parse_tool_calls_tolerant).
    """
    expected = _ground_truth_calls(ground_truth)
    calls = parse_tool_calls_tolerant(text, cut_off)
    if not expected:
        return {
            "correct": calls is None,
            "reason": None if calls is None else "unexpected_call",
            "calls": calls,
        }
    if calls is None:
        return {"correct": False, "reason": "unparsable", "calls": None}
    if len(calls) != len(expected):
        return {"correct": False, "reason": "wrong_count", "calls": calls}
    docs = _docs_by_name(functions)
    try:
        reasons = [
            [_call_reason(c, name, args, docs.get(name)) for c in calls] for name, args in expected
        ]
    except (RecursionError, MemoryError):
        return {"correct": False, "reason": "unparsable", "calls": calls}
    match = _matching([[r is None for r in row] for row in reasons])
    if all(j is not None for j in match):
        return {"correct": True, "reason": None, "calls": calls}
    i = match.index(None)
    free = [j for j in range(len(calls)) if j not in match]
    named = [reasons[i][j] for j in free if reasons[i][j] != "wrong_name"]
    return {"correct": False, "reason": named[0] if named else "wrong_name", "calls": calls}


def bfcl_correct(text: str, ground_truth: list, functions: list | None = None) -> bool:
    """True if the output's calls match the BFCL ground truth under BFCL's AST rules (see
    bfcl_check)."""
    return bfcl_check(text, ground_truth, functions)["correct"]
