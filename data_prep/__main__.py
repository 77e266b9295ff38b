"""python -m data_prep --out DIR [--source-dir RAW] [--tokenizer PATH_OR_REPO] [--counts ...] [--eval-counts ...]"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from minroute.safety import UserError, nonneg_int, positive_int, run_cli, sha256_file

from .build import PAPER_COUNTS, PAPER_EVAL_COUNTS, build


def parse_counts(text: str | None, allowed, flag: str) -> dict:
    """'hermes=20,glaive=30' -> {'hermes': 20, 'glaive': 30}; 'turing=all' -> None (every usable row)."""
    out = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in allowed:
            raise UserError(f"{flag}: '{item}' is not NAME=N with NAME in {sorted(allowed)}")
        if value == "all":
            out[key] = None
        elif value.isdigit():
            out[key] = int(value)
        else:
            raise UserError(f"{flag}: '{item}': N must be a whole number or 'all'")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__)
    ap.add_argument("--out", required=True, help="output folder (token arrays + manifest.json)")
    ap.add_argument("--source-dir", help="raw files laid out as on the Hub: DIR/<repo name>/<file>; "
                                         "default: download the pinned revisions with huggingface_hub")
    ap.add_argument("--tokenizer", default="Qwen/Qwen2.5-0.5B-Instruct",
                    help="tokenizer: a model folder, a tokenizer.json, or a Hub repo id")
    ap.add_argument("--counts", help=f"rows per source, e.g. hermes=20,glaive=30 (default {PAPER_COUNTS}; "
                                     "'all' = every usable row)")
    ap.add_argument("--eval-counts", help=f"held-out eval rows, e.g. tool=10,planning=10 (default {PAPER_EVAL_COUNTS})")
    ap.add_argument("--matched-pairs", type=nonneg_int, default=50, help="pairs in the length-matched eval set")
    ap.add_argument("--max-len", type=positive_int, default=512, help="truncate samples to this many tokens")
    ap.add_argument("--loss-on", choices=["all", "assistant"], default="all",
                    help="tokens the LM loss counts: all real tokens (authors') or assistant outputs only")
    ap.add_argument("--seed", type=int, default=42, help="shuffle / split / eval-sampling seed")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing data folder at --out")
    a = ap.parse_args(argv)
    if a.max_len < 16:
        ap.error(f"--max-len {a.max_len}: too short to hold a chat prompt (use >= 16; the paper uses 512)")
    counts = parse_counts(a.counts, PAPER_COUNTS, "--counts")
    eval_counts = parse_counts(a.eval_counts, PAPER_EVAL_COUNTS, "--eval-counts")
    if a.source_dir and not Path(a.source_dir).is_dir():
        raise UserError(f"--source-dir {a.source_dir}: no such folder; it must hold the raw files as on the Hub "
                        "(DIR/<repo name>/<file>)")

    from minroute.load import load_tokenizer, resolve_dir
    tok = load_tokenizer(a.tokenizer)
    tok_file = resolve_dir(a.tokenizer) / "tokenizer.json"
    try:
        build(Path(a.out), tok.tokenizer, a.tokenizer, tokenizer_sha256=sha256_file(tok_file),
              source_dir=a.source_dir, counts=counts, eval_counts=eval_counts, matched_pairs=a.matched_pairs,
              seed=a.seed, max_len=a.max_len, loss_on=a.loss_on, overwrite=a.overwrite, chat_format=tok.chat)
    except ImportError as e:  # pyarrow, for GSM8K's parquet files
        raise UserError(f"{e}; install it with pip install 'minroute[data]'") from None
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
