"""Chat rendering equals transformers' apply_chat_template with Qwen's own template; loss masks."""

from pathlib import Path

import numpy as np
import pytest

from minroute.run.chat import DEFAULT_SYSTEM, encode_chat, render

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city — in °C",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIP = {
    "type": "function",
    "function": {
        "name": "calculate_tip",
        "description": "Tip",
        "parameters": {"type": "object", "properties": {"bill": {"type": "number"}}},
    },
}

CONVERSATIONS = {
    "plain": (
        [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
        None,
    ),
    "system": (
        [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
        ],
        None,
    ),
    "tools-call": (
        [
            {"role": "user", "content": "Weather in Zürich?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "°C"}}
                ],
            },
        ],
        [WEATHER, TIP],
    ),
    "tools-system-multi": (
        [
            {"role": "system", "content": "You call tools."},
            {"role": "user", "content": "Weather in Paris and a tip on 50?"},
            {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [
                    {"name": "get_weather", "arguments": {"city": "Paris"}},
                    {
                        "name": "calculate_tip",
                        "arguments": {"bill": 50, "pct": [10, 15], "ok": True},
                    },
                ],
            },
            {"role": "tool", "content": '{"temp": 21}'},
            {"role": "tool", "content": '{"tip": 7.5}'},
            {"role": "assistant", "content": "21 degrees; tip 7.5."},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "You're welcome!"},
        ],
        [WEATHER, TIP],
    ),
    "tools-no-call": (
        [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"}],
        [TIP],
    ),
}


@pytest.fixture(scope="module")
def hf_tokenizer(real_tokenizer_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(Path(real_tokenizer_path).parent))


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("gen", [False, True])
def test_render_equals_apply_chat_template(hf_tokenizer, name, gen):
    messages, tools = CONVERSATIONS[name]
    if gen:
        messages = messages[:-1]
    ref = hf_tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=gen
    )
    assert render(messages, tools, add_generation_prompt=gen) == ref


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_token_ids_equal_apply_chat_template(hf_tokenizer, real_tokenizer_path, name):
    from minroute import load_tokenizer

    messages, tools = CONVERSATIONS[name]
    ref = hf_tokenizer.apply_chat_template(messages, tools=tools, tokenize=True)
    ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
    enc = encode_chat(load_tokenizer(real_tokenizer_path).tokenizer, messages, tools, max_len=4096)
    assert enc.ids.tolist() == list(ref)


def test_render_without_transformers_known_text():
    """A golden string (docs/reference.md §7), independent of transformers."""
    text = render(
        [
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"name": "f", "arguments": {"x": 1}}],
            },
        ],
        tools=[{"name": "f"}],
    )
    assert text == (
        "<|im_start|>system\n"
        + DEFAULT_SYSTEM
        + "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou"
        " are provided with function signatures within <tools></tools> XML"
        ' tags:\n<tools>\n{"name": "f"}\n</tools>\n\nFor each function call, return a json object'
        " with function name and arguments within <tool_call></tool_call> XML"
        ' tags:\n<tool_call>\n{"name": <function-name>, "arguments":'
        " <args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name":'
        ' "f", "arguments": {"x": 1}}\n</tool_call><|im_end|>\n'
    )


def test_loss_mask_assistant_only_covers_exactly_the_outputs(real_tokenizer_path):
    from minroute import load_tokenizer

    tok = load_tokenizer(real_tokenizer_path).tokenizer
    messages, tools = CONVERSATIONS["tools-system-multi"]
    enc = encode_chat(tok, messages, tools, max_len=4096, loss_on="assistant")
    text = tok.decode(enc.ids[enc.loss_mask.astype(bool)].tolist(), skip_special_tokens=False)
    expected = (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city":'
        ' "Paris"}}\n</tool_call>\n<tool_call>\n{"name": "calculate_tip", "arguments": {"bill": 50,'
        ' "pct": [10, 15], "ok": true}}\n</tool_call><|im_end|>21 degrees; tip'
        " 7.5.<|im_end|>You're welcome!<|im_end|>"
    )
    assert text == expected
    full = encode_chat(tok, messages, tools, max_len=4096, loss_on="all")
    assert full.loss_mask.all() and len(full.ids) == len(enc.ids)
    prompt = tok.decode(enc.ids[: enc.prompt_len].tolist(), skip_special_tokens=False)
    assert prompt.endswith("Thanks<|im_end|>\n<|im_start|>assistant\n")


def test_truncation_counts_and_tool_call_cut(tiny_dir):
    from minroute import load_tokenizer

    tok = load_tokenizer(tiny_dir).tokenizer
    messages, tools = CONVERSATIONS["tools-call"]
    whole = encode_chat(tok, messages, tools, max_len=100000)
    assert not whole.truncated and not whole.tool_call_cut
    cut = encode_chat(tok, messages, tools, max_len=whole.n_full - 3)
    assert (
        cut.truncated
        and cut.tool_call_cut
        and len(cut.ids) == whole.n_full - 3
        and cut.n_full == whole.n_full
    )
    assert np.array_equal(cut.ids, whole.ids[: whole.n_full - 3])
    plain = encode_chat(tok, *CONVERSATIONS["plain"], max_len=10)
    assert plain.truncated and not plain.tool_call_cut
