"""GGUF import: tiny files written here (llama.cpp's layout, Q/K permuted as its converter does) and
the real SmolLM2-135M-Instruct GGUF (MINROUTE_GGUF, set by .ci/run; skipped without it), each
checked against transformers (the original model, and transformers' own GGUF loader), plus every
refusal by name."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from minroute import load_model, load_tokenizer
from minroute.core.model import init_weights
from minroute.run.chat import ChatFormat, render
from minroute.run.gguf import convert, unpermute_qk
from minroute.run.safety import UserError

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

REAL_GGUF = os.environ.get("MINROUTE_GGUF")
STRINGS = [
    "Hello, world!",
    " hello sir. How are you Edward?",
    "def f(x):\n    return x ** 2  # square\n",
    "Zürich, 杭州的天气怎么样？ naïve café 🙂",
    "12345 + 3.14159 = 12348.14159; 1,000,000 and 2024-12-01",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "   leading and trailing   \n\n\t",
    '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>',
    "",
]


def permute_like_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (written out here independently of
    the converter)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(
    path,
    hf_model,
    tokenizer_json: dict,
    arch="llama",
    qtype=None,
    pre="default",
    chat_template=None,
    extra_fields=(),
    extra_tensors=(),
    drop=(),
):
    """A GGUF file of a transformers model in llama.cpp's tensor layout; F32, or `qtype` for the 2-D
    weights."""
    from gguf.quants import quantize

    cfg = hf_model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    model = tokenizer_json["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    added = {t["id"]: t for t in tokenizer_json["added_tokens"]}
    tokens = [t for t, _ in vocab] + [added[i]["content"] for i in sorted(added) if i >= len(vocab)]
    types = [
        3 if i in added and added[i]["special"] else 4 if i in added else 1
        for i in range(len(tokens))
    ]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    ids = {t["content"]: t["id"] for t in tokenizer_json["added_tokens"]}
    w.add_bos_token_id(ids.get("<|endoftext|>", 0))
    w.add_eos_token_id(ids.get("<|im_end|>", 0))
    w.add_pad_token_id(ids.get("<|endoftext|>", 0))
    if chat_template:
        w.add_chat_template(chat_template)
    for key, value in extra_fields:
        (w.add_string if isinstance(value, str) else w.add_float32)(key, value)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    layer = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    state = hf_model.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight")
    for name, t in state.items():
        a = t.detach().float().numpy().copy()
        if name in names:
            g = names[name]
        else:
            _, _, n, rest = name.split(".", 3)
            key = next(k for k in layer if rest.startswith(k))
            g = f"blk.{n}.{layer[key]}{rest[len(key) :]}"
            if arch == "llama" and key == "self_attn.q_proj":
                a = permute_like_llama_cpp(a, cfg.num_attention_heads)
            if arch == "llama" and key == "self_attn.k_proj":
                a = permute_like_llama_cpp(a, cfg.num_key_value_heads)
        if g in drop:
            continue
        if qtype is not None and a.ndim == 2:
            w.add_tensor(g, quantize(a, qtype), raw_dtype=qtype)  # the byte array's shape
        else:
            w.add_tensor(g, a)
    for g, a, raw in extra_tensors:
        if raw is None:
            w.add_tensor(g, a)
        else:
            w.add_tensor(g, a, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    from minroute.run.tiny import write_tiny_checkpoint

    d = write_tiny_checkpoint(tmp_path_factory.mktemp("tok"), num_hidden_layers=1)
    return d / "tokenizer.json"


def tiny_llama(vocab, **kw):
    cfg = dict(
        hidden_size=48,
        num_attention_heads=3,
        num_key_value_heads=1,
        intermediate_size=80,
        num_hidden_layers=2,
        tie_word_embeddings=True,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100_000.0},
    )
    cfg.update(kw)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=vocab, **cfg))
    return init_weights(m, seed=1, std=0.1).eval()


def ids_and_mask(vocab, B=2, T=23):
    ids = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    return ids, mask


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {
            "tie_word_embeddings": False,
            "attention_bias": True,
            "head_dim": 24,
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
    ],
    ids=["smollm2-like", "untied-bias-head_dim"],
)
def test_tiny_llama_gguf_roundtrip_equals_the_original(tmp_path, tiny_tokenizer, kw):
    tj = json.loads(tiny_tokenizer.read_text())
    vocab = len(tj["model"]["vocab"]) + sum(
        t["id"] >= len(tj["model"]["vocab"]) for t in tj["added_tokens"]
    )
    hf = tiny_llama(vocab, **kw)
    src = write_gguf(tmp_path / "m.gguf", hf, tj)
    out = convert(src, tmp_path / "conv", log=lambda *a: None)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "conversion.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    ours = load_model(out)
    ids, mask = ids_and_mask(vocab)
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask), hf(ids, attention_mask=mask).logits
    diff = (a - b)[mask.bool()].abs().max().item()
    assert diff <= 1e-5, f"converted vs original model: max |dlogit| = {diff:.3g}"
    # transformers' GGUF loader drops llama attention biases (it loads 21 of 29)
    if not kw.get("attention_bias"):
        with torch.no_grad():
            ref = transformers.AutoModelForCausalLM.from_pretrained(
                tmp_path, gguf_file="m.gguf"
            ).eval()
            diff_gguf = (a - ref(ids, attention_mask=mask).logits)[mask.bool()].abs().max().item()
        assert diff_gguf <= 1e-5, (
            f"converted vs transformers' GGUF loader: max |dlogit| = {diff_gguf:.3g}"
        )
    ours_tok, orig = load_tokenizer(out).tokenizer, load_tokenizer(tiny_tokenizer.parent).tokenizer
    for s in STRINGS:
        assert (
            ours_tok.encode(s, add_special_tokens=False).ids
            == orig.encode(s, add_special_tokens=False).ids
        ), s
        assert ours_tok.decode(orig.encode(s).ids, skip_special_tokens=False) == orig.decode(
            orig.encode(s).ids, skip_special_tokens=False
        )


def test_quantised_gguf_dequantises_as_transformers(tmp_path, tiny_tokenizer):
    tj = json.loads(tiny_tokenizer.read_text())
    vocab = len(tj["model"]["vocab"]) + sum(
        t["id"] >= len(tj["model"]["vocab"]) for t in tj["added_tokens"]
    )
    hf = tiny_llama(
        vocab, hidden_size=64, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64
    )
    write_gguf(tmp_path / "q.gguf", hf, tj, qtype=gguf.GGMLQuantizationType.Q8_0)
    ours = load_model(convert(tmp_path / "q.gguf", tmp_path / "conv", log=lambda *a: None))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf").eval()
    ids, mask = ids_and_mask(vocab)
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask), ref(ids, attention_mask=mask).logits
        orig = hf(ids, attention_mask=mask).logits
    diff = (a - b)[mask.bool()].abs().max().item()
    assert diff <= 1e-4, f"Q8_0: converted vs transformers' GGUF loader: max |dlogit| = {diff:.3g}"
    assert (a - orig).abs().max().item() > 1e-4, (
        "a Q8_0 file should not reproduce fp32 weights exactly"
    )


def test_unpermute_inverts_llama_cpp():
    w = np.arange(6 * 8 * 5, dtype=np.float32).reshape(48, 5)
    for heads in (1, 2, 3, 6):
        assert np.array_equal(unpermute_qk(permute_like_llama_cpp(w, heads), heads), w)
    b = np.arange(48, dtype=np.float32)
    assert np.array_equal(unpermute_qk(permute_like_llama_cpp(b, 3), 3), b)


def test_qwen2_gguf_with_the_real_qwen_tokenizer(tmp_path, real_tokenizer_path):
    """A qwen2 GGUF (no Q/K permutation, q/k/v biases) with Qwen's real vocabulary and pre-tokenizer
    'qwen2': the rebuilt tokenizer equals the real tokenizer.json, and the model equals the
    original."""
    tj = json.loads(Path(real_tokenizer_path).read_text())
    cfg = transformers.Qwen2Config(
        vocab_size=151936,
        hidden_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=48,
        num_hidden_layers=2,
        tie_word_embeddings=True,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    hf = init_weights(transformers.Qwen2ForCausalLM(cfg), seed=2, std=0.1).eval()
    write_gguf(tmp_path / "qwen.gguf", hf, tj, arch="qwen2", pre="qwen2")
    out = convert(tmp_path / "qwen.gguf", tmp_path / "conv", log=lambda *a: None)
    real = load_tokenizer(real_tokenizer_path).tokenizer
    ours = load_tokenizer(out).tokenizer
    for s in STRINGS:
        assert (
            ours.encode(s, add_special_tokens=False).ids
            == real.encode(s, add_special_tokens=False).ids
        ), s
    ids, mask = ids_and_mask(1000)
    with torch.no_grad():
        diff = (load_model(out)(ids, attention_mask=mask) - hf(ids, attention_mask=mask).logits)[
            mask.bool()
        ]
    assert diff.abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------- refusals, by name


def _tiny_gguf(tmp_path, tiny_tokenizer, name="t.gguf", **kw):
    tj = json.loads(tiny_tokenizer.read_text())
    vocab = len(tj["model"]["vocab"]) + sum(
        t["id"] >= len(tj["model"]["vocab"]) for t in tj["added_tokens"]
    )
    return write_gguf(tmp_path / name, tiny_llama(vocab), tj, **kw)


@pytest.mark.parametrize(
    "kw,words",
    [
        (dict(arch="gemma"), "general.architecture"),
        (dict(pre="no-such-pre"), "tokenizer.ggml.pre"),
        (dict(extra_fields=[("llama.rope.scaling.type", "yarn")]), "llama.rope.scaling.type"),
        (
            dict(extra_tensors=[("blk.0.attn_q_norm.weight", np.ones(16, np.float32), None)]),
            "attn_q_norm",
        ),
        (dict(extra_tensors=[("rope_freqs.weight", np.ones(8, np.float32), None)]), "rope_freqs"),
        (dict(drop=("blk.1.ffn_up.weight",)), "no tensor for"),
    ],
)
def test_unconvertible_files_are_refused_by_field(tmp_path, tiny_tokenizer, kw, words):
    src = _tiny_gguf(tmp_path, tiny_tokenizer, **kw)
    with pytest.raises(UserError, match=words.replace(".", r"\.")) as e:
        convert(src, tmp_path / "out", log=lambda *a: None)
    assert str(src) in str(e.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*")), (
        "a refused file left files behind"
    )


def test_quantisation_the_reader_cannot_dequantise_is_refused(tmp_path, tiny_tokenizer):
    q8k = gguf.GGMLQuantizationType.Q8_K
    block, size = gguf.GGML_QUANT_SIZES[q8k]
    raw = (
        np.zeros((1, size * 48 // block), dtype=np.uint8)
        if 48 % block == 0
        else np.zeros((1, size), np.uint8)
    )
    src = _tiny_gguf(
        tmp_path,
        tiny_tokenizer,
        drop=("output_norm.weight",),
        extra_tensors=[("output_norm.weight", raw, q8k)],
    )
    with pytest.raises(UserError, match="output_norm.weight is stored as Q8_K"):
        convert(src, tmp_path / "out", log=lambda *a: None)


def test_sentencepiece_tokenizer_is_refused(tmp_path, tiny_tokenizer):
    src = _tiny_gguf(tmp_path, tiny_tokenizer)
    data = src.read_bytes().replace(
        b"\x04\x00\x00\x00\x00\x00\x00\x00gpt2", b"\x04\x00\x00\x00\x00\x00\x00\x00llm2"
    )
    src.write_bytes(data)  # tokenizer.ggml.model: 'gpt2' -> 'llm2' (same length)
    with pytest.raises(UserError, match="tokenizer.ggml.model"):
        convert(src, tmp_path / "out", log=lambda *a: None)


def test_truncated_or_foreign_files_are_refused(tmp_path, tiny_tokenizer):
    src = _tiny_gguf(tmp_path, tiny_tokenizer)
    data = src.read_bytes()
    for name, blob in (
        ("cut.gguf", data[: len(data) - 300]),
        ("head.gguf", data[:200]),
        ("not.gguf", b"PK\x03\x04" + data[4:]),
        ("empty.gguf", b""),
    ):
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(UserError, match=name):
            convert(tmp_path / name, tmp_path / "out", log=lambda *a: None)
        assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="no such file"):
        convert(tmp_path / "missing.gguf", tmp_path / "out", log=lambda *a: None)


def test_out_dir_is_never_clobbered(tmp_path, tiny_tokenizer):
    src = _tiny_gguf(tmp_path, tiny_tokenizer)
    out = convert(src, tmp_path / "m", log=lambda *a: None)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="--overwrite"):
        convert(src, out, log=lambda *a: None)
    # a folder this converter wrote may be replaced
    convert(src, out, overwrite=True, log=lambda *a: None)
    assert (out / "model.safetensors").read_bytes() == before
    other = tmp_path / "run"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="did not write"):
        convert(src, other, overwrite=True, log=lambda *a: None)
    assert (other / "precious.txt").read_text() == "keep me"


def test_cli_error_is_one_line(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "minroute.run.gguf",
            str(tmp_path / "nope.gguf"),
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert (
        r.returncode == 2 and r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ")
    ), r.stderr


# ----------------------------------------------------------------------------- the real
# SmolLM2-135M-Instruct GGUF


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """(converted folder, transformers' model and tokenizer from the same GGUF file)."""
    if not REAL_GGUF or not Path(REAL_GGUF).is_file():
        pytest.skip(
            "real GGUF not available (set MINROUTE_GGUF=path/to/SmolLM2-135M-Instruct.Q4_1.gguf)"
        )
    src = Path(REAL_GGUF)
    out = convert(src, tmp_path_factory.mktemp("smollm2") / "model", log=print)
    kw = dict(gguf_file=src.name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        src.parent, dtype=torch.float32, **kw
    ).eval()
    tok = transformers.AutoTokenizer.from_pretrained(src.parent, **kw)
    return out, hf, tok


CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name 3 primes."},
        {"role": "assistant", "content": "2, 3, 5."},
        {"role": "user", "content": "And the next one?"},
    ],
    [{"role": "user", "content": "Écris une phrase sur Zürich et 杭州, avec le nombre 1234."}],
]


