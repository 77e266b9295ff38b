"""LoRA: identity at init, exact merge/unmerge, and PEFT round trips both ways."""

import math

import pytest
import torch
from torch import nn

from minroute import load_model
from minroute.core.lora import (
    LoRADropout,
    LoRALinear,
    add_lora,
    lora_layers,
    lora_state_dict,
    merge_lora,
    unmerge_lora,
)
from minroute.core.model import init_weights
from minroute.run.peft import load_peft_adapter, save_peft_adapter


def randomise_B(model, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.copy_(std * torch.randn(m.lora_B.shape, generator=g))


def test_lora_linear_init_and_identity():
    torch.manual_seed(0)
    base = nn.Linear(32, 16)
    x = torch.randn(4, 32)
    ref = base(x)
    lin = LoRALinear(base, r=4, alpha=8, dropout=0.0)
    assert lin.weight is base.weight and lin.bias is base.bias and lin.scaling == 2.0
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=sqrt(5)) on (r, in) = U(+-1/sqrt(in))
    assert lin.lora_A.abs().max() <= bound and lin.lora_A.abs().max() > 0.5 * bound
    assert torch.count_nonzero(lin.lora_B) == 0
    assert torch.equal(lin(x), ref), "with B = 0 the output must equal the base layer's"


def test_merge_equals_formula_idempotent_and_unmerge_restores():
    torch.manual_seed(1)
    lin = LoRALinear(nn.Linear(32, 16), r=4, alpha=8, dropout=0.0)
    nn.init.normal_(lin.lora_B)
    x = torch.randn(5, 32)
    W0 = lin.weight.detach().clone()
    y = lin(x)
    lin.merge()
    expected = W0 + (8 / 4) * lin.lora_B.detach() @ lin.lora_A.detach()
    diff = (lin.weight - expected).abs().max().item()
    assert diff < 1e-6, f"merged W vs W + (alpha/r) BA: max diff {diff:.3g}"
    merged_w = lin.weight.detach().clone()
    lin.merge()  # twice: no-op
    assert torch.equal(lin.weight, merged_w)
    assert (lin(x) - y).abs().max() < 1e-5
    lin.unmerge()
    assert torch.equal(lin.weight, W0), "unmerge must restore W exactly"
    lin.unmerge()
    assert torch.equal(lin.weight, W0)


def test_add_lora_trainable_set_and_state_dict(tiny_dir):
    m = add_lora(load_model(tiny_dir), r=8, alpha=16, dropout=0.05)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(m))
    L = m.config.num_hidden_layers
    assert len(trainable) == L * 4 * 2
    assert all(
        n.startswith("model.layers.") and n.endswith((".lora_A", ".lora_B")) for n in trainable
    )
    assert "model.layers.0.self_attn.q_proj.weight" in dict(m.named_parameters())  # HF names kept


def test_dropout_only_in_train_mode(tiny_dir):
    m = add_lora(load_model(tiny_dir), dropout=0.5)
    randomise_B(m)
    ids = torch.randint(0, m.config.vocab_size, (2, 9))
    m.eval()
    assert torch.equal(m(ids), m(ids))
    m.train()
    assert not torch.equal(m(ids), m(ids))


