"""minroute: a from-scratch, parity-tested reference implementation of LayerRoute (input-conditioned
layer skipping).

The method is in minroute/core (the README's reading path: router, update, then model and lora);
minroute/fast holds
faster forms of some of its computations, each tested equal; minroute/run the machinery of a run;
minroute/evaluation the tables. What a script of your own needs is importable from here, and stays
here when the package is reorganised:

    from minroute import load_model, load_tokenizer, add_lora, LayerRoute
    model = add_lora(load_model("Qwen/Qwen2.5-0.5B-Instruct"))
    route = LayerRoute(model)                      # routers start with the middle band closed
    h, soft, hard = route.gated_hidden(ids, mask)  # training forward (straight-through gates)
    logits = route(ids, mask)                      # inference: closed blocks are not computed

Each name is imported from its module on first use (so `python -m minroute.run.gguf` and the other
commands do not import themselves twice).
"""

import importlib

API = {
    # the method (minroute/core)
    "ModelConfig": "minroute.core.model",
    "CausalLM": "minroute.core.model",
    "KVCache": "minroute.core.model",
    "add_lora": "minroute.core.lora",
    "lora_disabled": "minroute.core.lora",
    "merge_lora": "minroute.core.lora",
    "unmerge_lora": "minroute.core.lora",
    "LayerRoute": "minroute.core.router",
    "middle_band": "minroute.core.router",
    "straight_through": "minroute.core.router",
    "skip_percent": "minroute.core.router",
    "lm_loss_per_sample": "minroute.core.update",
    "gate_regulariser": "minroute.core.update",
    "bce_gate_loss": "minroute.core.update",
    "micro_batch_loss": "minroute.core.update",
    "get_lr": "minroute.core.update",
    "AdamW": "minroute.core.update",
    # the fast training forward (= LayerRoute.gated_hidden)
    "train_forward": "minroute.fast.packing",
    # models, checkpoints, adapters
    "load_model": "minroute.run.load",
    "load_tokenizer": "minroute.run.load",
    "build_layerroute": "minroute.run.checkpoint",
    "load_layerroute": "minroute.run.checkpoint",
    "save_peft_adapter": "minroute.run.peft",
    "load_peft_adapter": "minroute.run.peft",
    "write_tiny_checkpoint": "minroute.run.tiny",
    # scoring
    "bfcl_check": "minroute.evaluation.bfcl",
    "bfcl_correct": "minroute.evaluation.bfcl",
}
__all__ = sorted(API)
__version__ = "0.1.0"


def __getattr__(name):
    if name in API:
        return getattr(importlib.import_module(API[name]), name)
    raise AttributeError(f"module 'minroute' has no attribute {name!r}")
