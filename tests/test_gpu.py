"""What only a GPU can show (`python -m pytest -m gpu`; skipped without CUDA): the real 0.5B shape, random weights.

- bf16 parity with transformers' SDPA path at the real shape, every parameter random (biases and norms too);
- one real-shape training step with the closed-block backward: gradients equal the dense path's, and the
  step is faster and smaller with the initial band closed than with every block open;
- skipping and decoding against their bounds (REFERENCE.md §5): prefill with 9 blocks closed reaches 85% of
  L / (L - 9), decode of 90% of the weight-bytes bound.
TF32 is off (conftest). Figures are printed (-s) for the closing note.
"""
import time

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def real_ckpt(tmp_path_factory):
    from minroute.model import ModelConfig
    from minroute.tiny import write_tiny_checkpoint
    c = ModelConfig()
    return write_tiny_checkpoint(tmp_path_factory.mktemp("real") / "m", hidden_size=c.hidden_size,
                                 num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                                 num_key_value_heads=c.num_key_value_heads, intermediate_size=c.intermediate_size,
                                 vocab_size=c.vocab_size, dtype=torch.bfloat16)


def batch(B=4, T=512, vocab=151936, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(1, B):
        mask[b, T - 64 * b:] = 0
    return ids.cuda(), mask.cuda()


def test_bf16_parity_real_shape(real_ckpt):
    import transformers

    from minroute import load_model
    ids, mask = batch(B=2, T=256)
    ours = load_model(real_ckpt, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
    del ours
    hf = transformers.Qwen2ForCausalLM.from_pretrained(real_ckpt, dtype=torch.bfloat16,
                                                       attn_implementation="sdpa").cuda().eval()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits.float()
    real = mask.bool()
    diff = (got - ref)[real].abs().max().item()
    scale = ref[real].abs().max().item()
    print(f"real shape bf16 vs HF sdpa bf16: max|dlogit| = {diff:.3g} at logit scale {scale:.3g}")
    assert diff <= 1e-2 * scale, f"bf16 parity at the real shape: max |dlogit| {diff:.3g} (scale {scale:.3g})"


def test_real_shape_training_step_skips_closed_backward(real_ckpt):
    from minroute.checkpoint import build_layerroute
    from minroute.loss import lm_loss
    from minroute.router import gate_regulariser
    route = build_layerroute(real_ckpt, {"r": 8, "alpha": 16, "dropout": 0.0}, device="cuda",
                             dtype=torch.bfloat16).train()
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)
    L = route.config.num_hidden_layers

    def step(dense: bool, gates=None):
        route.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        with route.forcing(gates), torch.autocast("cuda", dtype=torch.bfloat16):
            h, soft, _ = route.gated_hidden(ids, mask, dense=dense)
            loss = lm_loss(h, route.lm_head.weight, labels) + gate_regulariser(soft)
        loss.backward()
        torch.cuda.synchronize()
        dt, mem = time.perf_counter() - t0, (torch.cuda.max_memory_allocated() - before) / 2**20
        grads = {n: p.grad.float().clone() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
                 for n, p in route.named_parameters() if p.requires_grad}
        return dt, mem, grads

    for _ in range(2):  # warm-up
        step(False)
    _, _, g_dense = step(True)
    t_band, m_band, g_sparse = step(False)
    worst = max(((g_dense[n] - g_sparse[n]).norm() / g_dense[n].norm().clamp(min=1e-12)).item() for n in g_dense)
    print(f"real shape, bf16, band closed: sparse vs dense gradients, worst relative L2 difference {worst:.3g}")
    assert worst <= 2e-2, f"closed-block backward changed a gradient by {worst:.3g} (bf16 kernels differ in batch)"
    t_open, m_open, _ = step(False, torch.ones(L, dtype=torch.bool))
    t_band, m_band, _ = step(False)
    print(f"real shape 4x512 bf16 step: all open {1000 * t_open:.0f} ms {m_open:.0f} MB; band closed "
          f"{1000 * t_band:.0f} ms {m_band:.0f} MB ({t_band / t_open:.2f}x time, {m_band / m_open:.2f}x memory)")
    assert t_band < t_open and m_band < 0.8 * m_open


def test_skipping_and_decode_against_their_bounds(real_ckpt):
    from minroute.checkpoint import build_layerroute
    from minroute.flops import skip_bound_speedup
    from minroute.timing import decode_ms_per_token, measure, prefill
    route = build_layerroute(real_ckpt, {"r": 8, "alpha": 16, "dropout": 0.0}, device="cuda",
                             dtype=torch.bfloat16).eval()
    cfg, L, k = route.config, route.config.num_hidden_layers, 9
    closed = torch.ones(L, dtype=torch.bool)
    closed[8:8 + k] = False
    ids, _ = batch(B=1, T=512)
    res = {}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for name, gates in (("open", torch.ones(L, dtype=torch.bool)), ("closed", closed)):
            with route.forcing(gates):
                res[f"prefill_{name}"] = measure(lambda: prefill(route, ids), 3, 10, "cuda")["median_ms"]
                res[f"decode_{name}"] = decode_ms_per_token(route, ids[:, :32], 64, 2, 5, "cuda")["ms_per_token"]
    dec_bound, pre_bound = skip_bound_speedup(cfg, k)
    pre, dec = res["prefill_open"] / res["prefill_closed"], res["decode_open"] / res["decode_closed"]
    print(f"k={k}: prefill {res['prefill_open']:.2f} -> {res['prefill_closed']:.2f} ms ({pre:.3f}x, bound "
          f"{pre_bound:.3f}); decode {res['decode_open']:.3f} -> {res['decode_closed']:.3f} ms/token ({dec:.3f}x, "
          f"bound {dec_bound:.3f})")
    assert pre >= 0.85 * pre_bound and dec >= 0.9 * dec_bound
