"""A from-scratch decoder for the Qwen2 and Llama families (Qwen2.5-0.5B-Instruct, SmolLM2, TinyLlama, Llama 3
with default RoPE), in plain PyTorch.

The two architectures are one network: pre-norm blocks of RMSNorm, grouped-query attention with RoPE and a
SwiGLU MLP. They differ only in which linear layers carry a bias (Qwen2: q/k/v yes, o and MLP no; Llama:
all four attention projections per `attention_bias`, the MLP per `mlp_bias`) and in their config defaults;
`ModelConfig.from_dict` reads either `config.json` and refuses what this code does not implement (rope
scaling types, sliding windows, other activations or architectures) by name.

Parameter names are Hugging Face's (`model.embed_tokens`, `model.layers.N.self_attn.q_proj`,
`model.layers.N.mlp.gate_proj`, `model.norm`, `lm_head`), so loading the official safetensors is an
identity mapping plus tying. The numerics follow transformers' `modeling_qwen2.py` / `modeling_llama.py`
(REFERENCE.md §4), which agree line for line:

- RoPE: inv_freq = 1 / theta^(arange(0, D, 2) / D) in fp32, freqs = position * inv_freq in fp32,
  emb = cat(freqs, freqs) (halves, not interleaved), cos/sin cast to the activation dtype, and the
  rotation x*cos + rotate_half(x)*sin done in the activation dtype.
- RMSNorm: upcast to fp32, x * rsqrt(mean(x^2) + eps), cast back, *then* multiply by the weight.
- GQA by repeat_interleave of the kv heads; head_dim may differ from hidden / heads when the config says so.
- Attention through SDPA: causal always, padded keys masked, softmax scale head_dim^-1/2.
- SwiGLU MLP down(silu(gate(x)) * up(x)), final norm, lm_head (tied to embed_tokens when
  `tie_word_embeddings`).

With the same attention kernel this matches HF bitwise in fp32 and bf16 (tests/test_model.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .safety import UserError

ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


@dataclass
class ModelConfig:
    """Model shape and numerics; the defaults are Qwen2.5-0.5B-Instruct's."""

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

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """Build from a Hugging Face `config.json` dict (Qwen2 or Llama), written by transformers 4.x or 5.x.

        A missing optional field takes transformers' default for that architecture (e.g. tie_word_embeddings
        false, rope_theta 10000, rms_norm_eps 1e-6)."""
        model_type = d.get("model_type")
        if model_type not in ARCHITECTURES:
            raise UserError(f"{source}: field 'model_type' is {model_type!r}; minroute implements "
                            f"{' and '.join(sorted(ARCHITECTURES))} (Qwen2 / Llama-family decoders)")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        for name in required:
            if name not in d:
                raise UserError(f"{source}: required field '{name}' is missing; is this a {model_type} config.json?")
        if d.get("hidden_act", "silu") != "silu":
            raise UserError(f"{source}: field 'hidden_act' is {d['hidden_act']!r}; only 'silu' is supported")
        if d.get("use_sliding_window", False):
            raise UserError(f"{source}: field 'use_sliding_window' is true; sliding-window attention is not "
                            "supported (Qwen2.5 checkpoints ship it false)")
        if model_type == "llama" and d.get("sliding_window"):
            raise UserError(f"{source}: field 'sliding_window' is {d['sliding_window']!r}; sliding-window attention "
                            "is not supported")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise UserError(f"{source}: field 'rope_parameters' / 'rope_scaling' is not an object")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise UserError(f"{source}: field 'rope_type' is {rope_type!r}; only 'default' RoPE is supported "
                            "(no rope scaling: llama3, linear, dynamic, yarn, longrope)")
        if float(d.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))) != 1.0:
            raise UserError(f"{source}: field 'partial_rotary_factor' is not 1; partial RoPE is not supported")
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        eos = d.get("eos_token_id")
        known = {f.name for f in fields(cls)}
        skip = ("rope_theta", "eos_token_id", "model_type", "torch_dtype")
        kwargs = {k: v for k, v in d.items() if k in known and k not in skip}
        kwargs.setdefault("num_key_value_heads", d["num_attention_heads"])
        kwargs.setdefault("tie_word_embeddings", False)  # transformers' default for both architectures
        kwargs.setdefault("rms_norm_eps", 1e-6)
        kwargs.setdefault("max_position_embeddings", 32768 if model_type == "qwen2" else 2048)
        if model_type == "qwen2":
            kwargs.pop("attention_bias", None)
            kwargs.pop("mlp_bias", None)
        kwargs.setdefault("bos_token_id", None)
        kwargs["torch_dtype"] = d.get("dtype") or d.get("torch_dtype") or "float32"
        cfg = cls(**kwargs, rope_theta=float(theta), eos_token_id=eos[0] if isinstance(eos, list) else eos,
                  model_type=model_type)
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise UserError(f"{source}: num_attention_heads ({cfg.num_attention_heads}) must be a multiple of "
                            f"num_key_value_heads ({cfg.num_key_value_heads})")
        if cfg.dim_head % 2:
            raise UserError(f"{source}: head_dim {cfg.dim_head} is odd; RoPE rotates halves of an even head_dim")
        return cfg

    def to_dict(self) -> dict:
        """The `config.json` transformers writes for this shape (official layout of its model_type)."""
        d = asdict(self)
        d.update(architectures=[ARCHITECTURES[self.model_type]], hidden_act="silu", attention_dropout=0.0,
                 initializer_range=0.02, use_cache=True)
        if self.model_type == "qwen2":
            del d["attention_bias"], d["mlp_bias"]
            d.update(use_sliding_window=False, sliding_window=self.max_position_embeddings,
                     max_window_layers=self.num_hidden_layers)
        else:
            d.update(rope_scaling=None, pretraining_tp=1)
        if d["head_dim"] is None:
            del d["head_dim"]
        return d


