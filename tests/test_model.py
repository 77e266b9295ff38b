"""Parity of minroute's decoder with transformers' Qwen2ForCausalLM and LlamaForCausalLM (test-time
references only).

Every parameter is re-randomised (biases and norm weights included: HF's init leaves them at 0 and
1, which would hide a missing bias or a misplaced norm weight), TF32 is off (conftest), fp32
throughout unless stated. Max |logit difference| is printed in every assert message.
"""

import json

import pytest
import torch

from minroute import load_model
from minroute.core.model import ModelConfig, count_params_meta, init_weights
from minroute.evaluation.generate import generate_ids
from minroute.run.load import config_from_dict
from minroute.run.tiny import write_tiny_checkpoint

transformers = pytest.importorskip("transformers")

# name: (our tiny-writer kwargs); GQA ratios 2, 1 and 7, tied and untied, several thetas
CONFIGS = {
    "tied-gqa2": dict(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_theta=1_000_000.0,
    ),
    "untied-mha": dict(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        rope_theta=10_000.0,
    ),
    "tied-gqa7": dict(
        hidden_size=112,
        num_attention_heads=7,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        rope_theta=500_000.0,
    ),
}


def hf_checkpoint(tmp_path, name, rope_style, seed=0):
    """A checkpoint folder for config `name` whose config.json carries rope theta top-level ('top',
    written by minroute's tiny writer, transformers-4.43 layout) or inside rope_parameters
    ('nested', written by transformers' own save_pretrained after re-randomising every HF
    parameter)."""
    kw = CONFIGS[name]
    d = write_tiny_checkpoint(
        tmp_path / f"{name}-top", num_hidden_layers=3, intermediate_size=96, seed=seed, **kw
    )
    if rope_style == "top":
        assert "rope_theta" in json.loads((d / "config.json").read_text())
        return d
    hf = transformers.Qwen2ForCausalLM.from_pretrained(d, dtype=torch.float32)
    # re-randomise every HF parameter, at a larger logit scale
    init_weights(hf, seed=seed + 1, std=0.1)
    out = tmp_path / f"{name}-nested"
    hf.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    assert "rope_theta" not in cfg and cfg["rope_parameters"]["rope_theta"] == kw["rope_theta"]
    return out


def hf_model(d, attn, dtype=torch.float32):
    m = transformers.Qwen2ForCausalLM.from_pretrained(
        d, attn_implementation=attn, dtype=dtype
    ).eval()
    return m


