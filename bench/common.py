"""Shared by the benchmarks: real-shape checkpoints with random weights (Qwen2.5-0.5B,
SmolLM2-135M), a batch."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from minroute.core.model import ModelConfig  # noqa: E402
from minroute.run.tiny import write_tiny_checkpoint  # noqa: E402

REAL = ModelConfig()
# HuggingFaceTB/SmolLM2-135M(-Instruct): Llama architecture, no biases, tied embeddings
SMOLLM2 = ModelConfig(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    rope_theta=100000.0,
    model_type="llama",
)
SHAPES = {"qwen": REAL, "smollm2": SMOLLM2}
DEFAULT_CKPT = {"qwen": "/tmp/minroute-bench-0.5b", "smollm2": "/tmp/minroute-bench-smollm2-135m"}


def real_shape_checkpoint(path: Path, dtype=torch.bfloat16, shape: str = "qwen") -> Path:
    """Random weights at a real shape, written once in the official layout: 'qwen' (Qwen2.5-0.5B,
    494,032,768 parameters) or 'smollm2' (SmolLM2-135M, model_type llama without biases, 134,515,008
    parameters).
    """
    c = SHAPES[shape]
    if not (path / "model.safetensors").exists():
        write_tiny_checkpoint(
            path,
            hidden_size=c.hidden_size,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads,
            intermediate_size=c.intermediate_size,
            vocab_size=c.vocab_size,
            dtype=dtype,
            rope_theta=c.rope_theta,
            model_type=c.model_type,
            tie_word_embeddings=c.tie_word_embeddings,
        )
    return path


def random_batch(B: int, T: int, vocab: int, seed: int = 0, pad: bool = True):
    """Token ids, right padding of varied lengths (the longest row full), labels on real tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if pad:
        for b in range(1, B):
            mask[b, T - (b * T) // (2 * B) :] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def describe(device) -> str:
    d = torch.device(device)
    name = (
        torch.cuda.get_device_name(d)
        if d.type == "cuda"
        else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    )
    return f"{d.type} ({name}), torch {torch.__version__}"
