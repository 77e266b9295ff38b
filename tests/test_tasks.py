"""Task metrics: tool-call parsing and matching, GSM8K extraction, per-method summaries, the chat
command."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from minroute.evaluation import tasks
from minroute.evaluation.bfcl import (
    bfcl_check,
    bfcl_correct,
    parse_tool_calls_tolerant,
    standardize_string,
)
from minroute.evaluation.tasks import (
    gsm8k_prediction,
    score_gsm8k,
    score_row,
    score_tool_call,
)

REF = [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]


@pytest.mark.parametrize(
    "output,expected",
    [
        (
            (
                '<tool_call>\n{"name": "get_weather", "arguments": {"unit": "celsius", "city":'
                ' "Paris"}}\n</tool_call>'
            ),
            {"parsable": True, "name_match": True, "exact": True},
        ),  # key order does not matter
        (
            (
                '<tool_call>\n{"name": "get_stock", "arguments": {"city": "Paris", "unit":'
                ' "celsius"}}\n</tool_call>'
            ),
            {"parsable": True, "name_match": False, "exact": False},
        ),
        (
            (
                '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon", "unit":'
                ' "celsius"}}\n</tool_call>'
            ),
            {"parsable": True, "name_match": True, "exact": False},
        ),
        (
            "<tool_call>\n{'name': 'get_weather', 'arguments': {}}\n</tool_call>",
            {"parsable": True, "name_match": True, "exact": False},
        ),  # a Python literal: read as BFCL's AST check reads it
        (
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa',
            {"parsable": False, "name_match": False, "exact": False},
        ),  # truncated at the token cap
        ("The weather is nice.", {"parsable": False, "name_match": False, "exact": False}),
        (
            (
                '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\",'
                ' \\"unit\\": \\"celsius\\"}"}\n</tool_call>'
            ),
            {"parsable": True, "name_match": True, "exact": True},
        ),  # arguments as a JSON string
    ],
)
def test_tool_call_scoring(output, expected):
    assert score_tool_call(output, REF) == expected


def test_two_calls_must_match_in_order():
    ref = [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}]
    out = (
        '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "b",'
        ' "arguments": {"x": 1}}\n</tool_call>'
    )
    assert score_tool_call(out, ref)["exact"]
    assert not score_tool_call(out, ref[::-1])["name_match"]
    assert parse_tool_calls_tolerant(out + "<tool_call>oops</tool_call>") is None


@pytest.mark.parametrize(
    "output,value,how",
    [
        ("3 + 2 = <<3+2=5>>5\n#### 5", 5.0, "marker"),
        ("The total is 1,200 dollars.\n#### 1,200", 1200.0, "marker"),
        ("First 12, then 7. So the answer is 19.", 19.0, "last_number"),
        ("She has -3.5 left", -3.5, "last_number"),
        ("no digits here", None, "none"),
    ],
)
def test_gsm8k_extraction(output, value, how):
    assert gsm8k_prediction(output) == (value, how)


def test_gsm8k_scoring():
    assert score_gsm8k("#### 72", "72")["correct"]
    assert score_gsm8k("so 72.0", "72") == {"correct": True, "how": "last_number"}
    assert not score_gsm8k("#### 71", "72")["correct"]


def test_run_tasks_with_forced_outputs_gives_hand_computed_values(demo_run, monkeypatch):
    """Generation replaced by fixed outputs: the summary must be the hand-computed shares, with
    Wilson intervals."""
    from minroute.run.checkpoint import load_layerroute
    from minroute.run.data import TokenSplit
    from minroute.run.load import load_tokenizer

    route, meta = load_layerroute(demo_run, "latest")
    ev = TokenSplit(meta["args"]["data"], "eval")
    tok = load_tokenizer(meta["args"]["model"])
    tool_rows = [i for i, r in enumerate(ev.rows) if r["step_type"] == "tool_call"]
    plan_rows = [i for i, r in enumerate(ev.rows) if r["step_type"] == "planning"]
    outputs = {}
    for k, i in enumerate(tool_rows):  # 1 exact, 1 wrong name, rest unparsable
        call = ev.rows[i]["messages"][-1]["tool_calls"][0]
        if k == 0:
            outputs[i] = f"<tool_call>\n{json.dumps(call)}\n</tool_call>"
        elif k == 1:
            outputs[i] = '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>'
        else:
            outputs[i] = "garbage"
    for k, i in enumerate(plan_rows):  # first two right, the rest wrong
        ans = ev.rows[i]["meta"]["final_answer"]
        outputs[i] = f"#### {ans}" if k < 2 else "#### -99999"
    by_prompt = {tuple(ev.get(i)[0][: ev.prompt_len[i]].tolist()): i for i in range(len(ev))}

    def fake(route_, prompts, max_new, eos, pad, device, gates=None):
        rows = [by_prompt[tuple(np.asarray(p).tolist())] for p in prompts]
        out = [tok.tokenizer.encode(outputs[i], add_special_tokens=False).ids for i in rows]
        # (ids, tokens generated): odd rows end with a stop token (one more than their ids), even
        # rows ran into the cap (no stop token)
        return [(ids, len(ids) + (i % 2)) for ids, i in zip(out, rows)]

    monkeypatch.setattr(tasks, "generate_batch", fake)
    L = route.config.num_hidden_layers
    methods = {
        "base": (np.ones(L, bool), False),
        "full": (np.ones(L, bool), True),
        "gated": (None, True),
    }
    res = tasks.run_tasks(route, ev, tok, 8, "cpu", methods, batch_size=3)
    s = res["summary"]["gated"]
    nt, npl = len(tool_rows), len(plan_rows)
    assert s["tool"]["parsable"] == pytest.approx(100 * 2 / nt)
    assert s["tool"]["name_match"] == pytest.approx(100 * 1 / nt) and s["tool"][
        "exact"
    ] == pytest.approx(100 / nt)
    assert s["planning"]["accuracy"] == pytest.approx(100 * 2 / npl)
    lo, hi = s["ci95"]["gsm8k"]
    assert 0 < lo < 100 * 2 / npl < hi < 100
    assert s["hit_cap"] == pytest.approx(100 * np.mean([i % 2 == 0 for i in range(len(ev))]))
    assert set(res["summary"]) == {"base", "full", "gated"}
    assert [r["sample"] for r in res["samples"] if r["method"] == "gated"] == list(range(len(ev)))


def test_batched_generation_equals_one_prompt_at_a_time(demo_run):
    """Left-padded batches of prompts of different lengths give each prompt its own greedy output
    and gates."""
    from minroute.run.checkpoint import load_layerroute
    from minroute.run.data import TokenSplit
    from minroute.run.load import load_tokenizer

    route, meta = load_layerroute(demo_run, "latest")
    ev = TokenSplit(meta["args"]["data"], "eval")
    tok = load_tokenizer(meta["args"]["model"])
    prompts = [ev.get(i)[0][: ev.prompt_len[i]] for i in (0, 3, 11, 14)]
    together = tasks.generate_batch(route, prompts, 12, tok.eos_ids, tok.pad_id, "cpu")
    gates = route.last.hard.clone()
    for k, p in enumerate(prompts):
        alone = tasks.generate_batch(route, [p], 12, tok.eos_ids, tok.pad_id, "cpu")
        assert alone[0] == together[k], f"prompt {k}: {alone[0]} != {together[k]}"
        assert torch.equal(route.last.hard[0], gates[k])


def test_bfcl_rows_are_scored_by_bfcl_rules():
    row = {
        "step_type": "tool_call",
        "messages": [
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"name": "calc", "arguments": {"base": 10}}],
            }
        ],
        "meta": {
            "ground_truth": [{"calc": {"base": [10], "unit": ["units", ""]}}],
            "functions": None,
        },
    }
    ok = tasks.score_row(
        '<tool_call>\n{"name": "calc", "arguments": {"base": 10.0, "unit": "units"}}\n</tool_call>',
        row,
    )
    assert ok["bfcl"] and not ok["exact"], (
        "BFCL accepts an accepted alternative the strict JSON match does not"
    )
    bad = tasks.score_row(
        '<tool_call>\n{"name": "calc", "arguments": {"base": 11}}\n</tool_call>', row
    )
    assert not bad["bfcl"] and bad["bfcl_reason"] == "wrong_value"


def test_chat_command_runs_on_demo_checkpoint(demo_run, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(
        '[{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]'
    )
    root = Path(__file__).resolve().parent.parent
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "minroute.evaluation.generate",
            "--ckpt",
            str(demo_run),
            "--which",
            "latest",
            "--prompt",
            "Weather in Paris?",
            "--tools",
            str(tools),
            "--max-new-tokens",
            "12",
        ],
        capture_output=True,
        text=True,
        cwd=root,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)},
    )
    assert res.returncode == 0, res.stderr
    assert "[gates " in res.stdout and "blocks ran" in res.stdout and "tok/s]" in res.stdout


def test_chat_command_checks_tools_first_and_caps_new_tokens(
    demo_run, tmp_path, capsys, monkeypatch
):
    import json

    import minroute.run.checkpoint as ck
    from minroute.evaluation.generate import chat_main
    from minroute.run.safety import run_cli

    bad = tmp_path / "tools.json"
    bad.write_text('{"name": "not a list"}')
    monkeypatch.setattr(
        ck, "load_layerroute", lambda *a, **k: pytest.fail("loaded the model before --tools")
    )
    for content, msg in (('{"name": "x"}', "must hold a JSON list"), ("[{oops", "not valid JSON")):
        bad.write_text(content)
        assert (
            run_cli(chat_main, ["--ckpt", str(demo_run), "--prompt", "hi", "--tools", str(bad)])
            == 2
        )
        assert msg in capsys.readouterr().err
    assert (
        run_cli(
            chat_main,
            ["--ckpt", str(demo_run), "--prompt", "hi", "--tools", str(tmp_path / "none")],
        )
        == 2
    )
    assert "cannot read it" in capsys.readouterr().err
    monkeypatch.undo()
    with pytest.raises(SystemExit):
        chat_main(["--ckpt", str(demo_run), "--prompt", "hi", "--max-new-tokens", "-5"])
    assert "must be a whole number > 0" in capsys.readouterr().err
    small = tmp_path / "model"  # the demo model with a 160-token context
    import shutil

    shutil.copytree(demo_run / "demo-model", small)
    cfg = json.loads((small / "config.json").read_text())
    cfg["max_position_embeddings"] = 160
    (small / "config.json").write_text(json.dumps(cfg))
    assert (
        chat_main(
            [
                "--ckpt",
                str(demo_run),
                "--model",
                str(small),
                "--prompt",
                "hi",
                "--max-new-tokens",
                "100000",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "[note: --max-new-tokens 100000 capped at" in out


# ---- BFCL AST scorer: bfcl_check / bfcl_correct and the tolerant parser ----


BFCL_FIXTURE = Path(__file__).parent / "fixtures" / "bfcl" / "bfcl_v4_sample.json"
MODES = (
    "omit",
    "first",
)  # optional args ("" accepted): left out, or given their first non-"" accepted value


def call_block(name, args) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"


def is_accepted_lists(d) -> bool:
    """A dict in BFCL's ground-truth form {key: [accepted values]} (nested dict parameters use it
    too)."""
    return isinstance(d, dict) and all(isinstance(v, list) for v in d.values())


def render_value(v, mode):
    if is_accepted_lists(v):
        return render_args(v, mode)
    if isinstance(v, list) and v and all(is_accepted_lists(d) for d in v):
        return [render_args(d, mode) for d in v]
    return v


def rendered_keys(args: dict, mode: str) -> list:
    """The ground-truth arguments a rendering gives: those without "" ('omit') / with a non-"" value
    ('first')."""
    return [
        k
        for k, acc in args.items()
        if not ("" in acc and (mode == "omit" or all(a == "" for a in acc)))
    ]


def render_args(args: dict, mode: str) -> dict:
    """Each rendered argument's first accepted value ('first': first non-"" value), nested dicts
    likewise."""
    return {
        k: render_value(next((a for a in args[k] if a != ""), ""), mode)
        for k in rendered_keys(args, mode)
    }


def render(gt: list, mode: str, order=None) -> str:
    calls = [next(iter(c.items())) for c in gt]
    return "\n".join(
        call_block(n, render_args(a, mode))
        for n, a in (calls if order is None else [calls[i] for i in order])
    )


def impossible(functions, gt, mode: str, docs: bool) -> str | None:
    """Why this rendering cannot pass under BFCL's rules, read off the data alone (not via the
    scorer), or None."""
    by_name = {f["name"]: f for f in functions}
    for c in gt:
        ((name, args),) = c.items()
        if any(acc == [] for acc in args.values()):
            return "an argument with no accepted value at all ([])"
        if docs:
            params = by_name[name]["parameters"]
            given = rendered_keys(args, mode)
            if any(k not in params["properties"] for k in given):
                return "a ground-truth argument the function doc does not have"
            if any(k not in given for k in params.get("required", [])):
                return "a doc-required argument the rendering leaves out"
    return None


def not_accepted(v, accepted):
    """A value of the same kind as v that the ground truth does not list."""
    if isinstance(v, bool):
        m = not v
    elif isinstance(v, (int, float)):
        m = v + 1000003
    elif isinstance(v, str):
        m = v + " zq9"
    elif isinstance(v, list):
        m = v + [v[-1]] if v else ["zq9"]
    elif isinstance(v, dict):
        m = {**v, "zq9": 1}
    else:
        m = "zq9"
    return "zq9" if any(type(a) is type(m) and a == m for a in accepted) else m


def sweep(rows, mode: str, docs: bool):
    """(ids that fail, ids predicted impossible with the reason) for rendered ground truths."""
    failed, predicted = set(), {}
    for rid, functions, gt in rows:
        if not bfcl_correct(render(gt, mode), gt, functions if docs else None):
            failed.add(rid)
        why = impossible(functions, gt, mode, docs)
        if why:
            predicted[rid] = why
    return failed, predicted


def mutation_sweep(rows, docs: bool):
    """Every rendered argument of every passable row, one at a time, set to a value not accepted:
    must fail with wrong_value/wrong_type (on that argument where the row has one call; with
    several, the reason may name another pair when ground-truth calls overlap). Returns (checks
    made, [problems])."""
    n, problems = 0, []
    for rid, functions, gt in rows:
        if impossible(functions, gt, "first", docs):
            continue
        calls = [next(iter(c.items())) for c in gt]
        for i, (_name, args) in enumerate(calls):
            for k in rendered_keys(args, "first"):
                rendered = [(nm, render_args(a, "first")) for nm, a in calls]
                rendered[i][1][k] = not_accepted(rendered[i][1][k], args[k])
                res = bfcl_check(
                    "\n".join(call_block(*c) for c in rendered), gt, functions if docs else None
                )
                n += 1
                kind, _, arg = (res["reason"] or "").partition(":")
                if (
                    res["correct"]
                    or kind not in ("wrong_value", "wrong_type")
                    or (len(calls) == 1 and arg != k)
                ):
                    problems.append((rid, k, rendered[i][1][k], res["reason"]))
    return n, problems


def load_fixture_rows():
    return [
        (r["id"], r["function"], r["ground_truth"])
        for r in json.loads(BFCL_FIXTURE.read_text())["rows"]
    ]


@pytest.fixture(scope="module")
def bfcl_data():
    """{category: [(id, functions, ground_truth)]} from $MINROUTE_DATA/bfcl-v4, or skip."""
    root = os.environ.get("MINROUTE_DATA")
    folder = Path(root) / "bfcl-v4" if root else None
    if folder is None or not (folder / "possible_answer").is_dir():
        pytest.skip(
            "real BFCL v4 data not available (set MINROUTE_DATA to the folder holding bfcl-v4/)"
        )
    data = {}
    for answers in sorted((folder / "possible_answer").glob("BFCL_v4_*.json")):
        qs = [
            json.loads(line)
            for line in (folder / answers.name).read_text().splitlines()
            if line.strip()
        ]
        gts = [json.loads(line) for line in answers.read_text().splitlines() if line.strip()]
        assert [q["id"] for q in qs] == [g["id"] for g in gts], (
            f"{answers.name}: question and answer ids differ"
        )
        data[answers.name[len("BFCL_v4_") : -len(".json")]] = [
            (q["id"], q["function"], g["ground_truth"]) for q, g in zip(qs, gts)
        ]
    assert data, f"no ground-truth files under {folder}"
    return data


def real_row(data, rid):
    return next(r for rows in data.values() for r in rows if r[0] == rid)


# -- the parser: what it forgives and what it does not (no data needed) --


@pytest.mark.parametrize(
    "text,calls",
    [
        ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>', [("f", {"a": 1})]),
        (
            'Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}',
            [("f", {"a": 1})],
        ),  # no closing tag at the end
        (
            '<tool_call>{"name": "f"}\n<tool_call>{"name": "g"}</tool_call>',
            [("f", {}), ("g", {})],
        ),  # next block closes
        (
            '<tool_call>\n{"name": "f", "arguments": "{\\"a\\": [1, 2]}"}\n</tool_call>',
            [("f", {"a": [1, 2]})],
        ),
        ('<tool_call>{"name": "f", "parameters": {"a": "x"}}</tool_call>', [("f", {"a": "x"})]),
        (
            '<tool_call>{"name": "f", "arguments": {"a": 1}, "parameters": {"a": 2}}</tool_call>',
            [("f", {"a": 1})],
        ),
        (
            (
                "<tool_call>\n{'name': 'f', 'arguments': {'a': True, 'b': None, 'c': (1,"
                " 2)}}\n</tool_call>"
            ),
            [("f", {"a": True, "b": None, "c": (1, 2)})],
        ),
        (
            (
                '<tool_call>[{"name": "f", "arguments": {}}, {"name": "g", "arguments": {"x":'
                " 2}}]</tool_call>"
            ),
            [("f", {}), ("g", {"x": 2})],
        ),
        (
            '<tool_call>\n```json\n{"name": "f", "arguments": {"a": 1}}\n```\n</tool_call>',
            [("f", {"a": 1})],
        ),
        ('<tool_call>\n```\n{"name": "f"}\n</tool_call>', [("f", {})]),  # an unclosed fence
        ('<tool_call>{"name": "f", "arguments": {"a": 1}}<|im_end|>', [("f", {"a": 1})]),
        (
            (
                '<tool_call>{"type": "function", "function": {"name": "f", "arguments": "{\\"a\\":'
                ' 1}"}}</tool_call>'
            ),
            [("f", {"a": 1})],
        ),
        ('<tool_call>{"name": " f ", "arguments": null, "id": "c1"}</tool_call>', [("f", {})]),
        ('<tool_call>{"name": "f", "arguments": ""}</tool_call>', [("f", {})]),
    ],
)
def test_tolerant_parser_accepts(text, calls):
    assert parse_tool_calls_tolerant(text) == [{"name": n, "arguments": a} for n, a in calls]


@pytest.mark.parametrize(
    "text",
    [
        "The weather in Paris is nice.",  # prose only
        '{"name": "f", "arguments": {"a": 1}}',  # a bare call without the tag
        '```json\n{"name": "f", "arguments": {}}\n```',
        "<tool_call>\n</tool_call>",  # empty block
        "<tool_call>[]</tool_call>",  # empty list of calls
        '<tool_call>{"arguments": {"a": 1}}</tool_call>',  # no name
        '<tool_call>{"name": "", "arguments": {}}</tool_call>',
        '<tool_call>{"name": 3, "arguments": {}}</tool_call>',
        '<tool_call>{"name": "f", "arguments": [1, 2]}</tool_call>',  # arguments not an object
        '<tool_call>{"name": "f", "arguments": "not json"}</tool_call>',
        "<tool_call>{'name': 'f', 'arguments': {1: 2}}</tool_call>",  # non-string keys
        '<tool_call>{"name": "f", "arguments": {}}}</tool_call>',  # an extra brace
        '<tool_call>{"name": "f", "arguments": {}} and then some</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": {"city": "Pa',  # truncated
        # one bad block spoils the output
        '<tool_call>{"name": "f"}</tool_call><tool_call>oops</tool_call>',
        "<tool_call>__import__('os').system('echo hi')</tool_call>",  # code is never run
        "<tool_call>{'name': 'f', 'arguments': {'a': len('x')}}</tool_call>",
    ],
)
def test_tolerant_parser_rejects(text):
    assert parse_tool_calls_tolerant(text) is None
    assert bfcl_check(text, [{"f": {"a": [1]}}])["reason"] == "unparsable"


@pytest.mark.parametrize(
    "payload",
    [
        "[" * 100_000,
        "{" * 100_000,
        "(" * 100_000 + ")" * 100_000,
        '{"name": "f", "arguments": {"a": ' + "[" * 5000 + "]" * 5000 + "}}",
        "{'name': 'f', 'arguments': {'a': " + "-" * 90_000 + "1}}",
        '{"name": "f", "arguments": {"a": ' + "9" * 10_000 + "}}",
        "x" * 3_000_000,
    ],
)
def test_tolerant_parser_survives_deep_and_huge_inputs(payload):
    text = "<tool_call>" + payload + "</tool_call>"
    assert parse_tool_calls_tolerant(text) is None
    assert bfcl_check(text, [{"f": {"a": [1]}}]) == {
        "correct": False,
        "reason": "unparsable",
        "calls": None,
    }


def test_deep_but_parsable_value_is_scored_not_crashed():
    deep = "[" * 900 + "]" * 900
    res = bfcl_check(
        '<tool_call>{"name": "f", "arguments": {"a": ' + deep + "}}</tool_call>",
        [{"f": {"a": [[[1]]]}}],
    )
    assert res["reason"] == "wrong_value:a" and res["calls"] is not None


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
BFCL_ROW = {
    "step_type": "tool_call",
    "messages": [{"role": "assistant", "tool_calls": REF}],
    "meta": {"ground_truth": [{"get_weather": {"city": ["Paris"], "unit": ["celsius"]}}]},
}


@pytest.mark.parametrize(
    "text,cut_off,parsable",
    [
        (CALL + "\n</tool_call>", False, True),
        (CALL + "\n</tool_call>", True, True),  # closed before the cap: a whole call
        (CALL, False, True),  # the model stopped without the closing tag: forgiven
        (CALL, True, False),  # the cap cut it: whatever parsed of it is not a call
        # a whole call, then a second one the cap cut: the output is unparsable (once counted
        # parsable by a strict first-block parser while BFCL's rejected it)
        (CALL + "\n</tool_call>\n" + CALL, True, False),
        (CALL + "\n</tool_call>\n" + CALL + "\n</tool_call>", True, True),
        (CALL + "\n</tool_call> and then some prose the cap cut", True, True),
    ],
)
def test_one_definition_of_parsable(text, cut_off, parsable):
    """The parsable % and BFCL's AST check read the same calls: parsable exactly when BFCL does not
    call the output unparsable."""
    s = score_row(text, BFCL_ROW, cut_off=cut_off)
    assert s["parsable"] is parsable
    assert (s["bfcl_reason"] != "unparsable") is parsable
    assert (parse_tool_calls_tolerant(text, cut_off) is not None) is parsable
    if parsable and text.count("<tool_call>") == 1:
        assert s["exact"] and s["bfcl"]


def test_generation_at_the_cap_is_scored_as_cut_off(monkeypatch):
    """run_tasks tells the scorer a row hit the cap when no stop token ended it (not when the stop
    token happens to be the cap-th token)."""
    seen = []

    def fake_score(text, row, cut_off=False):
        seen.append(cut_off)
        return {"parsable": False, "name_match": False, "exact": False}

    class Tok:
        eos_ids, pad_id = [2], 0

        class tokenizer:
            @staticmethod
            def decode(ids, skip_special_tokens=False):
                return "x"

    def fake_generate_batch(route, prompts, cap, eos, pad, device, gates):
        # row 0: the stop token is the cap-th token; row 1: no stop token within the cap
        return [([5, 6, 7], 4), ([5, 6, 7, 8], 4)][: len(prompts)]

    class Split:
        rows = [{"step_type": "tool_call", "messages": [{}]}] * 2
        prompt_len = np.array([2, 2])

        def get(self, i):
            return (np.array([1, 1]),)

    class Route:
        config = type("C", (), {"num_hidden_layers": 2})
        last = None

    monkeypatch.setattr(tasks, "score_row", fake_score)
    monkeypatch.setattr(tasks, "generate_batch", fake_generate_batch)
    out = tasks.run_tasks(Route(), Split(), Tok(), 4, "cpu", {"full": (None, True)})
    assert seen == [False, True]
    assert [r["hit_cap"] for r in out["samples"]] == [False, True]


# -- the matching rules on hand-made cases (no data needed) --


def test_standardize_string_is_bfcls():
    """BFCL strips exactly space , . / - _ * ^, lowercases, and turns ' into "; nothing else."""
    assert standardize_string("A b,c.d/e-f_g*h^i'J") == 'abcdefghi"j'
    assert standardize_string("a\tb:c;d!e(f)") == "a\tb:c;d!e(f)"
    gt = [{"f": {"s": ["New York, NY"]}}]
    for ok in ("new york ny", "NEW-YORK/NY.", "New_York,NY", "new  york,  ny"):
        assert bfcl_correct(call_block("f", {"s": ok}), gt), ok
    for bad in ("New York NY!", "New York:NY", "New\tYork NY", "New York"):
        assert bfcl_check(call_block("f", {"s": bad}), gt)["reason"] == "wrong_value:s", bad


