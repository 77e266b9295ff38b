"""Load Qwen2 / Llama checkpoints and tokenizers from a local directory or the Hugging Face Hub.

Only `config.json`, JSON tokenizer files and safetensors are read: nothing is ever unpickled and no
code from a model repository runs. The model is built on the meta device and its parameters are
assigned straight from the safetensors file(s) (one file, or shards listed in
`model.safetensors.index.json`), strictly: a missing, unexpected or misshapen tensor is an error
that names the tensor and the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open

from minroute.core.model import CausalLM, ModelConfig
from minroute.run.chat import ChatFormat
from minroute.run.safety import MissingFile, UserError

ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
# Known-good Hub revisions; a repo id not listed here (e.g. HuggingFaceTB/SmolLM2-135M-Instruct,
# whose commit could not be verified offline) is fetched at the revision asked for (or main), and
# the commit downloaded is recorded.
PINNED_REVISIONS = {DEFAULT_MODEL: "7ae557604adf67be50417f59c2c2f167def9a775"}
MODEL_FILES = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "LICENSE",
]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dir(path_or_repo_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory as is; otherwise download the model files of a Hub repo and return their
    folder.

    The local Hugging Face cache is checked first by `snapshot_download`; with HF_HUB_OFFLINE=1 a
    repo that is not cached raises a clear error instead of hanging on the network.
    """
    path = Path(path_or_repo_id)
    if path.is_file() and path.name == "tokenizer.json":
        return path.parent
    if path.is_dir():
        return path
    repo_id = str(path_or_repo_id)
    if os.path.isabs(repo_id) or repo_id.startswith(".") or repo_id.count("/") != 1:
        raise MissingFile(
            f"{repo_id}: no such directory, and not a Hub repo id of the form 'owner/name'"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    revision = revision or PINNED_REVISIONS.get(repo_id)
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=MODEL_FILES))
    except (LocalEntryNotFoundError, OSError) as e:
        raise MissingFile(
            f"could not get '{repo_id}' (revision {revision or 'main'}) from the Hugging Face Hub"
            f" and it is not in the local cache ({type(e).__name__}: {e}). Connect to the Hub"
            " (HF_HUB_OFFLINE unset), or pass a local directory holding config.json and"
            " model.safetensors"
        ) from e


def hub_revision(model_dir) -> str | None:
    """The Hub commit a model folder was downloaded at (`<cache>/snapshots/<commit>/`); None for a
    local folder.

    Recorded by train.py and data_prep for repos without a pinned revision (e.g. SmolLM2), so a run
    says exactly which weights it used."""
    parts = Path(model_dir).resolve().parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise MissingFile(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from e


def load_config(model_dir: Path) -> ModelConfig:
    path = model_dir / "config.json"
    if not path.exists():
        raise MissingFile(
            f"{path}: no config.json in {model_dir}; point to a Hugging Face model directory "
            "(config.json + model.safetensors) or a Hub repo id"
        )
    return config_from_dict(read_json(path), source=str(path))


def config_from_dict(d: dict, source: str = "config.json") -> ModelConfig:
    """Build from a Hugging Face `config.json` dict (Qwen2 or Llama), written by transformers 4.x or
    5.x.

    A missing optional field takes transformers' default for that architecture (e.g.
    tie_word_embeddings false, rope_theta 10000, rms_norm_eps 1e-6)."""
    model_type = d.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"{source}: field 'model_type' is {model_type!r}; minroute implements "
            f"{' and '.join(sorted(ARCHITECTURES))} (Qwen2 / Llama-family decoders)"
        )
    required = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    )
    for name in required:
        if name not in d:
            raise UserError(
                f"{source}: required field '{name}' is missing; is this a {model_type} config.json?"
            )
    if d.get("hidden_act", "silu") != "silu":
        raise UserError(
            f"{source}: field 'hidden_act' is {d['hidden_act']!r}; only 'silu' is supported"
        )
    if d.get("use_sliding_window", False):
        raise UserError(
            f"{source}: field 'use_sliding_window' is true; sliding-window attention is not "
            "supported (Qwen2.5 checkpoints ship it false)"
        )
    if model_type == "llama" and d.get("sliding_window"):
        raise UserError(
            f"{source}: field 'sliding_window' is {d['sliding_window']!r}; sliding-window attention"
            " is not supported"
        )
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise UserError(f"{source}: field 'rope_parameters' / 'rope_scaling' is not an object")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise UserError(
            f"{source}: field 'rope_type' is {rope_type!r}; only 'default' RoPE is supported "
            "(no rope scaling: llama3, linear, dynamic, yarn, longrope)"
        )
    if float(d.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))) != 1.0:
        raise UserError(
            f"{source}: field 'partial_rotary_factor' is not 1; partial RoPE is not supported"
        )
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    eos = d.get("eos_token_id")
    known = {f.name for f in fields(ModelConfig)}
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
    cfg = ModelConfig(
        **kwargs,
        rope_theta=float(theta),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        model_type=model_type,
    )
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise UserError(
            f"{source}: num_attention_heads ({cfg.num_attention_heads}) must be a multiple of "
            f"num_key_value_heads ({cfg.num_key_value_heads})"
        )
    if cfg.dim_head % 2:
        raise UserError(
            f"{source}: head_dim {cfg.dim_head} is odd; RoPE rotates halves of an even head_dim"
        )
    return cfg


