"""Shared by the benchmarks: a real-shape (Qwen2.5-0.5B) checkpoint with random weights, and a batch."""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from minroute.model import ModelConfig  # noqa: E402
from minroute.tiny import write_tiny_checkpoint  # noqa: E402

REAL = ModelConfig()


def real_shape_checkpoint(path: Path, dtype=torch.bfloat16) -> Path:
    """Random weights at the 0.5B shape (494,032,768 parameters), written once in the official layout."""
    if not (path / "model.safetensors").exists():
        write_tiny_checkpoint(path, hidden_size=REAL.hidden_size, num_hidden_layers=REAL.num_hidden_layers,
                              num_attention_heads=REAL.num_attention_heads, num_key_value_heads=REAL.num_key_value_heads,
                              intermediate_size=REAL.intermediate_size, vocab_size=REAL.vocab_size, dtype=dtype)
    return path


def random_batch(B: int, T: int, vocab: int, seed: int = 0, pad: bool = True):
    """Token ids, right padding of varied lengths (the longest row is full), labels on real tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if pad:
        for b in range(1, B):
            mask[b, T - (b * T) // (2 * B):] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def describe(device) -> str:
    d = torch.device(device)
    name = torch.cuda.get_device_name(d) if d.type == "cuda" else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    return f"{d.type} ({name}), torch {torch.__version__}"