def test_numbers_booleans_and_types():
    doc = [
        {
            "name": "f",
            "parameters": {
                "type": "dict",
                "properties": {
                    "i": {"type": "integer"},
                    "x": {"type": "float"},
                    "b": {"type": "boolean"},
                    "s": {"type": "string"},
                    "xs": {"type": "array", "items": {"type": "float"}},
                },
                "required": ["i"],
            },
        }
    ]
    gt = [
        {"f": {"i": [5], "x": [2.0, ""], "b": [True, ""], "s": ["5", ""], "xs": [[1.5, 2.0], ""]}}
    ]

    def check(args, d=doc):
        return bfcl_check(call_block("f", args), gt, d)["reason"]

    assert check({"i": 5, "x": 2}) is None  # an int for a float
    assert check({"i": 5, "x": 2.0}) is None
    assert check({"i": 5.0}) == "wrong_type:i"  # BFCL: no float for an integer parameter...
    assert check({"i": 5.0}, None) is None  # ...but without the doc the type is unknown: 5.0 == 5
    assert check({"i": True}) == "wrong_type:i" and check({"i": True}, None) == "wrong_type:i"
    assert (
        check({"i": 5, "b": 1}) == "wrong_type:b"
        and check({"i": 5, "b": 1}, None) == "wrong_type:b"
    )
    assert check({"i": 5, "b": False}) == "wrong_value:b"
    assert check({"i": 5, "s": 5}) == "wrong_type:s" and check({"i": "5"}) == "wrong_type:i"
    # BFCL's item check passes when "" is accepted (no list)
    assert check({"i": 5, "xs": [1.5, 2]}) is None
    assert check({"i": 5, "xs": [2.0, 1.5]}) == "wrong_value:xs"  # order matters in lists
    assert check({"x": 2.0}) == "missing_required:i"
    gt_xs = [{"f": {"i": [5], "xs": [[1.5, 2.0]]}}]
    assert (
        bfcl_check(call_block("f", {"i": 5, "xs": [1.5, 2]}), gt_xs, doc)["reason"]
        == "wrong_type:xs"
    )  # no
    # int in a float array (BFCL); no doc: ok
    assert bfcl_correct(call_block("f", {"i": 5, "xs": [1.5, 2]}), gt_xs)
    assert bfcl_correct(call_block("f", {"i": 5, "xs": [1.5, 2.0]}), gt_xs, doc)


