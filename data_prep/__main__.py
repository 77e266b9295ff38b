"""python -m data_prep --out DIR [--source-dir RAW] [--tokenizer PATH_OR_REPO] [--sources ... |
--counts ...]

    python -m data_prep --out data/agentic                       # the paper's four sources
    python -m data_prep --source-dir ../shared/data --sources bfcl=2000,gsm8k=2000 \\
        --tokenizer models/smollm2 \\
        --out data/bfcl-gsm8k                                                    # exactly these two
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from minroute.run.safety import (
    ArgumentParser,
    UserError,
    nonneg_int,
    positive_int,
    run_cli,
    sha256_file,
)

from .build import CUT_ROWS, MULTI_TURN, PAPER_COUNTS, PAPER_EVAL_COUNTS, SOURCES, build


def parse_counts(text: str | None, allowed, flag: str) -> dict:
    """'hermes=20,glaive=30' -> {'hermes': 20, 'glaive': 30}; 'turing=all' -> None (every usable
    row)."""
    out = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.strip().partition("=")
        if not sep or key not in allowed:
            raise UserError(f"{flag}: '{item}' is not NAME=N with NAME in {sorted(allowed)}")
        if key in out:
            raise UserError(f"{flag}: '{key}' is given twice")
        if value == "all":
            out[key] = None
        elif value.isascii() and value.isdigit() and len(value) <= 9:
            out[key] = int(value)
        else:
            raise UserError(
                f"{flag}: '{item}': N must be a whole number (at most 9 digits) or 'all'"
            )
    return out


def main(argv=None):
    ap = ArgumentParser(
        prog="python -m data_prep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--out", required=True, help="output folder (token arrays + manifest.json)")
    ap.add_argument(
        "--source-dir",
        help=(
            "raw files laid out as on the Hub: DIR/<repo name>/<file> (GSM8K also as "
            "DIR/gsm8k/train.jsonl, BFCL as DIR/bfcl-v4/); default: download the pinned "
            "revisions with huggingface_hub"
        ),
    )
    ap.add_argument(
        "--tokenizer",
        default="Qwen/Qwen2.5-0.5B-Instruct",
        help="tokenizer: a model folder, a tokenizer.json, or a Hub repo id",
    )
    ap.add_argument(
        "--sources",
        help=(
            f"the mixture, exactly: NAME=N,... with NAME in {', '.join(SOURCES)} "
            "('all' = every usable row); sources not named are not read"
        ),
    )
    ap.add_argument(
        "--counts",
        help=(
            "the paper's mixture with these counts changed, e.g. glaive=30 (default "
            f"{PAPER_COUNTS})"
        ),
    )
    ap.add_argument(
        "--eval-counts",
        help=f"held-out eval rows, e.g. tool=10,planning=10 (default {PAPER_EVAL_COUNTS})",
    )
    ap.add_argument(
        "--matched-pairs", type=nonneg_int, default=50, help="pairs in each length-matched eval set"
    )
    ap.add_argument(
        "--max-len", type=positive_int, default=512, help="truncate samples to this many tokens"
    )
    ap.add_argument(
        "--cut-rows",
        choices=CUT_ROWS,
        default="keep",
        help=(
            "a training row whose response the truncation cuts: keep it (the paper's truncation) or"
            " drop it (the next row takes its place)"
        ),
    )
    ap.add_argument(
        "--multi-turn",
        choices=MULTI_TURN,
        default="cut",
        help=(
            "cut: each row ends at its routed response (a tool row at its first call), so one"
            " routing decision covers one response; whole: whole conversations (the authors')"
        ),
    )
    ap.add_argument(
        "--loss-on",
        choices=["all", "assistant"],
        default="all",
        help="tokens the LM loss counts: all real tokens (authors') or assistant outputs only",
    )
    ap.add_argument(
        "--seed", type=nonneg_int, default=42, help="shuffle / split / eval-sampling seed"
    )
    ap.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a data folder that data_prep built at --out",
    )
    a = ap.parse_args(argv)
    if a.max_len < 16:
        ap.error(
            f"--max-len {a.max_len}: too short to hold a chat prompt (use >= 16; the paper uses"
            " 512)"
        )
    if a.max_len > 1 << 20:
        ap.error(f"--max-len {a.max_len}: larger than any model's context")
    if a.sources and a.counts:
        ap.error("--sources names the mixture exactly; --counts recounts the paper's; give one")
    sources = parse_counts(a.sources, SOURCES, "--sources") if a.sources else None
    if a.sources is not None and not sources:
        ap.error("--sources: name at least one source")
    counts = parse_counts(a.counts, PAPER_COUNTS, "--counts")
    eval_counts = parse_counts(a.eval_counts, PAPER_EVAL_COUNTS, "--eval-counts")
    if any(v is None for v in eval_counts.values()):
        raise UserError("--eval-counts: give a number of rows, not 'all'")
    if a.source_dir and not Path(a.source_dir).is_dir():
        raise UserError(
            f"--source-dir {a.source_dir}: no such folder; it must hold the raw files as on the Hub"
            " (DIR/<repo name>/<file>)"
        )

    from minroute.run.load import load_tokenizer, resolve_dir

    tok = load_tokenizer(a.tokenizer)
    tok_file = resolve_dir(a.tokenizer) / "tokenizer.json"
    try:
        build(
            Path(a.out),
            tok.tokenizer,
            a.tokenizer,
            tokenizer_sha256=sha256_file(tok_file),
            source_dir=a.source_dir,
            counts=counts,
            eval_counts=eval_counts,
            matched_pairs=a.matched_pairs,
            seed=a.seed,
            max_len=a.max_len,
            loss_on=a.loss_on,
            overwrite=a.overwrite,
            chat_format=tok.chat,
            sources=sources,
            cut_rows=a.cut_rows,
            multi_turn=a.multi_turn,
        )
    except ImportError as e:  # pyarrow, for GSM8K's parquet files
        raise UserError(f"{e}; install it with pip install 'minroute[data]'") from None
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