def test_dropout_mask_is_bernoulli_and_the_training_forward_is_the_formula():
    """LoRADropout keeps each element with probability 1 - p (independently: two draws differ, the
    kept fraction is within 5 standard errors of 1 - p), and LoRALinear's training forward is W x +
    b + (alpha / r) B A (m * x) / (1 - p) with that mask m, its gradients those of the formula."""
    p, n = 0.05, 1_000_000
    drop = LoRADropout(p).train()
    x = torch.ones(n)
    torch.manual_seed(0)
    a, b = drop.keep(x), drop.keep(x)
    se = math.sqrt(p * (1 - p) / n)
    for m in (a, b):
        assert abs(m.float().mean().item() - (1 - p)) < 5 * se
    assert not torch.equal(a, b)
    assert abs((a & b).float().mean().item() - (1 - p) ** 2) < 5 * se, (
        "two masks must be independent"
    )
    torch.manual_seed(1)
    y = drop(x)
    torch.manual_seed(1)
    assert torch.equal(y, torch.where(drop.keep(x), x / (1 - p), 0.0)), (
        "forward = mask * x / (1 - p)"
    )
    drop.eval()
    assert drop(x) is x

    torch.manual_seed(2)
    lin = LoRALinear(nn.Linear(32, 16), r=4, alpha=8, dropout=0.25).train()
    nn.init.normal_(lin.lora_B)
    xin = torch.randn(3, 5, 32, requires_grad=True)
    torch.manual_seed(3)
    out = lin(xin)
    torch.manual_seed(3)
    keep = lin.dropout.keep(xin)
    xr = xin.detach().clone().requires_grad_(True)
    A, B = (t.detach().clone().requires_grad_(True) for t in (lin.lora_A, lin.lora_B))
    ref = xr @ lin.weight.T + lin.bias + (8 / 4) * ((keep * xr) / (1 - 0.25)) @ A.T @ B.T
    assert (out - ref).abs().max().item() < 1e-5
    g = torch.randn(out.shape)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    for got, want in ((xin.grad, xr.grad), (lin.lora_A.grad, A.grad), (lin.lora_B.grad, B.grad)):
        assert (got - want).abs().max().item() < 1e-4 * max(want.abs().max().item(), 1.0)
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(nn.Linear(4, 4), dropout=1.0)
    lin.dropout = nn.Dropout(0.5)  # any other module put there is still applied
    assert not torch.equal(lin(xin), lin(xin))


def test_merged_model_matches_unmerged(tiny_dir):
    m = add_lora(load_model(tiny_dir), dropout=0.0)
    randomise_B(m)
    ids = torch.randint(0, m.config.vocab_size, (2, 13))
    with torch.no_grad():
        a = m(ids)
        merge_lora(m)
        b = m(ids)
        unmerge_lora(m)
        c = m(ids)
    assert (a - b).abs().max() < 1e-5 and torch.equal(a, c)


def _hf_and_ours(tiny_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.Qwen2ForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    init_weights(hf, seed=5, std=0.1)
    ours = load_model(tiny_dir)
    ours.load_state_dict({k: v for k, v in hf.state_dict().items()}, strict=False)
    return hf, ours


def test_peft_loads_our_adapter(tmp_path, tiny_dir):
    peft = pytest.importorskip("peft")
    hf, ours = _hf_and_ours(tiny_dir)
    add_lora(ours, r=8, alpha=16, dropout=0.05)
    randomise_B(ours, seed=3)  # B != 0, so a wrong mapping or scaling shows
    save_peft_adapter(ours, tmp_path / "adapter", str(tiny_dir))
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ours.eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 17))
    with torch.no_grad():
        diff = (ours(ids) - peft_model(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-5, f"ours vs transformers+peft with our adapter: max |dlogit| = {diff:.3g}"


def test_we_load_a_peft_adapter(tmp_path, tiny_dir):
    peft = pytest.importorskip("peft")
    hf, ours = _hf_and_ours(tiny_dir)
    cfg = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    )
    peft_model = peft.get_peft_model(hf, cfg)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(tmp_path / "peft")
    load_peft_adapter(ours, tmp_path / "peft")
    ids = torch.randint(0, ours.config.vocab_size, (2, 17))
    peft_model.eval()
    ours.eval()
    with torch.no_grad():
        diff = (ours(ids) - peft_model(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-5, f"ours with a PEFT-written adapter vs PEFT: max |dlogit| = {diff:.3g}"


def test_load_peft_adapter_errors(tmp_path, tiny_dir):
    m = add_lora(load_model(tiny_dir), r=4, alpha=8)
    with pytest.raises(FileNotFoundError, match="adapter_config.json: missing"):
        load_peft_adapter(m, tmp_path)
    other = add_lora(load_model(tiny_dir), r=8, alpha=16)
    save_peft_adapter(other, tmp_path / "a", str(tiny_dir))
    with pytest.raises(ValueError, match=r"r=8, alpha=16.0, but the model's LoRA has r=4"):
        load_peft_adapter(m, tmp_path / "a")