def test_tuples_lists_dicts():
    doc = [
        {
            "name": "f",
            "parameters": {
                "type": "dict",
                "properties": {
                    "t": {"type": "tuple", "items": {"type": "integer"}},
                    "a": {"type": "array", "items": {"type": "integer"}},
                    "d": {"type": "dict"},
                },
                "required": [],
            },
        }
    ]
    gt = [{"f": {"t": [[1, 2], ""], "a": [[3], ""], "d": [{"k": ["v"], "n": [1, ""]}, ""]}}]

    def py(body):
        return "<tool_call>{'name': 'f', 'arguments': {" + body + "}}</tool_call>"

    assert bfcl_correct(py("'t': (1, 2)"), gt, doc) and bfcl_correct(py("'t': [1, 2]"), gt, doc)
    # a tuple is no array (BFCL)
    assert bfcl_check(py("'a': (3,)"), gt, doc)["reason"] == "wrong_type:a"
    assert bfcl_correct(py("'a': (3,)"), gt)  # without the doc a tuple is a list
    # optional key n left out, value standardised
    assert bfcl_correct(py("'d': {'k': 'V'}"), gt, doc)
    assert bfcl_correct(py("'d': {'k': 'v', 'n': 1}"), gt, doc) and bfcl_correct(
        py("'d': {'k': 'v', 'n': 1}"), gt
    )
    # unknown key
    assert bfcl_check(py("'d': {'k': 'v', 'z': 1}"), gt, doc)["reason"] == "wrong_value:d"
    assert bfcl_check(py("'d': {'n': 1}"), gt, doc)["reason"] == "wrong_value:d"  # missing key k
    # True is not 1
    assert bfcl_check(py("'d': {'k': 'v', 'n': True}"), gt)["reason"] == "wrong_value:d"
    # [] for "" (BFCL)
    assert bfcl_correct(py("'a': []"), gt, doc) and bfcl_correct(py("'a': []"), gt)
    # but {} is not "" for a dict
    assert bfcl_check(py("'d': {}"), gt, doc)["reason"] == "wrong_value:d"


