"""The learning curve of kept checkpoints, as a page: CURVE.md (the table) and learning_curve.png.

    python bench/curve_report.py DIR [--title TEXT]

DIR holds curves/<name>/update-<N>.json, each written by `eval.py --ckpt RUN/ckpt-<N> --tasks-only`
(reproduce.sh --real-cpu writes its LoRA-only runs' curves so; docs/smollm2-learning-curve/ holds
the curves that chose the study's settings). The numbers are those eval.json files' scored
generations, read by the study report's own code (minroute/evaluation/over_training.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from minroute.evaluation.over_training import figures, learning_curve
from minroute.run.checkpoint import atomic_write_text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--title", default="Learning curve")
    a = ap.parse_args(argv)
    if not (a.dir / "curves").is_dir():
        print(f"error: {a.dir}/curves: no such folder (eval.py --tasks-only JSON files)")
        return 2
    md, curve = learning_curve(a.dir)
    made = []
    try:
        import matplotlib

        matplotlib.use("Agg")
        (a.dir / "figures").mkdir(exist_ok=True)
        made = figures(a.dir, [], {}, {}, curve)
    except ImportError:
        pass
    page = [f"# {a.title}", "", *md[2:]]
    page += [f"![{f}](figures/{f}.png)" for f in made]
    atomic_write_text(a.dir / "CURVE.md", "\n".join(page) + "\n")
    print(f"wrote {a.dir / 'CURVE.md'}" + (f" and figures/{made[0]}.png" if made else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
