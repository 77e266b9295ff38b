"""glaiveai/glaive-function-calling-v2 (Apache-2.0): a `system` string with the function definitions
and a `chat` string of USER / ASSISTANT / FUNCTION RESPONSE turns.

- system: "SYSTEM: You are a helpful assistant with access to the following functions. Use them if
  required -" followed by zero or more 4-space-indented JSON objects, one after another. Each
  becomes a tool {"type": "function", "function": {...}} (the authors' loader dropped them).
- chat: turns separated by blank lines, each starting with its marker. Assistant turns end with the
  literal " <|endoftext|>" (token 151643 in Qwen), which is removed. A call is `<functioncall>
  {"name": "...", "arguments": '{...}'}` whose arguments are a single-quoted JSON string, so the
  call as a whole is a Python literal, not JSON: it becomes a structured tool call.
"""

from __future__ import annotations

import json
import re

from .records import TOOL, Malformed, Sample, parse_literal, require, tool_call

REPO = "glaiveai/glaive-function-calling-v2"
REVISION = "e7f4b6456019f5d8bcb991ef0dd67d8ff23221ac"
FILE = "glaive-function-calling-v2.json"

TURN_RE = re.compile(r"(?:^|\n+)[ \t]*(USER|ASSISTANT|FUNCTION RESPONSE):[ \t]?")
ARGS_RE = re.compile(r"""["']arguments["']\s*:\s*'(.*)'\s*}\s*$""", re.S)


def parse_functions(system: str) -> list[dict]:
    """Every JSON object after the first '{' of the system string, decoded one after another."""
    start = system.find("{")
    tools, decoder = [], json.JSONDecoder()
    while start != -1:
        try:
            obj, end = decoder.raw_decode(system, start)
        except json.JSONDecodeError as e:
            raise Malformed("bad_tool_list", str(e)) from None
        if not isinstance(obj, dict) or "name" not in obj:
            raise Malformed("bad_tool_list", "function without a name")
        tools.append({"type": "function", "function": obj})
        start = system.find("{", end)
    return tools


def parse_call(text: str) -> dict:
    """`{"name": "f", "arguments": '{"a": 1}'}` -> {"name": "f", "arguments": {"a": 1}}."""
    text = text.strip()
    try:
        return tool_call(parse_literal(text))
    except Malformed:
        pass
    name = re.search(r"""["']name["']\s*:\s*["']([^"']+)["']""", text)
    args = ARGS_RE.search(text)  # arguments string holding a quote that breaks the literal
    if not name or not args:
        raise Malformed("bad_tool_call", text[:80])
    return tool_call({"name": name.group(1), "arguments": args.group(1)})


def to_sample(record, row: int, source: str = "glaive") -> Sample:
    system = require(record, "system", str)
    chat = require(record, "chat", str)
    tools = parse_functions(system)
    parts = TURN_RE.split(chat)
    if len(parts) < 3:
        raise Malformed("empty_conversation")
    if parts[0].strip():
        raise Malformed("bad_turn_order", "text before the first turn marker")
    messages = []
    for marker, content in zip(parts[1::2], parts[2::2]):
        content = content.replace("<|endoftext|>", "").strip()
        if marker == "USER":
            messages.append({"role": "user", "content": content})
        elif marker == "FUNCTION RESPONSE":
            messages.append({"role": "tool", "content": content})
        elif "<functioncall>" in content:
            before, _, call = content.partition("<functioncall>")
            messages.append(
                {"role": "assistant", "content": before.strip(), "tool_calls": [parse_call(call)]}
            )
        else:
            messages.append({"role": "assistant", "content": content})
    if messages[0]["role"] != "user":
        raise Malformed("bad_turn_order", "does not start with USER")
    if not any(m["role"] == "assistant" for m in messages):
        raise Malformed("no_assistant_turn")
    return Sample(messages, tools, TOOL, source, row)
