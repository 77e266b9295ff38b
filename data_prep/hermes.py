"""NousResearch/hermes-function-calling-v1 (Apache-2.0): ShareGPT-style rows with tools as Python
reprs.

A row: {"id", "conversations": [{"from": "system"|"human"|"gpt"|"tool", "value": str}], "category",
...}.
- system: Hermes' instructions with the tool list inside <tools>...</tools> as a Python repr (or
  JSON) of a list of {"type": "function", "function": {...}}. The tools become the chat's `tools`;
  Hermes' prose is dropped because Qwen's template writes its own tool instructions around them
  (docs/reference.md §7).
- gpt: text and/or <tool_call>\\n{'arguments': {...}, 'name': '...'}\\n</tool_call> blocks (reprs)
  -> an assistant message with structured tool_calls.
- tool: <tool_response>\\n{...}\\n</tool_response> blocks -> tool messages. Singleturn rows (the
  default config, func-calling-singleturn.json) end at the gpt tool call.
"""

from __future__ import annotations

import re

from .records import TOOL, Malformed, Sample, parse_literal, require, tool_call

REPO = "NousResearch/hermes-function-calling-v1"
REVISION = "dae3e1d28cfbcf4b915c04ea1e072030529b4bda"
FILE = "func-calling-singleturn.json"
HELDOUT_FILE = "func-calling.json"  # multi-turn rows: the held-out tool eval prompts come from here
ROLES = {"system": "system", "human": "user", "gpt": "assistant", "tool": "tool"}

TOOLS_RE = re.compile(r"<tools>(.*?)</tools>", re.S)
CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
RESPONSE_RE = re.compile(r"<tool_response>(.*?)</tool_response>", re.S)


def parse_tools(system: str) -> list[dict]:
    # Hermes' prose itself says "within <tools> </tools> XML tags": take the first non-empty block
    body = next((b.strip() for b in TOOLS_RE.findall(system) if b.strip()), "")
    if not body:
        return []
    try:
        tools = parse_literal(body)
    except Malformed:
        try:  # several objects one after another, not in a list
            tools = parse_literal("[" + re.sub(r"}\s*\n\s*{", "},{", body) + "]")
        except Malformed:
            raise Malformed("bad_tool_list", body[:80]) from None
    tools = [tools] if isinstance(tools, dict) else tools
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise Malformed("bad_tool_list", "not a list of objects")
    return tools


def parse_gpt(value: str) -> dict:
    calls = []
    for block in CALL_RE.findall(value):
        try:
            calls.append(tool_call(parse_literal(block.strip())))
        except Malformed as e:
            raise Malformed("bad_tool_call", str(e)) from None
    if "<tool_call>" in value and len(calls) != value.count("<tool_call>"):
        raise Malformed("bad_tool_call", "unclosed <tool_call>")
    text = CALL_RE.sub("", value).strip()
    msg = {"role": "assistant", "content": text}
    if calls:
        msg["tool_calls"] = calls
    return msg


def to_sample(record, row: int, source: str = "hermes") -> Sample:
    conv = require(record, "conversations", list)
    if not conv:
        raise Malformed("empty_conversation")
    tools, messages = [], []
    for turn in conv:
        role = ROLES.get(require(turn, "from", str))
        value = require(turn, "value", str)
        if role is None:
            raise Malformed("unknown_role", turn["from"])
        if role == "system":
            tools = parse_tools(value)
        elif role == "assistant":
            messages.append(parse_gpt(value))
        elif role == "tool":
            responses = RESPONSE_RE.findall(value) or [value]
            messages += [{"role": "tool", "content": r.strip()} for r in responses]
        else:
            messages.append({"role": "user", "content": value})
    if not messages or messages[0]["role"] != "user":
        raise Malformed("bad_turn_order", "does not start with a human turn")
    if not any(m["role"] == "assistant" for m in messages):
        raise Malformed("no_assistant_turn")
    meta = {
        k: record.get(k)
        for k in ("id", "category", "subcategory", "task")
        if isinstance(record.get(k), str)
    }
    return Sample(messages, tools, TOOL, source, row, meta)


def first_call_prefix(sample: Sample) -> Sample:
    """The prompt up to and including the first assistant turn that calls a tool (for held-out
    eval)."""
    for i, m in enumerate(sample.messages):
        if m["role"] == "assistant" and m.get("tool_calls"):
            return Sample(
                sample.messages[: i + 1],
                sample.tools,
                sample.step_type,
                sample.source,
                sample.row,
                sample.meta,
            )
    raise Malformed("no_tool_call")
