"""minroute: a from-scratch, parity-tested reference implementation of LayerRoute on Qwen2."""
from .load import load_model, load_tokenizer
from .model import KVCache, Qwen2, Qwen2Config

__all__ = ["load_model", "load_tokenizer", "Qwen2", "Qwen2Config", "KVCache"]
__version__ = "0.1.0"