def test_names_arguments_counts():
    gt = [{"math.factorial": {"number": [5]}}]
    assert bfcl_check(call_block("math.factorial", {"number": 5}), gt) == {
        "correct": True,
        "reason": None,
        "calls": [{"name": "math.factorial", "arguments": {"number": 5}}],
    }
    assert bfcl_check(call_block("math_factorial", {"number": 5}), gt)["reason"] == "wrong_name"
    assert bfcl_check(call_block("Math.factorial", {"number": 5}), gt)["reason"] == "wrong_name"
    assert (
        bfcl_check(call_block("math.factorial", {"number": 5, "x": 1}), gt)["reason"]
        == "unknown_argument:x"
    )
    assert bfcl_check(call_block("math.factorial", {}), gt)["reason"] == "missing_required:number"
    two = call_block("math.factorial", {"number": 5}) * 2
    assert bfcl_check(two, gt)["reason"] == "wrong_count"
    doc = [
        {
            "name": "math.factorial",
            "parameters": {
                "type": "dict",
                "properties": {"number": {"type": "integer"}},
                "required": [],
            },
        }
    ]
    gt_opt = [{"math.factorial": {"number": [5, ""], "extra": ["", 1]}}]
    assert (
        bfcl_check(call_block("math.factorial", {"extra": 1}), gt_opt, doc)["reason"]
        == "unknown_argument:extra"
    )
    # no doc: the ground truth decides
    assert bfcl_correct(call_block("math.factorial", {"extra": 1}), gt_opt)


