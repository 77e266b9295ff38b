"""The decoder LayerRoute routes: Qwen2 and Llama-family causal LMs (Qwen2.5, SmolLM2, TinyLlama,
Llama 3 with default RoPE), in plain PyTorch, with a static KV cache.

Both architectures are one network: pre-norm blocks of RMSNorm, grouped-query attention with RoPE
and a SwiGLU MLP. They differ only in which linear layers carry a bias (Qwen2: q/k/v yes, o and MLP
no; Llama: attention per `attention_bias`, MLP per `mlp_bias`). Parameter names are Hugging Face's
(`model.embed_tokens`, `model.layers.N.self_attn.q_proj`, `model.layers.N.mlp.gate_proj`,
`model.norm`, `lm_head`), so loading the official safetensors is an identity mapping plus tying
(run/load.py). The numerics are transformers' `modeling_qwen2.py` / `modeling_llama.py`
(docs/reference.md §4), line for line:

- RoPE: inv_freq = 1 / theta^(arange(0, D, 2) / D) in fp32, freqs = position * inv_freq in fp32,
  emb = cat(freqs, freqs) (halves, not interleaved), cos/sin cast to the activation dtype, and the
  rotation x*cos + rotate_half(x)*sin done in the activation dtype.
- RMSNorm: upcast to fp32, x * rsqrt(mean(x^2) + eps), cast back, *then* multiply by the weight.
- GQA by repeating each kv head in place; head_dim may differ from hidden / heads when the config
  says so.
- Attention through SDPA: causal always, padded keys masked, softmax scale head_dim^-1/2.
- MLP down(silu(gate(x)) * up(x)); final norm; lm_head tied to embed_tokens when
  `tie_word_embeddings`.

With the same attention kernel this matches transformers bitwise in fp32 and bf16
(tests/test_model.py). `CausalLM` splits its forward into `prepare` (embeddings, RoPE, mask), the
blocks and the final norm, so that LayerRoute (core/router.py) runs the same pieces with a gate
between blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelConfig:
    """Model shape and numerics; the defaults are Qwen2.5-0.5B-Instruct's (run/load.py reads
    config.json)."""

    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True  # 0.5B: no lm_head.weight in the file
    max_position_embeddings: int = 32768
    torch_dtype: str = "bfloat16"  # dtype of the stored weights
    bos_token_id: int | None = 151643
    eos_token_id: int | None = 151645
    model_type: str = "qwen2"  # "qwen2" or "llama": which linear layers have a bias
    attention_bias: bool = False  # llama: bias on q/k/v/o (qwen2 ignores it: q/k/v always, o never)
    mlp_bias: bool = False  # llama: bias on gate/up/down (qwen2: never)

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type == "llama" and self.attention_bias


# ----------------------------------------------------------------------------- numerics helpers


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """(D/2,) fp32 1 / theta^(2i/D), computed on the CPU as HF does at init (a GPU pow may round
    differently)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))


def rope_cos_sin(position_ids, head_dim: int, theta: float, dtype: torch.dtype, inv_freq=None):
    """cos, sin of shape (B, T, D) for integer positions (B, T); matches HF's default RoPE bitwise.

    inv_freq: rope_inv_freq(head_dim, theta) already on the positions' device (else computed here).
    """
    if inv_freq is None:
        inv_freq = rope_inv_freq(head_dim, theta).to(position_ids.device)
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, D/2), fp32
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """cat(-x2, x1) over the last dim's halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) rotated by cos/sin (B, T, D), in x's dtype."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D)
    return x * cos + rotate_half(x) * sin


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B, Hkv * n_rep, T, D): each kv head repeated n_rep times in place."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def attention_mask_4d(key_mask, q_len: int, past: int, device, padded: bool | None = None):
    """Boolean (B, 1, T, past + T) mask, True = may attend: causal, and padded keys (key_mask 0)
    hidden.

    Returns None when plain causal attention is exact (no padding, and no cache or a single query),
    so SDPA can take its fused causal path. A padded query row would see no key at all (a NaN row in
    SDPA); it is allowed its own position, which only touches outputs at padded positions. padded:
    whether key_mask holds a 0, when the caller knows it on the host; None reads it from the device.
    """
    if key_mask is not None and (not padded if padded is not None else bool(key_mask.all())):
        key_mask = None
    if key_mask is None and (past == 0 or q_len == 1):
        return None
    k_len = past + q_len
    q_pos = torch.arange(past, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]  # (1, 1, T, K)
    if key_mask is not None:
        mask = mask & key_mask.bool()[:, None, None, :]
        mask = mask | (k_pos == q_pos)[None, None]
    return mask


# ----------------------------------------------------------------------------- KV cache


class KVCache:
    """Static key/value buffers for incremental decoding, one slot per layer.

    A layer's slot is allocated on its first write with room for `max_len` positions, for the rows
    of the batch that actually ran it (all rows for the plain model). A layer that no row ran keeps
    None: a skipped block stores nothing. `length` counts the positions written so far (shared by
    all layers); `gates` holds LayerRoute's per-sequence decisions and `rows` the rows each layer's
    slot holds, both fixed at prefill.
    """

    def __init__(self, n_layers: int, max_len: int):
        self.max_len = max_len
        self.length = 0
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.gates: torch.Tensor | None = None  # (B, L) bool, set by a routed prefill
        # batch rows held by each layer's slot
        self.rows: list[torch.Tensor | None] = [None] * n_layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (b, Hkv, T, D) at positions [length, length + T); return all keys/values so
        far."""
        b, h, t, d = k.shape
        end = self.length + t
        if end > self.max_len:
            raise ValueError(f"KVCache is full: {end} positions > max_len {self.max_len}")
        if self.k[layer] is None:
            self.k[layer] = k.new_empty(b, h, self.max_len, d)
            self.v[layer] = v.new_empty(b, h, self.max_len, d)
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


