"""Write a tiny random Qwen2 (or Llama) checkpoint in the official Hugging Face layout (no
transformers needed).

The folder holds `config.json`, `generation_config.json`, `model.safetensors`, `tokenizer.json` and
`tokenizer_config.json`, exactly as Qwen/Qwen2.5-0.5B-Instruct's, at a small shape. Tests and the
offline demo use it wherever the real 988 MB model would be loaded.

Tokenizer: a copy of a real Qwen tokenizer.json when one is given (then vocab_size is 151,936 as in
the real model); otherwise a small byte-level BPE trained with `tokenizers` on the bundled text,
carrying Qwen's special tokens <|endoftext|>, <|im_start|>, <|im_end|> and its added <tool_call>,
</tool_call>.

    python -m minroute.run.tiny OUT_DIR [--tokenizer path/to/tokenizer.json] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from minroute.core.model import CausalLM, ModelConfig, init_weights
from minroute.run.load import config_to_dict

CORPUS = Path(__file__).with_name("assets") / "tiny_corpus.txt"
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
]  # special in Qwen: never split, skipped on decode
ADDED_TOKENS = ["<tool_call>", "</tool_call>"]  # added but not special in Qwen
# a minimal ChatML template with Qwen2.5's default system prompt (what ChatFormat reads; tools
# render the Qwen way)
CHAT_TEMPLATE = (
    r"{%- for message in messages %}{%- if loop.first and message['role'] != 'system' %}{{-"
    r" '<|im_start|>"
    r"system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n'"
    r" }}{%- endif "
    r"%}{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{%-"
    r" endfor %}"
    r"{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


def train_tiny_tokenizer(vocab_size: int = 512, extra_text: list[str] | None = None):
    """A byte-level BPE on the bundled corpus (plus extra_text), with Qwen's special tokens
    appended."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS) - len(ADDED_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = CORPUS.read_text(encoding="utf-8").splitlines() + list(extra_text or [])
    tok.train_from_iterator(lines, trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.add_tokens(ADDED_TOKENS)
    return tok


def write_tiny_checkpoint(
    out_dir,
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = True,
    rope_theta: float = 1_000_000.0,
    seed: int = 0,
    tokenizer: str | Path | None = None,
    vocab_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    bpe_vocab: int = 512,
    extra_text: list[str] | None = None,
    init_std: float = 0.02,
    model_type: str = "qwen2",
    attention_bias: bool = False,
    mlp_bias: bool = False,
    head_dim: int | None = None,
) -> Path:
    """Write the checkpoint folder and return its path. All weights random (biases and norms
    included)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # the real Qwen tokenizer (+ its tokenizer_config.json with the chat template)
    if tokenizer is not None:
        src = Path(tokenizer)
        src = src / "tokenizer.json" if src.is_dir() else src
        shutil.copyfile(src, out / "tokenizer.json")
        if (src.parent / "tokenizer_config.json").exists():
            shutil.copyfile(src.parent / "tokenizer_config.json", out / "tokenizer_config.json")
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(out / "tokenizer.json"))
        n_tokens = tok.get_vocab_size(with_added_tokens=True)
        vocab_size = vocab_size or max(151936, n_tokens)
    else:
        tok = train_tiny_tokenizer(bpe_vocab, extra_text)
        tok.save(str(out / "tokenizer.json"))
        n_tokens = tok.get_vocab_size(with_added_tokens=True)
        # round up, like the real model's padded vocab
        vocab_size = vocab_size or -(-n_tokens // 64) * 64
    if vocab_size < n_tokens:
        raise ValueError(
            f"vocab_size {vocab_size} is smaller than the tokenizer's {n_tokens} tokens"
        )
    endoftext, im_end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
    if not (out / "tokenizer_config.json").exists():
        (out / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "Qwen2Tokenizer",
                    "eos_token": "<|im_end|>",
                    "pad_token": "<|endoftext|>",
                    "bos_token": None,
                    "model_max_length": 32768,
                    "clean_up_tokenization_spaces": False,
                    "errors": "replace",
                    "split_special_tokens": False,
                    "chat_template": CHAT_TEMPLATE,
                },
                indent=2,
            )
        )

    cfg = ModelConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        rope_theta=rope_theta,
        tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=4096,
        torch_dtype=str(dtype).removeprefix("torch."),
        bos_token_id=endoftext,
        eos_token_id=im_end,
        model_type=model_type,
        attention_bias=attention_bias,
        mlp_bias=mlp_bias,
        head_dim=head_dim,
    )
    model = init_weights(CausalLM(cfg), seed=seed, std=init_std).to(dtype)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    if tie_word_embeddings:
        tensors.pop("lm_head.weight")  # tied: not stored, as in the official 0.5B file
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
    (out / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": endoftext,
                "eos_token_id": [im_end, endoftext],
                "pad_token_id": endoftext,
                "do_sample": True,
                "temperature": 0.7,
                "top_p": 0.8,
                "top_k": 20,
                "repetition_penalty": 1.1,
            },
            indent=2,
        )
    )
    return out


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("out", help="folder to write")
    ap.add_argument(
        "--tokenizer", help="a real Qwen tokenizer.json to copy (default: train a tiny BPE)"
    )
    ap.add_argument("--layers", type=int, default=4, help="num_hidden_layers")
    ap.add_argument("--hidden", type=int, default=64, help="hidden_size")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(
        write_tiny_checkpoint(
            a.out,
            num_hidden_layers=a.layers,
            hidden_size=a.hidden,
            seed=a.seed,
            tokenizer=a.tokenizer,
        )
    )


if __name__ == "__main__":
    main()