def config_to_dict(cfg: ModelConfig) -> dict:
    """The `config.json` transformers writes for this shape (official layout of its model_type)."""
    d = asdict(cfg)
    d.update(
        architectures=[ARCHITECTURES[cfg.model_type]],
        hidden_act="silu",
        attention_dropout=0.0,
        initializer_range=0.02,
        use_cache=True,
    )
    if cfg.model_type == "qwen2":
        del d["attention_bias"], d["mlp_bias"]
        d.update(
            use_sliding_window=False,
            sliding_window=cfg.max_position_embeddings,
            max_window_layers=cfg.num_hidden_layers,
        )
    else:
        d.update(rope_scaling=None, pretraining_tp=1)
    if d["head_dim"] is None:
        del d["head_dim"]
    return d


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files: the shards of the index if there is one, else model.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index}: no 'weight_map' object")
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.exists():
                raise MissingFile(
                    f"{f}: shard listed in {index.name} is missing; re-download the model"
                )
        return files
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    others = sorted(model_dir.glob("*.safetensors"))
    if others:
        return others
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UserError(
            f"{model_dir}: only pickle weights ({', '.join(pickles)}); minroute loads safetensors"
            " only and never unpickles. Convert them with transformers' save_pretrained(...,"
            " safe_serialization=True) in a trusted environment, or download the safetensors files"
        )
    raise MissingFile(f"{model_dir}: no model.safetensors (or sharded *.safetensors with an index)")


def read_safetensors(files: list[Path], device="cpu") -> dict[str, tuple[torch.Tensor, Path]]:
    """Every tensor of the files, with the file it came from."""
    out = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device=str(device)) as sf:
                for name in sf.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    if name in out:
                        raise UserError(f"{f}: tensor '{name}' also appears in {out[name][1]}")
                    out[name] = (sf.get_tensor(name), f)
        except ValueError:
            raise
        # safetensors raises its own error type for truncated/corrupt headers and data
        except Exception as e:
            raise UserError(
                f"{f}: cannot read safetensors file, it is truncated or corrupt ({e}); "
                "re-download or re-save it"
            ) from e
    return out