# ----------------------------------------------------------------------------- numerics helpers

def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """(D/2,) fp32 1 / theta^(2i/D), computed on the CPU as HF does at init (a GPU pow may round differently)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
                 inv_freq: torch.Tensor | None = None):
    """cos, sin of shape (B, T, D) for integer positions (B, T); matches HF's default RoPE bitwise.

    inv_freq: rope_inv_freq(head_dim, theta) already on the positions' device (else computed here)."""
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
    """(B, Hkv, T, D) -> (B, Hkv * n_rep, T, D); each kv head repeated n_rep times in place (GQA)."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def attention_mask_4d(key_mask: torch.Tensor | None, q_len: int, past: int, device,
                      padded: bool | None = None) -> torch.Tensor | None:
    """Boolean (B, 1, T, past + T) mask, True = may attend: causal, and padded keys (key_mask 0) hidden.

    Returns None when plain causal attention is exact (no padding, and no cache or a single query),
    so SDPA can take its fused causal path. A padded query row would see no key at all (a NaN row in
    SDPA); it is allowed its own position, which only touches outputs at padded positions.
    padded: whether key_mask holds a 0, when the caller knows it on the host; None reads it from the device
    (a host sync).
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


class Segments:
    """Rows packed end to end along the sequence (padding dropped): a (1, N) call whose first lengths[0] tokens are
    row 0, the next lengths[1] row 1, and so on. Passed where a mask goes, it makes attention causal within each
    row and blind across rows: for right-padded rows that is exactly what the padding mask does to real tokens,
    minus the work on padding (matmuls, elementwise, and the masked attention's full square per row)."""

    def __init__(self, lengths: list[int]):
        self.lengths = list(lengths)
        ends = [sum(self.lengths[:i + 1]) for i in range(len(self.lengths))]
        self.bounds = [(e - n, e) for e, n in zip(ends, self.lengths)]  # [start, end) of each row

    def take(self, x: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """The tokens (dim 1) of these rows of a packed (1, N, ...) tensor, packed, in the order given."""
        return torch.cat([x[:, a:b] for a, b in (self.bounds[r] for r in rows)], dim=1)

    def subset(self, rows: list[int]) -> "Segments":
        return Segments([self.lengths[r] for r in rows])


# ----------------------------------------------------------------------------- KV cache

class KVCache:
    """Static key/value buffers for incremental decoding, one slot per layer.

    A layer's slot is allocated on its first write with room for `max_len` positions, for the rows of
    the batch that actually ran it (all rows for the plain model). A layer that no row ran keeps None:
    a skipped block stores nothing. `length` counts the positions written so far (shared by all
    layers); `gates` holds LayerRoute's per-sequence decisions, fixed at prefill.
    """

    def __init__(self, n_layers: int, max_len: int):
        self.max_len = max_len
        self.length = 0
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.gates: torch.Tensor | None = None  # (B, L) bool, set by a routed prefill
        self.rows: list[torch.Tensor | None] = [None] * n_layers  # batch rows held by each layer's slot

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (b, Hkv, T, D) at positions [length, length + T); return all keys/values so far."""
        b, h, t, d = k.shape
        end = self.length + t
        if end > self.max_len:
            raise ValueError(f"KVCache is full: {end} positions > max_len {self.max_len}")
        if self.k[layer] is None:
            self.k[layer] = k.new_empty(b, h, self.max_len, d)
            self.v[layer] = v.new_empty(b, h, self.max_len, d)
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)


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
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dim_head
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
        if isinstance(mask, Segments):  # packed rows: each one's own fused causal attention
            if cache is not None:
                raise ValueError("packed rows (Segments) take no KV cache: they are a training-forward layout")
            y = torch.cat([F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True,
                                                          enable_gqa=True) for a, b in mask.bounds], dim=2)
        elif mask is None:  # fused causal path; GQA handled inside SDPA
            y = F.scaled_dot_product_attention(q, k, v, is_causal=past == 0 and T > 1, enable_gqa=True)
        elif x.device.type == "cpu":  # CPU kernels take GQA with a mask too: no repeated k/v kept for backward
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        else:  # CUDA's fused kernels refuse GQA with a mask (math fallback): repeat the kv heads instead
            n_rep = self.n_head // self.n_kv
            y = F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H*D)
        return self.o_proj(y)


class SwiGLU(torch.autograd.Function):
    """silu(g) * u, bitwise as written out, but keeping only g and u for the backward (autograd would also
    keep silu(g), a third (T, intermediate) tensor per layer); silu' = s (1 + g (1 - s)), s = sigmoid(g), taken
    by torch's fused silu_backward (one pass over (T, intermediate) instead of six)."""

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return F.silu(g) * u

    @staticmethod
    def backward(ctx, grad):
        g, u = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad * u, g), grad * F.silu(g)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(SwiGLU.apply(self.gate_proj(x), self.up_proj(x)))


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
    """Qwen2ForCausalLM / LlamaForCausalLM. `model(input_ids, attention_mask)` returns fp32 logits (B, T, vocab).

    The forward is split into `prepare` (embeddings, RoPE, mask), the blocks, and `logits`, so that
    LayerRoute (router.py) can run the same pieces with its gates in between.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._inv_freq: dict[torch.device, torch.Tensor] = {}  # RoPE inverse frequencies per device, built once

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def prepare(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None,
                padded: bool | None = None):
        """Embeddings h (B, T, d), RoPE (cos, sin) and the 4-d attention mask for this call.

        attention_mask (B, past + T) marks real tokens with 1 (HF's convention). position_ids default
        to past + arange(T), as HF's forward does. padded: see attention_mask_4d (None: read on the device).
        RoPE's inverse frequencies are built once per device (on the CPU, as HF does, then copied).
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        h = self.model.embed_tokens(input_ids)  # (B, T, d)
        device = input_ids.device
        if device not in self._inv_freq:
            self._inv_freq[device] = rope_inv_freq(self.config.dim_head, self.config.rope_theta).to(device)
        cos, sin = rope_cos_sin(position_ids, self.config.dim_head, self.config.rope_theta, h.dtype,
                                self._inv_freq[device])
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, past + T)}")
        mask = attention_mask_4d(attention_mask, T, past, input_ids.device, padded)
        return h, cos, sin, mask

    def hidden(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None):
        """Final-norm hidden states (B, T, d) of the plain model (every block runs)."""
        h, cos, sin, mask = self.prepare(input_ids, attention_mask, position_ids, cache)
        for block in self.layers:
            h = block(h, cos, sin, mask, cache)
        if cache is not None:
            cache.length += input_ids.shape[1]
        return self.model.norm(h)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None):
        return self.lm_head(self.hidden(input_ids, attention_mask, position_ids, cache)).float()

    def new_cache(self, max_len: int) -> KVCache:
        return KVCache(self.config.num_hidden_layers, max_len)

    def num_params(self) -> int:
        """Distinct parameters (a tied lm_head counted once)."""
        return sum(p.numel() for p in self.parameters())


def init_weights(model: CausalLM, seed: int = 0, std: float = 0.02) -> CausalLM:
    """Random weights for tiny test/demo models: every tensor random, biases and norm weights included.

    Linear and embedding weights ~ N(0, std); biases ~ N(0, std); norm weights ~ 1 + N(0, 0.1).
    A default-initialised model (zero biases, unit norms) would hide a missing bias or norm in a test.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(std * noise)
    return model


def count_params_meta(cfg: ModelConfig) -> int:
    """Parameter count of a config without allocating its weights."""
    with torch.device("meta"):
        return CausalLM(cfg).num_params()


__all__ = ["ModelConfig", "CausalLM", "Block", "KVCache", "Segments", "init_weights", "rope_cos_sin",
           "rope_inv_freq", "apply_rope", "rotate_half", "repeat_kv", "attention_mask_4d", "count_params_meta"]