# ----------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)  # cast back, then scale (as HF)


class Attention(nn.Module):
    """Grouped-query attention with RoPE. `mask` is None (causal), a boolean (B, 1, T, K) mask, or a
    layout object with its own `attend(q, k, v)` (fast/packing.py's rows packed end to end)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.dim_head,
        )
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(self.layer_idx, k, v)  # (B, Hkv, past + T, D)
        if hasattr(mask, "attend"):  # a training-forward layout (no cache) with its own attention
            if cache is not None:
                raise ValueError(
                    f"{type(mask).__name__} takes no KV cache: it is a training-forward layout"
                )
            y = mask.attend(q, k, v)
        elif mask is None:  # fused causal path; GQA handled inside SDPA
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=past == 0 and T > 1, enable_gqa=True
            )
        # CPU kernels take GQA with a mask: no repeated k/v kept for backward
        elif x.device.type == "cpu":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        # CUDA's fused kernels refuse GQA with a mask (math fallback): repeat the kv heads instead
        else:
            n_rep = self.n_head // self.n_kv
            y = F.scaled_dot_product_attention(
                q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask
            )
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H*D)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    """One pre-norm decoder layer: h + Attn(norm(h)), then + MLP(norm(.))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h, cos, sin, mask, cache: KVCache | None = None):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class CausalLM(nn.Module):
    """Qwen2ForCausalLM / LlamaForCausalLM. `model(input_ids, attention_mask)` returns fp32 logits
    (B, T, vocab)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
                layers=nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers)),
                norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
            )
        )
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # RoPE inverse frequencies per device, built once
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def prepare(self, input_ids, attention_mask=None, position_ids=None, cache=None, padded=None):
        """Embeddings h (B, T, d), RoPE (cos, sin) and the 4-d attention mask for this call.

        attention_mask (B, past + T) marks real tokens with 1 (HF's convention). position_ids
        default to past + arange(T), as HF's forward does. padded: see attention_mask_4d.
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        device = input_ids.device
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=device).expand(B, T)
        h = self.model.embed_tokens(input_ids)  # (B, T, d)
        if device not in self._inv_freq:
            self._inv_freq[device] = rope_inv_freq(self.config.dim_head, self.config.rope_theta).to(
                device
            )
        theta, inv_freq = self.config.rope_theta, self._inv_freq[device]
        cos, sin = rope_cos_sin(position_ids, self.config.dim_head, theta, h.dtype, inv_freq)
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, past + T)}"
            )
        mask = attention_mask_4d(attention_mask, T, past, device, padded)
        return h, cos, sin, mask

    def hidden(
        self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None
    ):
        """Final-norm hidden states (B, T, d) of the plain model (every block runs)."""
        h, cos, sin, mask = self.prepare(input_ids, attention_mask, position_ids, cache)
        for block in self.layers:
            h = block(h, cos, sin, mask, cache)
        if cache is not None:
            cache.length += input_ids.shape[1]
        return self.model.norm(h)

    def forward(
        self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None
    ):
        return self.lm_head(self.hidden(input_ids, attention_mask, position_ids, cache)).float()

    def new_cache(self, max_len: int) -> KVCache:
        return KVCache(self.config.num_hidden_layers, max_len)

    def num_params(self) -> int:
        """Distinct parameters (a tied lm_head counted once)."""
        return sum(p.numel() for p in self.parameters())


def init_weights(model: CausalLM, seed: int = 0, std: float = 0.02) -> CausalLM:
    """Random weights for tiny test and demo models: every tensor random, biases and norm weights
    included.

    Linear and embedding weights ~ N(0, std); biases ~ N(0, std); norm weights ~ 1 + N(0, 0.1). A
    default initialised model (zero biases, unit norms) would hide a missing bias or norm in a
    parity test.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else std * noise)
    return model


def count_params_meta(cfg: ModelConfig) -> int:
    """Parameter count of a config without allocating its weights."""
    with torch.device("meta"):
        return CausalLM(cfg).num_params()
