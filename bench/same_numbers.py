"""Did a refactor change a number? Compare the outputs of the same commands run before and after it.

    python bench/same_numbers.py BEFORE AFTER

BEFORE and AFTER are folders written by the same commands on the two versions of the code, e.g.

    python train.py --demo --out X/demo && python eval.py --demo --ckpt X/demo
    bash reproduce.sh --demo --out X/study2 --seeds "1 2"
    bash reproduce.sh --real-cpu --quick --out X/quick

Every file is paired by its path relative to the folder:
- checkpoint tensors (`ckpt-*/*.safetensors`): bitwise equal, tensor by tensor;
- `eval.json`, `study.json`: equal value by value (floats exactly), after resolving the paths they
  record relative to their own folder and replacing each folder's own absolute path by `<root>`
  (a key only the newer file has is noted, not counted), and leaving out what measures wall-clock
  (`timing`, any key holding `seconds` or ending in `_ms` or `ms_per_token`) and what hashes the
  bytes of a manifest that records absolute paths (`*manifest_sha256`).

Prints every difference and exits 1 if there is one, 0 if all compared files agree.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from safetensors.torch import load_file


def volatile(key: str) -> bool:
    return (
        "seconds" in key
        or key == "timing"
        or key.endswith(("_ms", "ms_per_token", "manifest_sha256"))
    )


PATH_KEYS = ("checkpoint", "data", "model", "run", "cache", "eval")


def absolute(value: str, base: Path, key: str) -> str:
    """A recorded path as an absolute one: eval.json's paths may be relative to its own folder."""
    if key in PATH_KEYS and value and not os.path.isabs(value) and (base / value).exists():
        return str((base / value).resolve())
    if key == "command":
        words = value.split(" ")
        return " ".join(
            str((base / w).resolve()) if not w.startswith("-") and (base / w).exists() else w
            for w in words
        )
    return value


def normalise(x, roots: tuple[str, ...], base: Path, key: str = ""):
    if isinstance(x, str):
        x = absolute(x, base, key)
        for r in roots:
            x = x.replace(r, "<root>")
        return x
    if isinstance(x, dict):
        return {k: normalise(v, roots, base, k) for k, v in x.items() if not volatile(k)}
    if isinstance(x, list):
        return [normalise(v, roots, base, key) for v in x]
    return x


def diff(a, b, path: str, out: list[str]):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a:
                print(f"note: {path}/{k}: a new key (not a changed number)")
            elif k not in b:
                out.append(f"{path}/{k}: only before")
            else:
                diff(a[k], b[k], f"{path}/{k}", out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{path}: {len(a)} items before, {len(b)} after")
        for i, (x, y) in enumerate(zip(a, b)):
            diff(x, y, f"{path}[{i}]", out)
    elif isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return
    elif a != b or type(a) is not type(b):
        out.append(f"{path}: {a!r} before, {b!r} after")


def roots_of(folder: Path) -> tuple[str, ...]:
    return tuple(sorted({str(folder), str(folder.resolve())}, key=len, reverse=True))


def compare(before: Path, after: Path) -> tuple[int, list[str]]:
    problems, n = [], 0
    for fb in sorted(before.rglob("*")):
        rel = fb.relative_to(before)
        fa = after / rel
        is_ckpt = fb.suffix == ".safetensors" and any(p.startswith("ckpt-") for p in rel.parts)
        if not (is_ckpt or fb.name in ("eval.json", "study.json")):
            continue
        if not fa.exists():
            problems.append(f"{rel}: missing after")
            continue
        n += 1
        if is_ckpt:
            x, y = load_file(str(fb)), load_file(str(fa))
            if x.keys() != y.keys():
                problems.append(f"{rel}: tensor names differ ({sorted(set(x) ^ set(y))[:4]})")
            problems += [
                f"{rel}: {k} differs"
                for k in x
                if k in y and not (x[k].shape == y[k].shape and x[k].eq(y[k]).all())
            ]
        else:
            out: list[str] = []
            diff(
                normalise(json.loads(fb.read_text()), roots_of(before), fb.parent),
                normalise(json.loads(fa.read_text()), roots_of(after), fa.parent),
                str(rel),
                out,
            )
            problems += out
    return n, problems


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    before, after = Path(argv[0]), Path(argv[1])
    n, problems = compare(before, after)
    for p in problems:
        print(p)
    print(
        f"{n} files compared ({before} vs {after}): "
        + ("all equal" if not problems else f"{len(problems)} differ")
    )
    return 1 if problems or n == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