def test_order_free_matching_finds_a_full_matching():
    """Each ground-truth call gets its own output call. BFCL matches greedily in ground-truth order
    and would give the first call (x in {a, b}) the output x=a, leaving x=b for the second (x in
    {a}) and failing.
    """
    gt = [{"f": {"x": ["a", "b"]}}, {"f": {"x": ["a"]}}]
    out = call_block("f", {"x": "a"}) + call_block("f", {"x": "b"})
    assert bfcl_correct(out, gt)
    assert bfcl_correct(call_block("f", {"x": "b"}) + call_block("f", {"x": "a"}), gt)
    assert bfcl_check(call_block("f", {"x": "b"}) * 2, gt)["reason"] == "wrong_value:x"
    gt3 = [{"f": {"x": ["a"]}}, {"g": {"y": [1]}}]
    assert (
        bfcl_check(call_block("g", {"y": 1}) + call_block("h", {"x": "a"}), gt3)["reason"]
        == "wrong_name"
    )


def test_empty_ground_truth_wants_no_call():
    assert bfcl_check("I cannot help with that.", []) == {
        "correct": True,
        "reason": None,
        "calls": None,
    }
    assert bfcl_check(call_block("f", {}), [])["reason"] == "unexpected_call"
    with pytest.raises(ValueError):
        bfcl_check("x", [{"f": {"a": 1}}])  # accepted values must be lists
    with pytest.raises(ValueError):
        bfcl_check("x", {"f": {"a": [1]}})