def test_real_gguf_logits_equal_transformers_gguf_loader(real):
    out, hf, tok = real
    ours = load_model(out)
    for chat in CHATS:
        ids = torch.tensor(
            [
                tok.apply_chat_template(
                    chat, add_generation_prompt=True, tokenize=True, return_dict=False
                )
            ]
        )
        with torch.no_grad():
            a, b = ours(ids), hf(ids).logits
        diff = (a - b).abs().max().item()
        print(
            f"real SmolLM2, {ids.shape[1]} tokens: max |dlogit| = {diff:.3g} (logit scale"
            f" {b.abs().max():.3g})"
        )
        assert diff <= 1e-4, f"real GGUF: max |dlogit| vs transformers' GGUF loader = {diff:.3g}"


def test_real_gguf_tokenizer_and_chat_equal_transformers(real):
    out, _, tok = real
    ours = load_tokenizer(out)
    for s in STRINGS:
        assert ours.tokenizer.encode(s, add_special_tokens=False).ids == tok.encode(
            s, add_special_tokens=False
        ), s
    assert ours.chat == ChatFormat(
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
        False,
        True,
        ours.chat.source,
    )
    assert ours.eos_ids == [2] and ours.pad_id == 2
    for chat in CHATS:
        for gen in (False, True):
            ref = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert render(chat, add_generation_prompt=gen, fmt=ours.chat) == ref
            assert ours.tokenizer.encode(ref, add_special_tokens=False).ids == tok.encode(
                ref, add_special_tokens=False
            )


def test_real_gguf_answers(real):
    """The converted folder is an ordinary checkpoint: the chat command answers with it sensibly."""
    out, _, _ = real
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "minroute.evaluation.generate",
            "--model",
            str(out),
            "--prompt",
            "What is the capital of France?",
            "--max-new-tokens",
            "24",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"},
    )
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout, r.stdout
