"""FLOPs: the paper's blocks-only number, and the full count against a brute-force matmul count."""

import torch
from torch.utils.flop_counter import FlopCounterMode

from minroute import load_model
from minroute.core.model import ModelConfig
from minroute.evaluation.flops import (
    attention_flops,
    block_flops,
    lm_head_flops,
    lora_params,
    paper_flops,
    router_flops,
    router_params,
    sequence_flops,
    skip_bound_speedup,
)


def test_paper_formula():
    cfg = ModelConfig()
    assert paper_flops(cfg, T=512) == 377_688_686_592
    assert paper_flops(cfg, T=512, layers_run=1) == 15_737_028_608


def test_real_shape_numbers_of_reference():
    cfg = ModelConfig()
    assert block_flops(cfg, 1) - attention_flops(cfg, 1) == 2 * 14_909_440
    assert lm_head_flops(cfg, 1) == 2 * 136_134_656
    assert lora_params(cfg) == 1_081_344 and router_params(cfg) == 21_528
    dec, pre = skip_bound_speedup(cfg, 3.66)
    assert round(dec, 2) == 1.12 and round(pre, 2) == 1.18
    dec, pre = skip_bound_speedup(cfg, 9)
    assert round(dec, 2) == 1.37 and round(pre, 2) == 1.60


def test_full_formula_matches_brute_force_matmul_count(tiny_dir):
    m = load_model(tiny_dir)
    cfg = m.config
    T = 37
    ids = torch.randint(0, cfg.vocab_size, (1, T))
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        m(ids)
    # the CPU SDPA kernel is not counted by FlopCounterMode: linear layers only
    counted = fc.get_total_flops()
    L = cfg.num_hidden_layers
    assert counted == L * (block_flops(cfg, T) - attention_flops(cfg, T)) + lm_head_flops(cfg, T)
    # attention: eager QK^T and A.V are counted as full T x T products; causal keeps, per query t,
    # t+1 keys
    H, D = cfg.num_attention_heads, cfg.dim_head
    q, k, v = (torch.randn(1, H, T, D) for _ in range(3))
    with FlopCounterMode(display=False) as fc:
        (q @ k.transpose(-1, -2)).softmax(-1) @ v
    assert fc.get_total_flops() == attention_flops(cfg, T, causal=False)
    brute_causal = sum(2 * 2 * H * D * (t + 1) for t in range(T))
    assert attention_flops(cfg, T) == brute_causal
    assert sequence_flops(cfg, T, L, routers=False) == L * block_flops(cfg, T) + lm_head_flops(
        cfg, T
    )


def test_sequence_flops_scale_with_layers_and_routers():
    cfg = ModelConfig()
    full = sequence_flops(cfg, 100, 24)
    assert sequence_flops(cfg, 100, 20) == full - 4 * block_flops(cfg, 100)
    assert full - sequence_flops(cfg, 100, 24, routers=False) == 24 * router_flops(cfg, 100)
    decode = block_flops(cfg, 1, past=99)  # one new token over 99 cached
    assert decode == 2 * 14_909_440 + 2 * 2 * 896 * 100


def test_decode_bound_says_which_model_holds_where():
    """CPU: the weight-bytes bound; GPU (launch-bound for small models): the higher of it and
    L / (L - k), so a launch-bound speedup is not flagged as noise."""
    from minroute.core.model import ModelConfig
    from minroute.evaluation.flops import decode_bound, skip_bound_speedup

    cfg = ModelConfig()
    bytes_bound, blocks_bound = skip_bound_speedup(cfg, 4)
    assert bytes_bound < blocks_bound
    assert decode_bound(cfg, 4, "cpu") == (bytes_bound, "weight bytes read per token (CPU)")
    bound, what = decode_bound(cfg, 4, "cuda")
    assert bound == blocks_bound and "launches" in what