def load_model(
    path_or_repo_id: str | os.PathLike = DEFAULT_MODEL,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    revision: str | None = None,
) -> CausalLM:
    """Build the model (Qwen2 or Llama, per config.json) from a checkpoint directory or Hub repo id,
    strictly, on `device` in `dtype`.

    dtype None keeps the stored dtype (config's torch_dtype/dtype). The returned model is in eval
    mode with requires_grad off for every parameter (the backbone is frozen in LayerRoute).
    """
    model_dir = resolve_dir(path_or_repo_id, revision)
    cfg = load_config(model_dir)
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    tensors = read_safetensors(safetensors_files(model_dir), device=device)
    with torch.device("meta"):
        model = CausalLM(cfg)
    expected = {name: p.shape for name, p in model.named_parameters(remove_duplicate=False)}
    if cfg.tie_word_embeddings and "lm_head.weight" not in tensors:
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    where = ", ".join(sorted({str(f) for _, f in tensors.values()})) or str(model_dir)
    if missing:
        raise UserError(
            f"{where}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}"
            f" ({len(missing)} in all) for a {cfg.num_hidden_layers}-layer {cfg.model_type} model"
            " per config.json"
        )
    if unexpected:
        raise UserError(
            f"{unexpected[0]} in {tensors[unexpected[0]][1]}: unexpected tensor ({len(unexpected)}"
            f" in all: {unexpected[:5]}); does config.json describe this checkpoint (model_type"
            f" {cfg.model_type!r}, attention_bias, mlp_bias)?"
        )
    state = {}
    for name, shape in expected.items():
        t, f = tensors[name]
        if t.shape != shape:
            raise UserError(
                f"{name} in {f}: shape {tuple(t.shape)}, but config.json implies {tuple(shape)}"
            )
        state[name] = t.to(dtype) if dtype is not None else t
    # one tensor for both, as HF ties them (a stored lm_head copy is ignored)
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval().requires_grad_(False)


class LoadedTokenizer(NamedTuple):
    """A `tokenizers.Tokenizer` with the ids generation needs and the model's chat conventions."""

    tokenizer: object
    eos_ids: list[int]  # stop on any of these (Qwen2.5-Instruct: <|im_end|>, <|endoftext|>)
    pad_id: int
    chat: ChatFormat  # default system prompt etc., from the model's own chat template


def load_tokenizer(
    path_or_repo_id: str | os.PathLike = DEFAULT_MODEL, revision: str | None = None
) -> LoadedTokenizer:
    """(tokenizer, eos_ids, pad_id, chat) from tokenizer.json plus generation_config.json /
    tokenizer_config.json (and chat_template.jinja, where transformers 5 saves the template): the
    checkpoint's own stop tokens, pad id and chat template. Accepts a model directory, a path to a
    tokenizer.json, or a Hub repo id.
    """
    from tokenizers import Tokenizer

    model_dir = resolve_dir(path_or_repo_id, revision)
    path = model_dir / "tokenizer.json"
    if not path.exists():
        raise MissingFile(f"{path}: no tokenizer.json in {model_dir}")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:
        raise UserError(f"{path}: not a valid tokenizers JSON file ({e})") from e

    def token_id(value, field, source):
        if isinstance(value, dict):  # {"content": "<|im_end|>", ...}
            value = value.get("content")
        if isinstance(value, int):
            return value
        i = tok.token_to_id(value) if isinstance(value, str) else None
        if i is None:
            raise UserError(f"{source}: field '{field}' = {value!r} is not a token of {path}")
        return i

    gen = (
        read_json(model_dir / "generation_config.json")
        if (model_dir / "generation_config.json").exists()
        else {}
    )
    tcfg = (
        read_json(model_dir / "tokenizer_config.json")
        if (model_dir / "tokenizer_config.json").exists()
        else {}
    )
    eos = gen.get("eos_token_id")
    if eos is not None:
        eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    elif tcfg.get("eos_token") is not None:
        eos_ids = [token_id(tcfg["eos_token"], "eos_token", model_dir / "tokenizer_config.json")]
    else:
        eos_ids = [
            i
            for i in (tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>"))
            if i is not None
        ]
    if not eos_ids:
        raise UserError(
            f"{model_dir}: no eos id in generation_config.json or tokenizer_config.json, and the "
            "tokenizer has no <|im_end|> / <|endoftext|> token"
        )
    if gen.get("pad_token_id") is not None:
        pad_id = int(gen["pad_token_id"])
    elif tcfg.get("pad_token") is not None:
        pad_id = token_id(tcfg["pad_token"], "pad_token", model_dir / "tokenizer_config.json")
    else:
        pad_id = eos_ids[-1]
    template = tcfg.get("chat_template")
    if template is None and (model_dir / "chat_template.jinja").exists():
        template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    chat = ChatFormat.from_template(template, str(model_dir / "tokenizer_config.json"))
    return LoadedTokenizer(tok, eos_ids, pad_id, chat)