# -- on the committed sample of real BFCL rows (no data folder needed) --


def test_fixture_sample_rules():
    rows = {rid: (fns, gt) for rid, fns, gt in load_fixture_rows()}
    fns, gt = rows["parallel_0"]
    assert bfcl_correct(render(gt, "first", order=[1, 0]), gt, fns)  # reordered
    assert (
        bfcl_check(render(gt, "first")[: render(gt, "first").index("\n<tool_call>")], gt, fns)[
            "reason"
        ]
        == "wrong_count"
    )
    fns, gt = rows["simple_python_83"]  # tuple-typed coordinates, written as a Python tuple
    assert bfcl_correct(
        "<tool_call>{'name': 'calculate_distance', 'arguments': {'coord1': (33.4484, -112.074), "
        "'coord2': (34.0522, -118.2437), 'unit': 'miles'}}</tool_call>",
        gt,
        fns,
    )
    # "dontcare" listed for an integer parameter: compared as is
    fns, gt = rows["live_multiple_306-131-5"]
    ((name, args),) = gt[0].items()
    rendered = render_args(args, "first")
    assert rendered["number_of_rooms"] == "dontcare" and bfcl_correct(
        call_block(name, rendered), gt, fns
    )
    assert not bfcl_correct(call_block(name, {**rendered, "number_of_rooms": "DontCare"}), gt, fns)
    assert not bfcl_correct(call_block(name, {**rendered, "number_of_rooms": 1}), gt, fns)
    # doc-required origin_airport whose only accepted value is ""
    fns, gt = rows["live_multiple_507-149-4"]
    ((name, args),) = gt[0].items()
    rendered = render_args(args, "first")
    assert (
        bfcl_check(call_block(name, rendered), gt, fns)["reason"]
        == "missing_required:origin_airport"
    )
    assert bfcl_correct(call_block(name, {**rendered, "origin_airport": ""}), gt, fns)
    assert bfcl_correct(call_block(name, rendered), gt)
    fns, gt = rows["live_multiple_23-5-0"]  # None among the accepted values
    ((name, args),) = gt[0].items()
    assert args["price_max"] == ["", None]
    assert bfcl_correct(
        call_block(name, {**render_args(args, "first"), "price_max": None}), gt, fns
    )
    # float parameter, ground truth [0] in its last call: 0 and 0.0 both pass
    fns, gt = rows["parallel_84"]
    assert gt[-1]["calculate_displacement"]["acceleration"] == [0]
    calls = [(n, render_args(a, "first")) for c in gt for n, a in c.items()]
    for v in (0, 0.0, 0.5):
        calls[-1][1]["acceleration"] = v
        assert bfcl_correct("\n".join(call_block(*c) for c in calls), gt, fns) == (v == 0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("docs", [True, False])
def test_fixture_sample_sweep(mode, docs):
    rows = load_fixture_rows()
    failed, predicted = sweep(rows, mode, docs)
    assert failed == set(predicted), f"fails {sorted(failed)}, predicted {predicted}"
    # its ground truth accepts nothing for five required arguments
    assert "live_simple_112-68-0" in failed
    assert ("live_multiple_507-149-4" in failed) == docs
    assert ("parallel_multiple_26" in failed) == (docs and mode == "first")
    assert len(failed) < len(rows) // 3


@pytest.mark.parametrize("docs", [True, False])
def test_fixture_sample_mutations_fail(docs):
    n, problems = mutation_sweep(load_fixture_rows(), docs)
    assert n > 50 and not problems, problems[:10]


# -- on the real BFCL v4 files ($MINROUTE_DATA/bfcl-v4) --


def test_real_positive_cases(bfcl_data):
    _, fns, gt = real_row(bfcl_data, "parallel_3")  # an alternative accepted value
    alt = [
        (n, {**render_args(a, "first"), "protein_name": a["protein_name"][-1]})
        for c in gt
        for n, a in c.items()
    ]
    assert gt[0]["protein_info.get_sequence_and_3D"]["protein_name"] == ["human HbA1c", "HbA1c"]
    assert bfcl_correct("\n".join(call_block(*c) for c in alt), gt, fns)
    _, fns, gt = real_row(bfcl_data, "simple_python_0")  # optional unit left out
    assert gt[0]["calculate_triangle_area"]["unit"] == ["units", ""]
    assert bfcl_correct(call_block("calculate_triangle_area", {"base": 10, "height": 5}), gt, fns)
    assert bfcl_correct(
        call_block("calculate_triangle_area", {"base": 10, "height": 5, "unit": "Units"}), gt, fns
    )
    for rid in (
        "parallel_0",
        "parallel_1",
        "parallel_multiple_0",
    ):  # parallel calls in reverse order
        _, fns, gt = real_row(bfcl_data, rid)
        assert len(gt) > 1 and bfcl_correct(
            render(gt, "first", order=list(range(len(gt)))[::-1]), gt, fns
        ), rid
    # overlapping ground-truth calls: call 0 also takes Apple
    _, fns, gt = real_row(bfcl_data, "parallel_178")
    assert gt[0]["get_stock_price"]["company_name"] == ["Microsoft", "Apple"]
    assert gt[2]["get_stock_price"]["company_name"] == ["Apple"]
    # Apple/Jan first: BFCL's greedy pass gives it to ground-truth call 0 and then finds none for
    # call 2
    assert bfcl_correct(render(gt, "first", order=[2, 0, 1, 3]), gt, fns)
    _, fns, gt = real_row(bfcl_data, "live_multiple_122-46-1")  # ints for float parameters
    ((name, args),) = gt[0].items()
    assert (
        args["ego_velocity"] == [50.0]
        and fns[[f["name"] for f in fns].index(name)]["parameters"]["properties"]["ego_velocity"][
            "type"
        ]
        == "float"
    )
    ints = {
        k: int(v) if type(v) is float and v == int(v) else v
        for k, v in render_args(args, "first").items()
    }
    assert ints["ego_velocity"] == 50 and type(ints["ego_velocity"]) is int
    assert bfcl_correct(call_block(name, ints), gt, fns)
    _, fns, gt = real_row(bfcl_data, "parallel_0")  # BFCL's string standardisation
    assert gt[0]["spotify.play"]["artist"] == ["Taylor Swift"]
    for artist in ("taylor swift", "TAYLOR-SWIFT", "Taylor_Swift", " Taylor  Swift."):
        out = call_block("spotify.play", {"artist": artist, "duration": 20}) + call_block(
            "spotify.play", {"artist": "maroon5", "duration": 15}
        )
        assert bfcl_correct(out, gt, fns), artist
    out = call_block("spotify.play", {"artist": "Taylor Swift!", "duration": 20}) + call_block(
        "spotify.play", {"artist": "Maroon 5", "duration": 15}
    )
    assert not bfcl_correct(out, gt, fns)


def test_real_negative_cases(bfcl_data):
    _, fns, gt = real_row(bfcl_data, "simple_python_0")
    name = "calculate_triangle_area"
    good = {"base": 10, "height": 5}
    assert bfcl_correct(call_block(name, good), gt, fns)
    cases = {
        "wrong_value:base": call_block(name, {**good, "base": 11}),
        "missing_required:height": call_block(name, {"base": 10}),
        "unknown_argument:colour": call_block(name, {**good, "colour": "red"}),
        "wrong_name": call_block("calculate_square_area", good),
        "wrong_count": call_block(name, good) * 2,
        "wrong_type:base": call_block(name, {**good, "base": "10"}),
    }
    for reason, out in cases.items():
        for d in (fns, None):
            got = bfcl_check(out, gt, d)["reason"]
            assert got == reason, (reason, got, d is None)
    _, fns, gt = real_row(bfcl_data, "parallel_0")
    full = render(gt, "first")
    assert bfcl_correct(full, gt, fns)
    # a missing call
    assert bfcl_check(full.split("\n<tool_call>")[0], gt, fns)["reason"] == "wrong_count"
    assert (
        bfcl_check(full + "\n" + full.split("\n<tool_call>")[0], gt, fns)["reason"] == "wrong_count"
    )  # extra
    swapped = full.replace('"duration": 20', '"duration": 15', 1)
    assert bfcl_check(swapped, gt, fns)["reason"] == "wrong_value:duration"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("docs", [True, False])
def test_real_ground_truths_rendered_pass(bfcl_data, mode, docs):
    """Every row's ground truth, rendered as a model output, passes, except rows that BFCL's own
    rules make impossible (read off the data: no accepted value, or an argument the doc lacks /
    requires)."""
    per_cat, all_failed, all_predicted = {}, set(), {}
    for cat, rows in bfcl_data.items():
        failed, predicted = sweep(rows, mode, docs)
        per_cat[cat] = (len(rows), len(rows) - len(failed))
        all_failed |= failed
        all_predicted.update(predicted)
    total = sum(n for n, _ in per_cat.values())
    msg = (
        f"mode={mode} docs={docs}: {total} rows, passed per category {per_cat}; impossible"
        f" {all_predicted}"
    )
    assert all_failed == set(all_predicted), msg + f"; failed {sorted(all_failed)}"
    assert total >= 2000 and len(all_failed) <= 20, msg
    print(msg)


@pytest.mark.parametrize("docs", [True, False])
def test_real_ground_truths_one_value_off_fail(bfcl_data, docs):
    n, problems = 0, []
    for rows in bfcl_data.values():
        k, p = mutation_sweep(rows, docs)
        n, problems = n + k, problems + p
    assert n > 5000 and not problems, (
        f"{len(problems)} of {n} changed arguments still pass: {problems[:10]}"
    )
    print(f"docs={docs}: {n} single-argument changes, all rejected")
