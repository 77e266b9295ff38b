"""minroute: a from-scratch, parity-tested reference implementation of LayerRoute on Qwen2."""
from minroute.run.load import load_model, load_tokenizer
from minroute.core.model import CausalLM, KVCache, ModelConfig

__all__ = ["load_model", "load_tokenizer", "CausalLM", "ModelConfig", "KVCache"]
__version__ = "0.1.0"
