"""minroute: a from-scratch, parity-tested reference implementation of LayerRoute (input-conditioned
layer skipping).

The method is in minroute/core (read it in order: model, lora, router, update); minroute/fast holds
faster forms of some of its computations, each tested equal; minroute/run the machinery of a run;
minroute/evaluation the tables. What a script of your own needs is importable from here, and stays
here when the package is reorganised:

    from minroute import load_model, load_tokenizer, add_lora, LayerRoute
    model = add_lora(load_model("Qwen/Qwen2.5-0.5B-Instruct"))
    route = LayerRoute(model)                      # routers start with the middle band closed
    h, soft, hard = route.gated_hidden(ids, mask)  # training forward (straight-through gates)
    logits = route(ids, mask)                      # inference: closed blocks are not computed
"""

from minroute.core.lora import add_lora, lora_disabled, merge_lora, unmerge_lora
from minroute.core.model import CausalLM, KVCache, ModelConfig
from minroute.core.router import LayerRoute, middle_band, skip_percent, straight_through
from minroute.core.update import (
    AdamW,
    bce_gate_loss,
    gate_regulariser,
    get_lr,
    lm_loss_per_sample,
    micro_batch_loss,
)
from minroute.evaluation.bfcl import bfcl_check, bfcl_correct
from minroute.evaluation.generate import generate, generate_ids
from minroute.fast.packing import train_forward
from minroute.run.checkpoint import build_layerroute, load_layerroute
from minroute.run.load import load_model, load_tokenizer
from minroute.run.peft import load_peft_adapter, save_peft_adapter
from minroute.run.tiny import write_tiny_checkpoint

__all__ = [
    "AdamW",
    "CausalLM",
    "KVCache",
    "LayerRoute",
    "ModelConfig",
    "add_lora",
    "bce_gate_loss",
    "bfcl_check",
    "bfcl_correct",
    "build_layerroute",
    "gate_regulariser",
    "generate",
    "generate_ids",
    "get_lr",
    "lm_loss_per_sample",
    "load_layerroute",
    "load_model",
    "load_peft_adapter",
    "load_tokenizer",
    "lora_disabled",
    "merge_lora",
    "micro_batch_loss",
    "middle_band",
    "save_peft_adapter",
    "skip_percent",
    "straight_through",
    "train_forward",
    "unmerge_lora",
    "write_tiny_checkpoint",
]
__version__ = "0.1.0"
