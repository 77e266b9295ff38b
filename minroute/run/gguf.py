"""GGUF (llama.cpp's file format) -> an ordinary Hugging Face checkpoint folder that `load_model`
reads.

    python -m minroute.run.gguf SmolLM2-135M-Instruct.Q4_1.gguf models/smollm2 [--overwrite]

The folder gets config.json, model.safetensors (fp32: the dequantised values exactly),
tokenizer.json, tokenizer_config.json (chat template, special tokens), generation_config.json (bos /
eos / pad ids) and conversion.json (what was converted: the source file's name, size and sha256, its
quantisation types). Reading and dequantising use ggml's own `gguf` package (`pip install
"minroute[gguf]"`): the file layout and the 30-odd block quantisation formats are llama.cpp's to
define, and its reader is maintained with them.

What the conversion undoes or rebuilds:
- Tensor names: llama.cpp's `blk.N.attn_q` etc. back to Hugging Face's
  `model.layers.N.self_attn.q_proj`; no `output.weight` means tied embeddings.
- Q/K rows: for `llama`, llama.cpp's converter permutes the rows of q_proj and k_proj (weights and
  biases) from HF's half-split RoPE layout to its interleaved one, head by head; `unpermute_qk`
  inverts it. `qwen2` files keep HF's layout (llama.cpp runs Qwen2 with NeoX-style RoPE).
- The tokenizer: a byte-level BPE from `tokenizer.ggml.tokens` / `merges`, with the pre-tokenizer
  that `tokenizer.ggml.pre` names (the split regex its merges were learned with; `PRE_TOKENIZERS`),
  control tokens as special added tokens and user-defined ones as plain added tokens, built with
  `tokenizers`.

Refused, with one `error:` line naming the file and the field: another architecture, a SentencePiece
(`llama`) tokenizer, a pre-tokenizer not listed here, RoPE scaling, a quantisation type the reader
cannot dequantise, a tensor this decoder has no place for, a truncated or non-GGUF file. An existing
OUT_DIR is refused unless --overwrite, which replaces only a folder this converter wrote; the folder
is written under a temporary name and renamed at the end, so a failed conversion leaves nothing
half-written.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from minroute.core.model import ModelConfig
from minroute.run.load import config_to_dict
from minroute.run.safety import ArgumentParser, MissingFile, UserError, run_cli, sha256_file

ARCHS = ("llama", "qwen2")
CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types
# `tokenizer.ggml.pre` -> how text is split before BPE (llama.cpp's llama-vocab.cpp regexes, as
# tokenizers objects)
_GPT2 = "gpt2"
# every digit alone, then GPT-2's split (StarCoder's tokenizer, SmolLM)
_DIGITS_GPT2 = "digits+gpt2"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
    "default": _GPT2,
    "gpt2": _GPT2,
    "smollm": _DIGITS_GPT2,
    "starcoder": _DIGITS_GPT2,
    "refact": _DIGITS_GPT2,
    "codeshell": _DIGITS_GPT2,
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "qwen2": _QWEN2,
}
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.bias": "mlp.down_proj.bias",
}
TOP_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's Q/K row permutation: within each head, rows (pair i, half h) go back to
    (half h, i).

    llama.cpp writes w.reshape(n_head, 2, D/2, ...).swapaxes(1, 2): the two RoPE halves interleaved.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFFile:
    """The fields and tensors of one GGUF file, read with ggml's reader; every read error names the
    file."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise MissingFile(f"{self.path}: no such file")
        try:
            from gguf import GGUFReader
        except ImportError:
            raise UserError(
                "reading GGUF files needs ggml's gguf package: pip install 'minroute[gguf]'"
            ) from None
        with open(self.path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise UserError(
                    f"{self.path}: not a GGUF file (it does not start with the magic 'GGUF')"
                )
        try:
            self.reader = GGUFReader(str(self.path))
        except Exception as e:  # a truncated file fails inside numpy's memmap / struct reads
            raise UserError(
                f"{self.path}: cannot read it as GGUF, it is truncated or corrupt "
                f"({type(e).__name__}: {e}); download it again"
            ) from None
        size = self.path.stat().st_size
        for t in self.reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise UserError(
                    f"{self.path}: tensor {t.name} ends at byte {t.data_offset + t.n_bytes} of a "
                    f"{size}-byte file: the file is truncated; download it again"
                )
        self.tensors = {t.name: t for t in self.reader.tensors}

    def get(self, key: str, default=None):
        field = self.reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as e:
            raise UserError(
                f"{self.path}: field '{key}' cannot be read ({e}); the file is corrupt"
            ) from None

    def need(self, key: str):
        value = self.get(key)
        if value is None:
            raise UserError(
                f"{self.path}: field '{key}' is missing; it is needed to build the model's config"
            )
        return value

    def dequantized(self, name: str) -> np.ndarray:
        """Tensor `name` as fp32, in PyTorch's (out, in) order."""
        from gguf.quants import dequantize

        t = self.tensors[name]
        try:
            # a copy, writable
            return np.array(dequantize(t.data, t.tensor_type), dtype=np.float32, order="C")
        except NotImplementedError:
            raise UserError(
                f"{self.path}: tensor {name} is stored as {t.tensor_type.name}, which ggml's gguf"
                " reader cannot dequantise; convert the original model with another quantisation"
                " (e.g. Q8_0, Q4_K, F16)"
            ) from None


def f32(x) -> float:
    """A GGUF float32 field as the shortest decimal that rounds to it (1e-05, not
    9.999999747378752e-06)."""
    return float(str(np.float32(x)))


def read_config(g: GGUFFile) -> ModelConfig:
    """config.json fields from the GGUF metadata (llama.cpp's `<arch>.*` keys)."""
    arch = g.need("general.architecture")
    if arch not in ARCHS:
        raise UserError(
            f"{g.path}: field 'general.architecture' is {arch!r}; minroute converts"
            f" {', '.join(ARCHS)}"
        )
    for key in (f"{arch}.rope.scaling.type", f"{arch}.rope.scaling.factor"):
        value = g.get(key)
        if value not in (None, "none", 1.0):
            raise UserError(
                f"{g.path}: field '{key}' is {value!r}; RoPE scaling is not supported (default RoPE"
                " only)"
            )
    if "rope_freqs.weight" in g.tensors:
        raise UserError(
            f"{g.path}: tensor rope_freqs.weight (Llama 3.1-style rope scaling) is not supported"
        )
    if g.get(f"{arch}.attention.sliding_window"):
        raise UserError(
            f"{g.path}: field '{arch}.attention.sliding_window' is set; sliding windows are not"
            " supported"
        )
    heads = int(g.need(f"{arch}.attention.head_count"))
    hidden = int(g.need(f"{arch}.embedding_length"))
    head_dim = int(g.get(f"{arch}.attention.key_length", hidden // heads))
    rope_dims = g.get(f"{arch}.rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise UserError(
            f"{g.path}: field '{arch}.rope.dimension_count' is {rope_dims}, head_dim is {head_dim};"
            " partial RoPE is not supported"
        )
    if "token_embd.weight" not in g.tensors:
        raise UserError(f"{g.path}: no tensor token_embd.weight; the file holds no token embedding")
    # ggml order (d, vocab): the rows the model really has
    vocab = int(g.tensors["token_embd.weight"].shape[-1])
    layers = int(g.need(f"{arch}.block_count"))
    bias = any(
        name.startswith("blk.") and name.endswith(".bias") and "attn" in name for name in g.tensors
    )
    mlp_bias = any(
        name.startswith("blk.") and name.endswith(".bias") and "ffn" in name for name in g.tensors
    )
    if arch == "qwen2" and mlp_bias:
        raise UserError(f"{g.path}: Qwen2 has no MLP biases, but the file holds ffn_*.bias tensors")
    return ModelConfig(
        model_type=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(g.need(f"{arch}.feed_forward_length")),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=int(g.get(f"{arch}.attention.head_count_kv", heads)),
        head_dim=head_dim if head_dim != hidden // heads else None,
        rope_theta=f32(g.get(f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=f32(g.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        tie_word_embeddings="output.weight" not in g.tensors,
        max_position_embeddings=int(g.get(f"{arch}.context_length", 2048)),
        torch_dtype="float32",
        bos_token_id=g.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=g.get("tokenizer.ggml.eos_token_id"),
        attention_bias=bias and arch == "llama",
        mlp_bias=mlp_bias,
    )


def read_tensors(g: GGUFFile, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Every tensor under its Hugging Face name, dequantised to fp32, Q/K rows back in HF's order;
    each shape checked against the config, and a tensor with no place in the decoder refused by
    name."""
    from minroute.core.model import CausalLM

    with torch.device("meta"):
        expected = {
            n: tuple(p.shape) for n, p in CausalLM(cfg).named_parameters(remove_duplicate=False)
        }
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    out = {}
    for name in g.tensors:
        if name in TOP_TENSORS:
            hf = TOP_TENSORS[name]
        else:
            parts = name.split(".", 2)
            if (
                len(parts) != 3
                or parts[0] != "blk"
                or not parts[1].isdigit()
                or parts[2] not in LAYER_TENSORS
            ):
                raise UserError(
                    f"{g.path}: tensor {name} has no place in a {cfg.model_type} decoder; "
                    "is this a plain text model?"
                )
            hf = f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}"
        if hf not in expected:
            raise UserError(
                f"{g.path}: tensor {name} ({hf}) is not part of the model its metadata describes"
            )
        w = g.dequantized(name)
        if w.shape != expected[hf]:
            raise UserError(
                f"{g.path}: tensor {name} has shape {w.shape}, the metadata implies {expected[hf]}"
            )
        if cfg.model_type == "llama" and name.endswith(("attn_q.weight", "attn_q.bias")):
            w = unpermute_qk(w, cfg.num_attention_heads)
        elif cfg.model_type == "llama" and name.endswith(("attn_k.weight", "attn_k.bias")):
            w = unpermute_qk(w, cfg.num_key_value_heads)
        out[hf] = torch.from_numpy(np.ascontiguousarray(w))  # (out, in), fp32
    missing = sorted(set(expected) - set(out))
    if missing:
        raise UserError(
            f"{g.path}: no tensor for {missing[:3]} ({len(missing)} in all); the file is incomplete"
        )
    return out


def build_tokenizer(g: GGUFFile):
    """(tokenizers.Tokenizer, tokenizer_config dict, generation_config dict) from the
    tokenizer.ggml.* fields."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
    )

    kind = g.need("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UserError(
            f"{g.path}: field 'tokenizer.ggml.model' is {kind!r}; only byte-level BPE ('gpt2')"
            " tokenizers are rebuilt (SentencePiece 'llama' vocabularies are not)"
        )
    pre = g.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise UserError(
            f"{g.path}: field 'tokenizer.ggml.pre' is {pre!r}; known pre-tokenizers: "
            f"{', '.join(sorted(PRE_TOKENIZERS))}"
        )
    tokens = list(g.need("tokenizer.ggml.tokens"))
    types = list(g.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in g.need("tokenizer.ggml.merges")]
    vocab = {}
    for i, t in enumerate(tokens):
        # a repeated token string keeps its first id (llama.cpp does the same lookup)
        vocab.setdefault(t, i)
    split = PRE_TOKENIZERS[pre]
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            ignore_merges=split == _LLAMA3,
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    if split == _GPT2:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == _DIGITS_GPT2:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if split == _QWEN2:
        tok.normalizer = normalizers.NFC()  # as Qwen2's own tokenizer.json
    tok.decoder = decoders.ByteLevel()
    special = [
        AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL
    ]
    plain = [
        AddedToken(t, special=False, normalized=False)
        for t, k in zip(tokens, types)
        if k == USER_DEFINED
    ]
    tok.add_special_tokens(special)
    tok.add_tokens(plain)

    def name_of(key):
        i = g.get(key)
        return None if i is None or not 0 <= int(i) < len(tokens) else tokens[int(i)]

    ids = {
        k: g.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding", "eot", "eom")
    }
    eos = [int(i) for i in dict.fromkeys([ids["eos"], ids["eot"], ids["eom"]]) if i is not None]
    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name_of("tokenizer.ggml.bos_token_id"),
        "eos_token": name_of("tokenizer.ggml.eos_token_id"),
        "pad_token": name_of("tokenizer.ggml.padding_token_id"),
        "unk_token": name_of("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": bool(g.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(g.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "chat_template": g.get("tokenizer.chat_template"),
        "model_max_length": int(g.get(f"{g.need('general.architecture')}.context_length", 2048)),
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "special": k == CONTROL,
                "normalized": False,
                "lstrip": False,
                "rstrip": False,
                "single_word": False,
            }
            for i, (t, k) in enumerate(zip(tokens, types))
            if k in (CONTROL, USER_DEFINED)
        },
    }
    gen = {
        "bos_token_id": ids["bos"],
        "eos_token_id": eos[0] if len(eos) == 1 else eos or None,
        "pad_token_id": ids["padding"],
    }
    return tok, tcfg, {k: v for k, v in gen.items() if v is not None}


def convert(src, out_dir, overwrite: bool = False, log=print) -> Path:
    """Write the checkpoint folder for GGUF file `src` at out_dir (atomically); return its path."""
    import time

    from safetensors.torch import save_file

    from minroute.run.checkpoint import file_mode, publish_folder

    t0 = time.time()
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise UserError(f"{out} is a file; give a folder to write the checkpoint into")
        if any(out.iterdir()) and not overwrite:
            raise UserError(
                f"{out} already exists; pass --overwrite to replace it, or choose another OUT_DIR"
            )
        if any(out.iterdir()) and not (out / "conversion.json").exists():
            raise UserError(
                f"{out} holds files minroute.run.gguf did not write (no conversion.json);"
                " --overwrite only replaces a folder this converter made. Choose another OUT_DIR"
            )
    g = GGUFFile(src)
    cfg = read_config(g)
    tok, tcfg, gen = build_tokenizer(g)
    if tok.get_vocab_size(with_added_tokens=True) > cfg.vocab_size:
        raise UserError(
            f"{g.path}: the tokenizer has {tok.get_vocab_size(with_added_tokens=True)} tokens, the "
            f"embedding {cfg.vocab_size} rows"
        )
    tensors = read_tensors(g, cfg)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.converting-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise UserError(f"{out}: cannot create it ({e.strerror})") from None
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        os.chmod(tmp / "model.safetensors", file_mode())  # safetensors writes 0600
        (tmp / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2, ensure_ascii=False))
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        quant = {}
        for t in g.tensors.values():
            quant[t.tensor_type.name] = quant.get(t.tensor_type.name, 0) + 1
        (tmp / "conversion.json").write_text(
            json.dumps(
                {
                    "converted_by": "python -m minroute.run.gguf",
                    "source": g.path.name,
                    "source_bytes": g.path.stat().st_size,
                    "source_sha256": sha256_file(g.path),
                    "general.name": g.get("general.name"),
                    "architecture": cfg.model_type,
                    "tensor_types": quant,
                    "stored_dtype": "float32",
                    "qk_rows_unpermuted": cfg.model_type == "llama",
                    "tokenizer_pre": g.get("tokenizer.ggml.pre", "default"),
                },
                indent=2,
            )
        )
        publish_folder(tmp, out)
    except OSError as e:
        raise UserError(
            f"{out}: writing the checkpoint failed ({e.strerror}); nothing was left behind"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = sum(t.numel() for t in tensors.values())
    log(
        f"converted {g.path} ({cfg.model_type}, {cfg.num_hidden_layers} blocks, d"
        f" {cfg.hidden_size}, {n:,} parameters,"
        f" {', '.join(f'{k} x{v}' for k, v in sorted(quant.items()))}) -> {out} in"
        f" {time.time() - t0:.1f}s"
    )
    return out


def main(argv=None):
    ap = ArgumentParser(
        prog="python -m minroute.run.gguf",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("gguf", help="the .gguf file")
    ap.add_argument("out", help="checkpoint folder to write (must not exist, unless --overwrite)")
    ap.add_argument(
        "--overwrite", action="store_true", help="replace OUT if this converter wrote it"
    )
    a = ap.parse_args(argv)
    convert(a.gguf, a.out, overwrite=a.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
