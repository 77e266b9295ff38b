"""The loader: official layouts in, clear errors out, nothing unpickled."""

import json
import pickle
import shutil

import pytest
import torch

from minroute import load_model, load_tokenizer
from minroute.core.model import init_weights
from minroute.run.load import resolve_dir


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_loads_tiny_writer_output_tied(tiny_dir):
    m = load_model(tiny_dir)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert not any(p.requires_grad for p in m.parameters())
    tok = load_tokenizer(tiny_dir)
    assert tok.eos_ids == [
        tok.tokenizer.token_to_id("<|im_end|>"),
        tok.tokenizer.token_to_id("<|endoftext|>"),
    ]
    assert tok.pad_id == tok.tokenizer.token_to_id("<|endoftext|>")


def test_load_dtype_and_device(tiny_dir):
    m = load_model(tiny_dir, dtype="bf16", device="cpu")
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("shard", [False, True])
def test_reads_transformers_save_pretrained(tmp_path, tiny_dir, shard):
    transformers = pytest.importorskip("transformers")
    hf = transformers.Qwen2ForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    init_weights(hf, seed=11, std=0.1)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB" if shard else "10GB")
    files = sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
    assert (len(files) > 1) == shard, files
    ours = load_model(tmp_path / "hf")
    ids = torch.randint(0, ours.config.vocab_size, (2, 19))
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-5, f"max |dlogit| = {diff:.3g}"


def test_untied_checkpoint_keeps_its_own_head(tmp_path):
    from minroute.run.tiny import write_tiny_checkpoint

    d = write_tiny_checkpoint(tmp_path / "u", tie_word_embeddings=False, seed=3)
    m = load_model(d)
    assert m.lm_head.weight is not m.model.embed_tokens.weight
    assert not torch.equal(m.lm_head.weight, m.model.embed_tokens.weight)


# ---------------------------------------------------------------- bad input, each with its message


def test_no_config_json(tmp_path, tiny_dir):
    d = copy_ckpt(tiny_dir, tmp_path / "c")
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no config.json"):
        load_model(d)


def test_required_field_missing(tmp_path, tiny_dir):
    d = copy_ckpt(tiny_dir, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError, match=r"config.json: required field 'num_hidden_layers' is missing"
    ):
        load_model(d)


@pytest.mark.parametrize(
    "field,value,msg",
    [
        (
            "rope_parameters",
            {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0},
            r"'rope_type' is 'yarn'",
        ),
        ("rope_scaling", {"type": "dynamic", "factor": 2.0}, r"'rope_type' is 'dynamic'"),
        ("use_sliding_window", True, r"'use_sliding_window' is true"),
    ],
)
def test_unsupported_config(tmp_path, tiny_dir, field, value, msg):
    d = copy_ckpt(tiny_dir, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=msg):
        load_model(d)


def test_truncated_safetensors(tmp_path, tiny_dir):
    d = copy_ckpt(tiny_dir, tmp_path / "c")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(
        ValueError,
        match=r"model.safetensors: cannot read safetensors file, it is truncated or corrupt",
    ):
        load_model(d)


def test_corrupt_safetensors_header(tmp_path, tiny_dir):
    d = copy_ckpt(tiny_dir, tmp_path / "c")
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(ValueError, match=r"truncated or corrupt"):
        load_model(d)


def _rewrite(d, edit):
    from safetensors.torch import load_file, save_file

    t = load_file(str(d / "model.safetensors"))
    edit(t)
    save_file(t, str(d / "model.safetensors"))


def test_missing_tensor(tmp_path, tiny_dir):
    d = copy_ckpt(tiny_dir, tmp_path / "c")
    _rewrite(d, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(
        ValueError, match=r"missing tensor\(s\) \['model.layers.1.self_attn.k_proj.bias'\]"
    ):
        load_model(d)


def test_unexpected_tensor(tmp_path, tiny_dir):
    d = copy_ckpt(tiny_dir, tmp_path / "c")
    _rewrite(d, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(
        ValueError, match=r"model.layers.0.extra.weight in .*model.safetensors: unexpected tensor"
    ):
        load_model(d)


def test_wrong_shape(tmp_path, tiny_dir):
    d = copy_ckpt(tiny_dir, tmp_path / "c")
    _rewrite(d, lambda t: t.update({"model.norm.weight": torch.ones(63)}))
    with pytest.raises(
        ValueError,
        match=(
            r"model.norm.weight in .*model.safetensors: shape \(63,\), but config.json implies"
            r" \(64,\)"
        ),
    ):
        load_model(d)


def test_pickle_only_folder_is_refused_and_never_unpickled(tmp_path, tiny_dir, monkeypatch):
    d = tmp_path / "p"
    d.mkdir()
    shutil.copy(tiny_dir / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"x": 1}))

    def boom(*a, **k):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(torch, "load", boom)
    with pytest.raises(
        ValueError,
        match=r"only pickle weights \(pytorch_model.bin\); minroute loads safetensors only",
    ):
        load_model(d)


def test_hub_id_while_offline():
    import os

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(
        FileNotFoundError, match=r"could not get 'nobody-here/no-such-model'.*local directory"
    ):
        load_model("nobody-here/no-such-model")


def test_not_a_path_nor_repo_id(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no such directory, and not a Hub repo id"):
        resolve_dir(tmp_path / "missing" / "deeper")


# ---------------------------------------------------------------- the real tokenizer (skipped if
# absent)

GOLDEN = {
    " hello sir. How are you Edward?": [23811, 27048, 13, 2585, 525, 498, 21891, 30],
    "Hello, world!": [9707, 11, 1879, 0],
    "<|im_start|>hello<|im_end|>": [151644, 14990, 151645],
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\n<|im_start|>user\n杭州的天气怎么样？<|im_end|>\n"
    "<|im_start|>assistant\n": [
        151644,
        8948,
        198,
        2610,
        525,
        1207,
        16948,
        11,
        3465,
        553,
        54364,
        14817,
        13,
        1446,
        525,
        264,
        10950,
        17847,
        13,
        151645,
        198,
        151644,
        872,
        198,
        104130,
        9370,
        104307,
        104472,
        11319,
        151645,
        198,
        151644,
        77091,
        198,
    ],
}


@pytest.mark.parametrize("text", list(GOLDEN))
def test_real_tokenizer_golden_vectors(real_tokenizer_path, text):
    tok = load_tokenizer(real_tokenizer_path)
    assert tok.tokenizer.encode(text, add_special_tokens=False).ids == GOLDEN[text]
    assert tok.eos_ids[0] == 151645


def test_tiny_writer_with_real_tokenizer(tmp_path, real_tokenizer_path):
    from minroute.run.tiny import write_tiny_checkpoint

    d = write_tiny_checkpoint(
        tmp_path / "r", tokenizer=real_tokenizer_path, hidden_size=32, num_hidden_layers=2
    )
    m = load_model(d)
    assert m.config.vocab_size == 151936
    tok = load_tokenizer(d)
    assert tok.tokenizer.token_to_id("<tool_call>") == 151657
