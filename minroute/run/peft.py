"""LoRA adapters in PEFT's format: what `peft.PeftModel.from_pretrained` reads, and PEFT adapters
read back.

A PEFT adapter folder holds adapter_config.json and adapter_model.safetensors, whose tensors are our
LoRA parameters renamed `base_model.model.<name>.lora_A.weight` / `.lora_B.weight` (the same (r, in)
and (out, r) matrices). Pickled adapter_model.bin files are not read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from minroute.core.lora import TARGETS, add_lora, lora_layers

PEFT_PREFIX = "base_model.model."


def save_peft_adapter(model: nn.Module, out_dir: str | os.PathLike, base_model: str):
    """Write adapter_config.json + adapter_model.safetensors that `peft.PeftModel.from_pretrained`
    loads onto `base_model` (a Hub id or a local folder: the model the adapter was trained on)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_peft_adapter: the model has no LoRA layers (call add_lora first)")
    first = next(iter(layers.values()))
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    targets = sorted({name.rsplit(".", 1)[-1] for name in layers})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
    }
    tensors = {}
    for name, m in layers.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().cpu().contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def load_peft_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Read a PEFT LoRA adapter (safetensors) into our model, adding LoRA layers if it has none."""
    d = Path(adapter_dir)
    cfg_path, w_path = d / "adapter_config.json", d / "adapter_model.safetensors"
    for p in (cfg_path, w_path):
        if not p.exists():
            raise FileNotFoundError(
                f"{p}: missing; a PEFT adapter folder holds adapter_config.json and "
                "adapter_model.safetensors (pickled adapter_model.bin is not read)"
            )
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(
            f"{cfg_path}: peft_type {cfg.get('peft_type')!r}; only LORA adapters are supported"
        )
    for flag in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if cfg.get(flag):
            raise ValueError(f"{cfg_path}: '{flag}' is true; only plain LoRA is supported")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    targets = cfg.get("target_modules") or TARGETS
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not lora_layers(model):
        add_lora(
            model, r=r, alpha=alpha, dropout=float(cfg.get("lora_dropout", 0.0)), targets=targets
        )
    layers = lora_layers(model)
    tensors = load_file(str(w_path))
    seen = set()
    for key, t in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        for part, attr in ((".lora_A.weight", "lora_A"), (".lora_B.weight", "lora_B")):  # noqa: B007
            if name.endswith(part):
                name = name[: -len(part)]
                break
        else:
            raise ValueError(f"{w_path}: unexpected tensor '{key}' (not a LoRA A/B weight)")
        if name not in layers:
            raise ValueError(
                f"{w_path}: tensor '{key}' has no matching LoRA layer '{name}' in the model"
            )
        layer = layers[name]
        if layer.r != r or layer.alpha != alpha:
            raise ValueError(
                f"{cfg_path}: r={r}, alpha={alpha}, but the model's LoRA has r={layer.r}, "
                f"alpha={layer.alpha}"
            )
        target = getattr(layer, attr)
        if t.shape != target.shape:
            raise ValueError(
                f"{w_path}: '{key}' has shape {tuple(t.shape)}, expected {tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(t)
        seen.add((name, attr))
    missing = [f"{n}.{a}" for n in layers for a in ("lora_A", "lora_B") if (n, a) not in seen]
    if missing:
        raise ValueError(f"{w_path}: no tensor for {missing[:4]} ({len(missing)} in all)")
    return model
