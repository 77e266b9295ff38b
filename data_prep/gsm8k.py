"""openai/gsm8k (MIT), config `main`: parquet files with `question` and `answer` on the Hub; the
same rows as JSON lines in the original release (GitHub openai/grade-school-math,
`grade_school_math/data/{train,test}.jsonl`, read from `<source-dir>/gsm8k/`).

The answer keeps its <<expr=result>> calculator annotations and its final "#### N" line, as
published. Reading parquet needs pyarrow (`pip install "minroute[data]"`).
"""

from __future__ import annotations

import re
from pathlib import Path

from minroute.run.safety import UserError

from .records import PLANNING, Malformed, Sample, require

REPO = "openai/gsm8k"
REVISION = "cc7b047b6e5bb11b4f1af84efc572db110a51b3c"
TRAIN_FILE = "main/train-00000-of-00001.parquet"
TEST_FILE = "main/test-00000-of-00001.parquet"
RELEASE_TRAIN, RELEASE_TEST = (
    "gsm8k/train.jsonl",
    "gsm8k/test.jsonl",
)  # openai/grade-school-math's own JSON lines
FINAL_RE = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def read_parquet(path: Path, source: str) -> list:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            f"{source}: {path} is parquet, which needs pyarrow: pip install 'minroute[data]'"
        ) from None
    try:
        return pq.read_table(str(path)).to_pylist()
    except Exception as e:
        raise UserError(f"{source}: cannot read parquet file {path} ({e}); re-download it") from e


def final_answer(answer: str) -> str | None:
    """The number after '####', commas removed; None when the marker is missing."""
    m = FINAL_RE.search(answer)
    return m.group(1).replace(",", "") if m else None


def to_sample(record, row: int, source: str = "gsm8k", need_final: bool = False) -> Sample:
    q = require(record, "question", str).strip()
    a = require(record, "answer", str).strip()
    if not q or not a:
        raise Malformed("empty_field")
    final = final_answer(a)
    if need_final and final is None:
        raise Malformed("no_final_answer")
    messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return Sample(
        messages, [], PLANNING, source, row, {"final_answer": final} if final is not None else {}
    )
