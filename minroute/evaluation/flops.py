"""FLOPs and parameter counts (2 FLOPs per multiply-add; matmuls only, as is customary).

Two definitions side by side:
- `paper_flops`: the authors' blocks-only formula at a fixed T: per block the Q, K, V, O
  projections, a full (non-causal) QK^T and the three MLP matmuls; no A.V, no lm_head.
  377,688,686,592 for 24 layers at T = 512 (docs/reference.md §2).
- `sequence_flops`: what a forward really costs at the sequence's real length: projections, causal
  QK^T and A.V, MLP for the layers that ran, the routers, and the lm_head on the positions it is
  applied to.
"""

from __future__ import annotations

from minroute.core.model import ModelConfig


def proj_macs(cfg: ModelConfig) -> int:
    """Multiply-adds per token of q, k, v, o projections."""
    d, q, kv = (
        cfg.hidden_size,
        cfg.num_attention_heads * cfg.dim_head,
        cfg.num_key_value_heads * cfg.dim_head,
    )
    return d * q + 2 * d * kv + q * d


def mlp_macs(cfg: ModelConfig) -> int:
    return 3 * cfg.hidden_size * cfg.intermediate_size


def attention_flops(cfg: ModelConfig, T: int, past: int = 0, causal: bool = True) -> int:
    """QK^T and A.V for T queries over past + T keys; causal: only the keys each query sees."""
    qd = cfg.num_attention_heads * cfg.dim_head
    keys = T * past + (T * (T + 1) // 2 if causal else T * T)  # sum over queries of visible keys
    return 2 * 2 * qd * keys  # two matmuls, 2 FLOPs per MAC


def block_flops(cfg: ModelConfig, T: int, past: int = 0) -> int:
    """One block on T new tokens with `past` cached positions."""
    return 2 * T * (proj_macs(cfg) + mlp_macs(cfg)) + attention_flops(cfg, T, past)


def router_flops(cfg: ModelConfig, T: int) -> int:
    """Mean-pool (T*d adds, counted as FLOPs) and the Linear(d, 1)."""
    return T * cfg.hidden_size + 2 * cfg.hidden_size


def lm_head_flops(cfg: ModelConfig, positions: int) -> int:
    return 2 * positions * cfg.hidden_size * cfg.vocab_size


def sequence_flops(
    cfg: ModelConfig,
    T: int,
    layers_run: float,
    lm_head_positions: int | None = None,
    routers: bool = True,
    past: int = 0,
) -> float:
    """Forward FLOPs of one sequence of T tokens that ran `layers_run` blocks (may be fractional: a
    mean).

    lm_head_positions defaults to T (scoring every position, as for perplexity); use 1 for
    generation.
    """
    n_routers = cfg.num_hidden_layers if routers else 0
    head = lm_head_flops(cfg, T if lm_head_positions is None else lm_head_positions)
    return layers_run * block_flops(cfg, T, past) + n_routers * router_flops(cfg, T) + head


def paper_flops(cfg: ModelConfig, T: int = 512, layers_run: float | None = None) -> float:
    """The authors' per-sequence FLOPs: (projections + MLP + full QK^T) x T x layers; no A.V, no
    lm_head."""
    layers_run = cfg.num_hidden_layers if layers_run is None else layers_run
    per_block = (
        2 * T * (proj_macs(cfg) + mlp_macs(cfg))
        + 2 * T * T * cfg.num_attention_heads * cfg.dim_head
    )
    return layers_run * per_block


def lora_params(
    cfg: ModelConfig, r: int = 8, targets=("q_proj", "k_proj", "v_proj", "o_proj")
) -> int:
    d, q, kv = (
        cfg.hidden_size,
        cfg.num_attention_heads * cfg.dim_head,
        cfg.num_key_value_heads * cfg.dim_head,
    )
    shapes = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d)}
    return cfg.num_hidden_layers * sum(r * (i + o) for i, o in (shapes[t] for t in targets))


def router_params(cfg: ModelConfig) -> int:
    return cfg.num_hidden_layers * (cfg.hidden_size + 1)


def skip_bound_speedup(cfg: ModelConfig, k: float) -> tuple[float, float]:
    """Best speedup from skipping k blocks: (decode, bandwidth-bound: weight bytes read per token;
    prefill, compute-bound on the blocks only). docs/reference.md §5."""
    per_block = proj_macs(cfg) + mlp_macs(cfg)  # parameters of one block's matmuls
    total = cfg.num_hidden_layers * per_block + cfg.vocab_size * cfg.hidden_size
    decode = total / (total - k * per_block)
    prefill = cfg.num_hidden_layers / (cfg.num_hidden_layers - k)
    return decode, prefill


def decode_bound(cfg: ModelConfig, k: float, device_type: str) -> tuple[float, str]:
    """The most that skipping k blocks can speed up batch-1 KV-cache decoding, and what bounds it.

    On a CPU decode streams the weights: the bound is the weight bytes read per token with and
    without the k blocks (skip_bound_speedup). On a GPU a small model's decode is launch-bound
    (each block is a fixed number of kernel launches, the weights are read in less time than the
    launches take), so a skipped block saves its launches: up to L / (L - k), more than the bytes
    bound. Which one holds depends on the model and the GPU, so there the higher one is the bound.
    """
    bytes_bound, blocks_bound = skip_bound_speedup(cfg, k)
    if device_type == "cuda":
        return max(bytes_bound, blocks_bound), "launches or weight bytes, the higher (GPU)"
    return bytes_bound, "weight bytes read per token (CPU)"