def inputs(vocab, B=3, T=41, pad=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if pad == "right":
        mask[1, -9:] = 0
        mask[2, -20:] = 0
    elif pad == "left":
        mask[1, :9] = 0
        mask[2, :20] = 0
    return ids, mask


def max_diff(a, b, mask):
    real = mask.bool()
    return (a[real].float() - b[real].float()).abs().max().item()


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("rope_style", ["top", "nested"])
@pytest.mark.parametrize("pad", [None, "right", "left"])
def test_fp32_parity(tmp_path, name, rope_style, pad):
    d = hf_checkpoint(tmp_path, name, rope_style)
    ours = load_model(d)
    ids, mask = inputs(ours.config.vocab_size, pad=pad)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
        assert got.dtype == torch.float32 and got.shape == (*ids.shape, ours.config.vocab_size)
        for attn, tol in (("sdpa", 1e-5), ("eager", 1e-4)):
            ref = hf_model(d, attn)(ids, attention_mask=mask).logits
            diff = max_diff(got, ref, mask)
            print(f"{name} rope={rope_style} pad={pad} vs HF {attn}: max|dlogit| = {diff:.3g}")
            assert diff <= tol, (
                f"{name}/{rope_style}/{pad}: max |dlogit| vs HF {attn} = {diff:.3g} > {tol}"
            )


def test_fp32_parity_long_sequence(tmp_path):
    d = hf_checkpoint(tmp_path, "tied-gqa2", "nested")
    ours = load_model(d)
    ids, mask = inputs(ours.config.vocab_size, B=1, T=320, seed=1)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
        for attn, tol in (("sdpa", 1e-5), ("eager", 1e-4)):
            diff = max_diff(got, hf_model(d, attn)(ids, attention_mask=mask).logits, mask)
            print(f"T=320 vs HF {attn}: max|dlogit| = {diff:.3g}")
            assert diff <= tol, f"T=320: max |dlogit| vs HF {attn} = {diff:.3g} > {tol}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_parity(tmp_path, name):
    """bf16 weights and activations on both sides, same kernel (SDPA). docs/reference.md §4: bitwise
    is reachable."""
    d = hf_checkpoint(tmp_path, name, "nested")
    ours = load_model(d, dtype=torch.bfloat16)
    ids, mask = inputs(ours.config.vocab_size, pad="right")
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
        ref = hf_model(d, "sdpa", dtype=torch.bfloat16)(ids, attention_mask=mask).logits
    diff = max_diff(got, ref, mask)
    scale = ref.float().abs().max().item()
    print(f"{name} bf16 vs HF sdpa bf16: max|dlogit| = {diff:.3g} at logit scale {scale:.3g}")
    assert diff <= 1e-6 * max(scale, 1.0), (
        f"{name}: bf16 max |dlogit| = {diff:.3g} (logit scale {scale:.3g})"
    )


def test_kv_cache_decode_equals_full_forward(tiny_dir):
    m = load_model(tiny_dir)
    ids, _ = inputs(m.config.vocab_size, B=2, T=30, seed=3)
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(30)
        steps = [m(ids[:, :17], cache=cache)]  # a prefill of 17, then one token at a time
        for t in range(17, 30):
            steps.append(m(ids[:, t : t + 1], cache=cache))
    inc = torch.cat(steps, dim=1)
    diff = (inc - full).abs().max().item()
    assert diff <= 1e-5, f"KV-cache decoding vs full forward: max |dlogit| = {diff:.3g}"
    assert cache.length == 30


def test_kv_cache_chunked_prefill_with_left_padding(tiny_dir):
    m = load_model(tiny_dir)
    ids, mask = inputs(m.config.vocab_size, B=3, T=24, pad="left", seed=4)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = m(ids, mask, pos)
        cache = m.new_cache(24)
        a = m(ids[:, :10], mask[:, :10], pos[:, :10], cache)
        b = m(ids[:, 10:], mask, pos[:, 10:], cache)
    diff = max_diff(torch.cat([a, b], 1), full, mask)
    assert diff <= 1e-5, f"chunked prefill with padding: max |dlogit| = {diff:.3g}"


def test_greedy_generate_equals_hf(tmp_path):
    d = hf_checkpoint(tmp_path, "tied-gqa2", "nested")
    ours = load_model(d)
    hf = hf_model(d, "sdpa")
    ids, _ = inputs(ours.config.vocab_size, B=1, T=12, seed=5)
    plain = transformers.GenerationConfig(
        do_sample=False,
        max_new_tokens=24,
        min_new_tokens=24,
        pad_token_id=0,
        repetition_penalty=1.0,
    )  # not the checkpoint's sampling defaults
    ref = hf.generate(ids, generation_config=plain)[:, 12:]
    got = generate_ids(ours, ids, 24)
    assert torch.equal(got, ref), f"greedy tokens differ:\nours {got.tolist()}\nHF   {ref.tolist()}"


def test_generate_batched_left_padding_equals_single(tiny_dir):
    """A left-padded prompt in a batch decodes exactly like the same prompt alone."""
    m = load_model(tiny_dir)
    ids, _ = inputs(m.config.vocab_size, B=2, T=16, seed=6)
    short = ids[1, 5:]
    batch = ids.clone()
    batch[1, :5] = 0
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    got = generate_ids(m, batch, 10, attention_mask=mask)
    alone = generate_ids(m, short[None], 10)
    assert torch.equal(got[1], alone[0]), f"{got[1].tolist()} != {alone[0].tolist()}"


def test_generate_stops_on_any_eos_and_samples_reproducibly(tiny_dir):
    m = load_model(tiny_dir)
    ids, _ = inputs(m.config.vocab_size, B=1, T=8, seed=7)
    free = generate_ids(m, ids, 12)
    stop = int(free[0, 3])
    stopped = generate_ids(m, ids, 12, eos_ids=[10**6, stop])
    first = (free[0] == stop).nonzero()[0].item()
    assert stopped.shape[1] == first + 1 and torch.equal(stopped[0], free[0, : first + 1])
    kw = dict(temperature=0.8, top_k=20, top_p=0.9)
    a = generate_ids(m, ids, 12, generator=torch.Generator().manual_seed(1), **kw)
    b = generate_ids(m, ids, 12, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, b)


def test_sampling_filters():
    from minroute.evaluation.generate import sample_next

    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert draws == {3, 4}
    probs = logits.softmax(-1)[0]  # 4: .636, 3: .234, 2: .086 -> top_p .8 keeps {4, 3}
    assert probs[4] < 0.8 < probs[4] + probs[3]
    draws = {int(sample_next(logits, 1.0, top_p=0.8, generator=g)) for _ in range(200)}
    assert draws == {3, 4}


def test_real_shape_parameter_count():
    assert count_params_meta(ModelConfig()) == 494_032_768


# ----------------------------------------------------------------------------- Llama-family
# checkpoints

# name: transformers LlamaConfig kwargs; SmolLM2-like (tied, GQA 3, no biases), TinyLlama-like
# (untied, GQA 4), and one with every bias on and an explicit head_dim that differs from hidden /
# heads
LLAMA_CONFIGS = {
    "smollm2-like": dict(
        hidden_size=48,
        num_attention_heads=3,
        num_key_value_heads=1,
        intermediate_size=80,
        tie_word_embeddings=True,
        rope_theta=100_000.0,
        rms_norm_eps=1e-5,
    ),
    "tinyllama-like": dict(
        hidden_size=64,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=96,
        tie_word_embeddings=False,
        rope_theta=10_000.0,
        rms_norm_eps=1e-5,
    ),
    "biases-head_dim": dict(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        head_dim=24,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=False,
        rope_theta=500_000.0,
    ),
}


def llama_checkpoint(tmp_path, name, seed=0):
    """transformers' own LlamaForCausalLM, every parameter re-randomised (norms and biases
    included), saved by save_pretrained (safetensors, transformers-5 config layout)."""
    kw = {**LLAMA_CONFIGS[name]}
    kw["rope_parameters"] = {"rope_type": "default", "rope_theta": kw.pop("rope_theta")}
    cfg = transformers.LlamaConfig(
        vocab_size=300, num_hidden_layers=3, max_position_embeddings=512, **kw
    )
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(cfg)
    init_weights(hf, seed=seed + 1, std=0.1)
    out = tmp_path / f"llama-{name}"
    hf.save_pretrained(out)
    return out


@pytest.mark.parametrize("name", list(LLAMA_CONFIGS))
@pytest.mark.parametrize("pad", [None, "right", "left"])
def test_llama_fp32_parity(tmp_path, name, pad):
    d = llama_checkpoint(tmp_path, name)
    ours = load_model(d)
    hf_names = set(transformers.LlamaForCausalLM.from_pretrained(d).state_dict())
    assert set(ours.state_dict()) == hf_names, (
        "minroute's tensors are not exactly the checkpoint's (no zero biases)"
    )
    ids, mask = inputs(ours.config.vocab_size, pad=pad)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
        for attn, tol in (("sdpa", 1e-5), ("eager", 1e-4)):
            ref = transformers.LlamaForCausalLM.from_pretrained(d, attn_implementation=attn).eval()
            diff = max_diff(got, ref(ids, attention_mask=mask).logits, mask)
            print(f"llama {name} pad={pad} vs HF {attn}: max|dlogit| = {diff:.3g}")
            assert diff <= tol, (
                f"llama {name}/{pad}: max |dlogit| vs HF {attn} = {diff:.3g} > {tol}"
            )


def test_llama_bf16_parity(tmp_path):
    d = llama_checkpoint(tmp_path, "biases-head_dim")
    ours = load_model(d, dtype=torch.bfloat16)
    ids, mask = inputs(ours.config.vocab_size, pad="right")
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
        ref = transformers.LlamaForCausalLM.from_pretrained(
            d, attn_implementation="sdpa", dtype=torch.bfloat16
        )
        ref = ref.eval()(ids, attention_mask=mask).logits
    diff = max_diff(got, ref, mask)
    print(f"llama bf16 vs HF sdpa bf16: max|dlogit| = {diff:.3g}")
    assert diff <= 1e-6 * max(ref.float().abs().max().item(), 1.0), (
        f"llama bf16: max |dlogit| = {diff:.3g}"
    )


def test_tiny_llama_writer_loads_in_transformers(tmp_path):
    """minroute.run.tiny writes Llama checkpoints in the official layout too: transformers reads
    them as they are."""
    d = write_tiny_checkpoint(
        tmp_path / "tl",
        model_type="llama",
        attention_bias=True,
        head_dim=24,
        tie_word_embeddings=False,
        num_hidden_layers=2,
        seed=3,
    )
    ours = load_model(d)
    ref = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    assert type(ref).__name__ == "LlamaForCausalLM"
    ids, mask = inputs(ours.config.vocab_size, pad="right")
    with torch.no_grad():
        diff = max_diff(ours(ids, attention_mask=mask), ref(ids, attention_mask=mask).logits, mask)
    assert diff <= 1e-5, f"tiny llama vs HF: max |dlogit| = {diff:.3g}"


@pytest.mark.parametrize(
    "change,field",
    [
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_type"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_type"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type"),
        ({"sliding_window": 4096}, "sliding_window"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"model_type": "mistral"}, "model_type"),
        ({"model_type": None}, "model_type"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ],
)
def test_unsupported_configs_refused_by_name(change, field):
    from minroute.run.safety import UserError

    base = {
        "model_type": "llama",
        "vocab_size": 100,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    with pytest.raises(UserError, match=field):
        config_from_dict({**base, **change}, source="x/config.json")


def test_llama_config_defaults_are_transformers():
    cfg = config_from_dict(
        {
            "model_type": "llama",
            "vocab_size": 100,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        }
    )
    ref = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    assert (
        cfg.tie_word_embeddings,
        cfg.rms_norm_eps,
        cfg.num_key_value_heads,
        cfg.dim_head,
        cfg.rope_theta,
        cfg.attention_bias,
        cfg.mlp_bias,
    ) == (
        ref.tie_word_embeddings,
        ref.rms_norm_eps,
        ref.num_key_value_heads,
        ref.head_dim,
        ref.rope_parameters["rope_theta"],
        ref.attention_bias,
        ref.mlp_bias,
    )
