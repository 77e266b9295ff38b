"""The --demo's assets: a tiny random Qwen2 (its tokenizer trained on the demo corpus) and the demo
data set."""

from __future__ import annotations

from pathlib import Path

from minroute.run.load import load_tokenizer
from minroute.run.safety import sha256_file
from minroute.run.tiny import write_tiny_checkpoint

from .build import build

DEMO = Path(__file__).resolve().parent / "demo"  # the bundled demo corpus, in the Hub layout
DEMO_COUNTS = {"hermes": 40, "glaive": 40, "gsm8k": 40, "turing": None}
DEMO_ASSET_SEED = 42  # the demo model and data do not change with --seed


def prepare_demo(out: Path, args, record_as: Path | None = None):
    """Tiny random Qwen2 (tokenizer trained on the demo corpus) and the demo data in `out` (the run
    folder, or --demo-assets to share one model and data set between runs). Built once, with a fixed
    seed, so every seed of a demo study trains the same base model on the same data. `record_as`:
    the folder the assets will be moved to (the data's manifest names the model there), when they
    are built elsewhere first."""
    demo = DEMO
    model_dir, data_dir = out / "demo-model", out / "demo-data"
    if not (model_dir / "model.safetensors").exists():
        text = [p.read_text(encoding="utf-8", errors="replace") for p in demo.rglob("*.json")]
        write_tiny_checkpoint(
            model_dir,
            hidden_size=64,
            num_hidden_layers=8,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=192,
            seed=DEMO_ASSET_SEED,
            bpe_vocab=1024,
            init_std=0.1,  # 0.02 leaves the tied head too weak for LoRA to move the loss
            extra_text=[line for t in text for line in t.splitlines()],
        )
    if not (data_dir / "manifest.json").exists():
        tok = load_tokenizer(model_dir)
        build(
            data_dir,
            tok.tokenizer,
            str((record_as or out) / "demo-model"),
            source_dir=demo,
            counts=DEMO_COUNTS,
            chat_format=tok.chat,
            eval_counts={"tool": 10, "planning": 10},
            matched_pairs=10,
            seed=DEMO_ASSET_SEED,
            tokenizer_sha256=sha256_file(model_dir / "tokenizer.json"),
        )
    args.model, args.data = str(model_dir), str(data_dir)
