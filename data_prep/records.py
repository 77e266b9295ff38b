"""What every source parser shares: the sample type, the malformed-record error, tolerant JSON
readers."""

from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from minroute.run.safety import MissingFile, UserError

TOOL, PLANNING = "tool_call", "planning"


class Malformed(ValueError):
    """A record that cannot become a sample; `reason` is the manifest's counter name."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class Sample:
    messages: list[dict]
    tools: list[dict]
    step_type: str  # TOOL or PLANNING
    source: str
    row: int  # index of the record in its source file
    meta: dict = field(default_factory=dict)

    def content_hash(self) -> str:
        """sha256 of the conversation (messages + tools), the identity used to keep eval out of
        training."""
        blob = json.dumps([self.messages, self.tools], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def prompt_hash(self) -> str:
        """sha256 of the first user message: the same question is the same prompt, whatever answer
        or tools come with it (held-out rows are refused by this, not only by the whole
        conversation)."""
        first = next((m["content"] for m in self.messages if m["role"] == "user"), "")
        return hashlib.sha256(first.encode("utf-8", errors="surrogatepass")).hexdigest()


def first_response(sample: Sample) -> Sample:
    """The row cut after its routed response, so that one routing decision covers one response: a
    tool row ends at its first assistant turn that calls a tool (a row without a call at its first
    assistant turn). Returns the sample itself when nothing follows that turn."""
    turns = [i for i, m in enumerate(sample.messages) if m["role"] == "assistant"]
    calls = [i for i in turns if sample.messages[i].get("tool_calls")]
    end = (calls or turns or [len(sample.messages) - 1])[0] + 1
    if end >= len(sample.messages):
        return sample
    return Sample(
        sample.messages[:end],
        sample.tools,
        sample.step_type,
        sample.source,
        sample.row,
        {**sample.meta, "cut_at_first_response": True},
    )


def json_like(x, depth: int = 0) -> bool:
    """True if x is made of what JSON holds (dict with str keys, list, str, int, float, bool, None),
    at most 64 levels deep: a Python literal may also hold sets, tuples, bytes or complex numbers,
    which no chat can.
    """
    if depth > 64:
        return False
    if isinstance(x, dict):
        return all(isinstance(k, str) and json_like(v, depth + 1) for k, v in x.items())
    if isinstance(x, list):
        return all(json_like(v, depth + 1) for v in x)
    return x is None or isinstance(x, (str, int, float, bool))


def parse_literal(text: str):
    """JSON first, then a Python literal (Hermes writes reprs: single quotes, True/None). Never
    eval. What parses to something JSON cannot hold (a set, bytes, nesting past 64 levels) is
    `bad_literal`."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise Malformed("bad_literal", text[:80]) from None
    if not json_like(value):
        raise Malformed("bad_literal", f"not JSON data: {text[:60]}")
    return value


def has_bad_utf8(x) -> bool:
    """True if a decoded value holds surrogate escapes, i.e. its bytes were not valid UTF-8."""
    if isinstance(x, str):
        return any("\udc80" <= ch <= "\udcff" for ch in x)
    if isinstance(x, dict):
        return any(has_bad_utf8(k) or has_bad_utf8(v) for k, v in x.items())
    if isinstance(x, list):
        return any(has_bad_utf8(v) for v in x)
    return False


def read_json_records(path: Path, source: str) -> list:
    """A JSON array or JSON lines. Returns a list whose items are records, or Malformed for a bad
    line.

    Invalid UTF-8 is decoded with surrogate escapes so one bad record does not sink the file; such
    records are reported as `invalid_utf8`. A file that is neither is an error naming the source.
    """
    try:
        text = (
            Path(path).read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
        )  # a BOM
    except OSError as e:
        raise MissingFile(f"{source}: cannot read {path} ({e.strerror})") from e
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(stripped)
        except (json.JSONDecodeError, RecursionError) as e:
            raise UserError(
                f"{source}: {path} starts like a JSON array but does not parse ({e});"
                " re-download it"
            ) from e
        if not isinstance(rows, list):
            raise UserError(f"{source}: {path} is not a JSON array of records; re-download it")
    else:
        rows = []
        for line in text.split("\n"):  # not splitlines(): U+2028 may sit inside a JSON string
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except (json.JSONDecodeError, RecursionError):
                rows.append(Malformed("not_json", line[:80]))
        if rows and all(isinstance(r, Malformed) for r in rows):
            raise UserError(
                f"{source}: {path} is neither a JSON array nor JSON lines; re-download it"
            )
    return [Malformed("invalid_utf8") if has_bad_utf8(r) else r for r in rows]


def require(record, name: str, kind: type):
    """record[name] of type kind, or Malformed('missing_field' | 'wrong_type')."""
    if not isinstance(record, dict):
        raise Malformed("wrong_type", f"record is {type(record).__name__}, not an object")
    if name not in record or record[name] is None:
        raise Malformed("missing_field", name)
    value = record[name]
    if not isinstance(value, kind):
        raise Malformed("wrong_type", f"{name} is {type(value).__name__}")
    return value


def tool_call(obj) -> dict:
    """A parsed call {'name': str, 'arguments': dict}; string arguments are parsed as JSON /
    literal."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise Malformed("bad_tool_call", "no name")
    args = obj.get("arguments", {})
    if isinstance(args, str):
        try:
            args = parse_literal(args) if args.strip() else {}
        except Malformed:
            raise Malformed("bad_tool_call", "arguments not JSON") from None
    if not isinstance(args, dict):
        raise Malformed("bad_tool_call", "arguments not an object")
    return {"name": obj["name"], "arguments": args}
