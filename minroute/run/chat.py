"""ChatML chat rendering (Qwen2.5's, with tools; SmolLM2's), without Jinja or transformers, and
tokenisation with a loss mask.

Messages are dicts: {"role": "system"|"user"|"assistant"|"tool", "content": str}, an assistant
message may carry "tool_calls": [{"name": str, "arguments": dict}]. Tools are JSON schemas, usually
{"type": "function", "function": {"name", "description", "parameters"}}. The output is character for
character what `tokenizer.apply_chat_template(messages, tools=tools)` gives with the template in
Qwen's tokenizer_config.json (docs/reference.md §7; tests/test_chat.py checks it):

- system turn: the first message's content if it is a system message, else the model's default
  system prompt (`ChatFormat.default_system`, read from its own chat template; Qwen2.5:
  DEFAULT_SYSTEM); with tools, followed by the "# Tools" block listing each tool as json.dumps(tool,
  ensure_ascii=False);
- user / later system / assistant without calls: <|im_start|>{role}\\n{content}<|im_end|>\\n;
- assistant with calls: <|im_start|>assistant (+ \\n content if any) + per call
  \\n<tool_call>\\n{"name": "NAME", "arguments": {json}}\\n</tool_call>, then <|im_end|>\\n;
- consecutive tool results: one user turn of \\n<tool_response>\\n{content}\\n</tool_response>
  blocks.

A model whose template has no tool section (SmolLM2's renders only role and content, and would drop
the calls) still gets tool rows in exactly this format: the tool-call data and the scorer (tasks.py)
speak it, and one fixed format is what LoRA can learn; its special tokens are then ordinary text for
that tokenizer. Templates that are not ChatML (no <|im_start|>) are refused by
`ChatFormat.from_template`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

from minroute.run.safety import UserError

DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
TOOLS_HEADER = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    'within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, '
    '"arguments": <args-json-object>}\n</tool_call>'
)
ASSISTANT_HEADER = "<|im_start|>assistant\n"
# a literal default system turn inside a Jinja template: '<|im_start|>system\n...<|im_end|>', the
# newline written as a real newline or as the escape \n, the text free of Jinja code and of
# unescaped quotes
_DEFAULT_SYSTEM_RE = re.compile(r"<\|im_start\|>system(?:\\n|\n)((?:[^{}<'\\]|\\.)*?)<\|im_end\|>")


@dataclass(frozen=True)
class ChatFormat:
    """What the renderer takes from a model's own chat template: the system prompt it adds when a
    chat has none (None: it adds no system turn), whether the template itself has a tool section,
    and whether it is ChatML at all (rendering refuses one that is not, naming `source`)."""

    default_system: str | None = DEFAULT_SYSTEM
    template_has_tools: bool = True
    chatml: bool = True
    source: str = "Qwen2.5's chat template"

    @classmethod
    def from_template(
        cls, template: str | None, source: str = "tokenizer_config.json"
    ) -> ChatFormat:
        """Read a ChatML Jinja template (tokenizer_config.json's `chat_template`); None = no
        template: plain ChatML, no default system prompt."""
        if template is None:
            return cls(
                default_system=None, template_has_tools=False, source=f"{source} (no chat template)"
            )
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next(
                (
                    t.get("template")
                    for t in template
                    if isinstance(t, dict) and t.get("name") == "default"
                ),
                None,
            )
        if not isinstance(template, str):
            raise UserError(f"{source}: field 'chat_template' is not a string")
        if "<|im_start|>" not in template:
            return cls(default_system=None, template_has_tools=False, chatml=False, source=source)
        m = _DEFAULT_SYSTEM_RE.search(template)
        default = None
        if m:
            default = re.sub(
                r"\\(.)", lambda e: {"n": "\n", "t": "\t"}.get(e.group(1), e.group(1)), m.group(1)
            )
        return cls(default_system=default, template_has_tools="tools" in template, source=source)


def to_json(x) -> str:
    """transformers' Jinja `tojson`: json.dumps with ensure_ascii=False and default separators."""
    return json.dumps(x, ensure_ascii=False)


def render_segments(
    messages: list[dict],
    tools: list[dict] | None = None,
    add_generation_prompt: bool = False,
    fmt: ChatFormat = ChatFormat(),
) -> list[tuple[str, bool]]:
    """The rendered text as (piece, is_assistant_output) pieces; joined they are the template's
    text.

    An assistant output spans from after `<|im_start|>assistant\\n` through its `<|im_end|>`: what
    the model writes after the generation prompt.
    """
    if not fmt.chatml:
        raise UserError(
            f"{fmt.source}: the model's chat template is not ChatML (no <|im_start|>); minroute"
            " renders ChatML chats only (Qwen2.5, SmolLM2, ...)"
        )
    out: list[tuple[str, bool]] = []
    first_is_system = bool(messages) and messages[0]["role"] == "system"
    system = messages[0]["content"] if first_is_system else fmt.default_system
    if tools:
        header = (system + TOOLS_HEADER) if system is not None else TOOLS_HEADER.lstrip("\n")
        out.append(
            (
                "<|im_start|>system\n"
                + header
                + "".join("\n" + to_json(t) for t in tools)
                + TOOLS_FOOTER
                + "<|im_end|>\n",
                False,
            )
        )
    elif system is not None:
        out.append(("<|im_start|>system\n" + system + "<|im_end|>\n", False))
    for i, m in enumerate(messages):
        role, content = m["role"], m.get("content") or ""
        if i == 0 and role == "system":
            continue
        if role in ("user", "system") or (role == "assistant" and not m.get("tool_calls")):
            if role == "assistant":
                out += [(ASSISTANT_HEADER, False), (content + "<|im_end|>", True), ("\n", False)]
            else:
                out.append((f"<|im_start|>{role}\n{content}<|im_end|>\n", False))
        elif role == "assistant":
            body = ("\n" + content) if content else ""
            for call in m["tool_calls"]:
                call = call.get("function", call)
                body += (
                    '\n<tool_call>\n{"name": "'
                    + call["name"]
                    + '", "arguments": '
                    + to_json(call["arguments"])
                    + "}\n</tool_call>"
                )
            # body starts with "\n": the header's newline, then the output
            out += [(ASSISTANT_HEADER, False), (body[1:] + "<|im_end|>", True), ("\n", False)]
        elif role == "tool":
            prev_tool = i > 0 and messages[i - 1]["role"] == "tool"
            next_tool = i + 1 < len(messages) and messages[i + 1]["role"] == "tool"
            text = (
                ("" if prev_tool else "<|im_start|>user")
                + "\n<tool_response>\n"
                + content
                + "\n</tool_response>"
            )
            out.append((text + ("" if next_tool else "<|im_end|>\n"), False))
        else:
            raise ValueError(f"message {i}: unknown role {role!r}")
    if add_generation_prompt:
        out.append((ASSISTANT_HEADER, False))
    return out


def render(
    messages: list[dict],
    tools: list[dict] | None = None,
    add_generation_prompt: bool = False,
    fmt: ChatFormat = ChatFormat(),
) -> str:
    return "".join(
        piece for piece, _ in render_segments(messages, tools, add_generation_prompt, fmt)
    )


@dataclass
class Encoded:
    ids: np.ndarray  # (n,) int64 token ids, n <= max_len
    loss_mask: np.ndarray  # (n,) uint8: 1 = this token is a prediction target
    n_full: int  # tokens before truncation
    truncated: bool
    tool_call_cut: bool  # truncation removed (part of) the last </tool_call>
    # truncation removed (part of) the last assistant output: the routed response
    response_cut: bool
    prompt_len: int  # tokens up to and including the last assistant header (the generation prompt)
    assistant_mask: np.ndarray  # (n,) uint8: 1 = the token starts inside an assistant output span


def encode_chat(
    tokenizer,
    messages: list[dict],
    tools: list[dict] | None = None,
    max_len: int = 512,
    loss_on: str = "all",
    fmt: ChatFormat = ChatFormat(),
) -> Encoded:
    """Render, tokenise (one `encode` of the whole text, as HF does) and build the loss mask.

    loss_on 'all': every real token (the authors' choice: system, tools, user and assistant alike);
    'assistant': only tokens that start inside an assistant output span (see render_segments).
    """
    if loss_on not in ("all", "assistant"):
        raise ValueError(f"loss_on {loss_on!r}: expected 'all' or 'assistant'")
    segments = render_segments(messages, tools, fmt=fmt)
    text = "".join(p for p, _ in segments)
    enc = tokenizer.encode(text, add_special_tokens=False)
    ids = np.asarray(enc.ids, dtype=np.int64)
    starts = np.asarray([s for s, _ in enc.offsets], dtype=np.int64)
    spans, pos = [], 0
    for piece, is_out in segments:
        if is_out:
            spans.append((pos, pos + len(piece)))
        pos += len(piece)
    in_output = np.zeros(len(ids), dtype=bool)
    for a, b in spans:
        in_output |= (starts >= a) & (starts < b)
    mask = np.ones(len(ids), dtype=np.uint8) if loss_on == "all" else in_output.astype(np.uint8)
    last_out = spans[-1][0] if spans else len(text)
    prompt_len = int((starts < last_out).sum())
    n_full = len(ids)
    truncated = n_full > max_len
    cut = response_cut = False
    if truncated:
        end = text.rfind("</tool_call>")
        kept_end = enc.offsets[max_len - 1][1]
        cut = end >= 0 and kept_end < end + len("</tool_call>")
        response_cut = bool(spans) and kept_end < spans[-1][1]
        ids, mask, in_output = ids[:max_len], mask[:max_len], in_output[:max_len]
    return Encoded(
        ids,
        mask,
        n_full,
        truncated,
        cut,
        response_cut,
        min(prompt_len, len(ids)),
        in_output.astype(np.uint8),
    )
