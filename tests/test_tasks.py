"""Task metrics: tool-call parsing and matching, GSM8K extraction, per-method summaries, the chat command."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minroute import tasks
from minroute.tasks import gsm8k_prediction, parse_tool_calls, score_gsm8k, score_tool_call

REF = [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]


@pytest.mark.parametrize("output,expected", [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"unit": "celsius", "city": "Paris"}}\n</tool_call>',
     {"parsable": True, "name_match": True, "exact": True}),  # key order does not matter
    ('<tool_call>\n{"name": "get_stock", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
     {"parsable": True, "name_match": False, "exact": False}),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon", "unit": "celsius"}}\n</tool_call>',
     {"parsable": True, "name_match": True, "exact": False}),
    ("<tool_call>\n{'name': 'get_weather', 'arguments': {}}\n</tool_call>",
     {"parsable": False, "name_match": False, "exact": False}),  # not JSON
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa',
     {"parsable": False, "name_match": False, "exact": False}),  # truncated at the token cap
    ("The weather is nice.", {"parsable": False, "name_match": False, "exact": False}),
    ('<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\", \\"unit\\": \\"celsius\\"}"}\n</tool_call>',
     {"parsable": True, "name_match": True, "exact": True}),  # arguments as a JSON string
])
def test_tool_call_scoring(output, expected):
    assert score_tool_call(output, REF) == expected


def test_two_calls_must_match_in_order():
    ref = [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}]
    out = '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "b", "arguments": {"x": 1}}\n</tool_call>'
    assert score_tool_call(out, ref)["exact"]
    assert not score_tool_call(out, ref[::-1])["name_match"]
    assert parse_tool_calls(out + "<tool_call>oops</tool_call>") is None


@pytest.mark.parametrize("output,value,how", [
    ("3 + 2 = <<3+2=5>>5\n#### 5", 5.0, "marker"),
    ("The total is 1,200 dollars.\n#### 1,200", 1200.0, "marker"),
    ("First 12, then 7. So the answer is 19.", 19.0, "last_number"),
    ("She has -3.5 left", -3.5, "last_number"),
    ("no digits here", None, "none"),
])
def test_gsm8k_extraction(output, value, how):
    assert gsm8k_prediction(output) == (value, how)


def test_gsm8k_scoring():
    assert score_gsm8k("#### 72", "72")["correct"]
    assert score_gsm8k("so 72.0", "72") == {"correct": True, "how": "last_number"}
    assert not score_gsm8k("#### 71", "72")["correct"]


def test_run_tasks_with_forced_outputs_gives_hand_computed_values(demo_run, monkeypatch):
    """Generation replaced by fixed outputs: the summary must be the hand-computed shares."""
    from minroute.checkpoint import load_layerroute
    from minroute.data import TokenSplit
    from minroute.load import load_tokenizer
    route, meta = load_layerroute(demo_run, "latest")
    ev = TokenSplit(meta["args"]["data"], "eval")
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
    calls = iter(range(10 ** 6))
    order = list(range(len(ev)))

    def fake(route_, tokenizer, ids, max_new, eos, pad):
        i = order[next(calls) % len(ev)]
        return outputs[i], 5 if i % 2 else max_new, 0.01
    monkeypatch.setattr(tasks, "generate_one", fake)

    class A:
        max_new_tokens = 8
    table_calls = []
    res = tasks.run_tasks(route, ev, None, load_tokenizer(meta["args"]["model"]), A, "cpu", [],
                          lambda *a, **k: table_calls.append(a))
    s = res["summary"]["gated"]
    nt, npl = len(tool_rows), len(plan_rows)
    assert s["tool"]["parsable"] == pytest.approx(100 * 2 / nt)
    assert s["tool"]["name_match"] == pytest.approx(100 * 1 / nt) and s["tool"]["exact"] == pytest.approx(100 / nt)
    assert s["planning"]["accuracy"] == pytest.approx(100 * 2 / npl)
    assert s["hit_cap"] == pytest.approx(100 * np.mean([i % 2 == 0 for i in range(len(ev))]))
    assert set(res["summary"]) == {"base", "full", "gated"} and table_calls


def test_chat_command_runs_on_demo_checkpoint(demo_run, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text('[{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]')
    root = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, "-m", "minroute.generate", "--ckpt", str(demo_run), "--which", "latest",
                          "--prompt", "Weather in Paris?", "--tools", str(tools), "--max-new-tokens", "12"],
                         capture_output=True, text=True, cwd=root,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)})
    assert res.returncode == 0, res.stderr
    assert "[gates " in res.stdout and "blocks ran" in res.stdout and "tok/s]" in res.stdout


def test_chat_command_checks_tools_first_and_caps_new_tokens(demo_run, tmp_path, capsys, monkeypatch):
    import json

    import minroute.checkpoint as ck
    from minroute.generate import chat_main
    from minroute.safety import run_cli
    bad = tmp_path / "tools.json"
    bad.write_text('{"name": "not a list"}')
    monkeypatch.setattr(ck, "load_layerroute", lambda *a, **k: pytest.fail("loaded the model before --tools"))
    for content, msg in (('{"name": "x"}', "must hold a JSON list"), ("[{oops", "not valid JSON")):
        bad.write_text(content)
        assert run_cli(chat_main, ["--ckpt", str(demo_run), "--prompt", "hi", "--tools", str(bad)]) == 2
        assert msg in capsys.readouterr().err
    assert run_cli(chat_main, ["--ckpt", str(demo_run), "--prompt", "hi", "--tools", str(tmp_path / "none")]) == 2
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
    assert chat_main(["--ckpt", str(demo_run), "--model", str(small), "--prompt", "hi", "--max-new-tokens",
                      "100000"]) == 0
    out = capsys.readouterr().out
    assert "[note: --max-new-tokens 100000 capped at" in out
