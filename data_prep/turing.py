"""TuringEnterprises/Turing-Open-Reasoning (MIT): STEM questions with worked answers.

Records carry `conversation_id`, `domain`, `sub-domain` (or `sub_domain`), `question`, `answer` and
an optional `code`; the file is a JSON array or JSON lines (both accepted). question -> user, answer
-> assistant.
"""

from __future__ import annotations

from .records import PLANNING, Malformed, Sample, require

REPO = "TuringEnterprises/Turing-Open-Reasoning"
# no commit of this repo could be verified offline; the manifest records the one downloaded
REVISION = None
FILE = "Computational_STEM_QA_Dataset.json"


def to_sample(record, row: int, source: str = "turing") -> Sample:
    q = require(record, "question", str).strip()
    a = require(record, "answer", str).strip()
    if not q or not a:
        raise Malformed("empty_field")
    meta = {
        "conversation_id": record.get("conversation_id"),
        "domain": record.get("domain"),
        "sub_domain": record.get("sub-domain", record.get("sub_domain")),
    }
    return Sample(
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
        [],
        PLANNING,
        source,
        row,
        {k: v for k, v in meta.items() if v is not None},
    )
