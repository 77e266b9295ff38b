"""Run folders of train.py: what makes one a run, starting over without losing it, and its CSV logs.

A folder holding latest.json, best.json, train_log.csv, gates.csv or a ckpt-* folder is a run. A new run is
refused there (`check_new_run_folder`), unless asked to restart, which moves the old run aside. `RunLog`
appends train_log.csv and gates.csv; a resumed run first drops the rows the interrupted process wrote after
its checkpoint, so the logs hold every step once.
"""
from __future__ import annotations

import csv
import os
import time
from pathlib import Path

from .safety import UserError

RUN_FILES = ("latest.json", "best.json", "train_log.csv", "gates.csv")


def check_new_run_folder(out: Path, restart: bool, say=print):
    """A new run needs a folder without a run in it; --restart moves an existing run aside (never deletes it)."""
    held = [f for f in RUN_FILES if (out / f).exists()] + sorted(p.name for p in out.glob("ckpt-*"))[:1]
    if not held:
        return False
    if not restart:
        raise UserError(f"{out} already holds a run ({', '.join(held)}). To continue it: python train.py --resume "
                        f"{out}  (add --steps N to extend it). To start over: choose another --out, or add --restart "
                        f"(the old run is moved to {out}.replaced-<time>, nothing is deleted)")
    aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(out, aside)
    out.mkdir()
    say(f"moved the previous run in {out} to {aside}")
    return True


class RunLog:
    """train_log.csv (one row per log interval / validation) and gates.csv (per layer).

    A resumed run first drops the rows written after its checkpoint (by the interrupted process), so the
    logs hold each step once."""

    FIELDS = ["step", "loss", "ce", "reg", "skip_tool", "skip_plan", "lr", "grad_norm", "dt", "tok_s", "val_ce",
              "val_skip_tool", "val_skip_plan"]
    GATE_FIELDS = ["step", "layer", "mean_soft", "hard_skip_rate", "bias", "w_norm"]

    def __init__(self, out: Path, start: int):
        for name, header in (("train_log.csv", self.FIELDS), ("gates.csv", self.GATE_FIELDS)):
            path = out / name
            rows = []
            if start > 0 and path.exists():
                with open(path, newline="") as f:
                    rows = [r for r in csv.reader(f)][1:]
                rows = [r for r in rows if r and r[0].isdigit() and int(r[0]) <= start]
            with open(path.with_name(name + ".tmp"), "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(header)
                w.writerows(rows)
            os.replace(path.with_name(name + ".tmp"), path)
        self.log_f, self.gates_f = open(out / "train_log.csv", "a", newline=""), open(out / "gates.csv", "a", newline="")
        self.log, self.gates = csv.DictWriter(self.log_f, self.FIELDS), csv.writer(self.gates_f)

    def write(self, row: dict | None, gate_rows=()):
        self.gates.writerows(gate_rows)
        if row:
            self.log.writerow(row)
        self.log_f.flush()
        self.gates_f.flush()

    def close(self):
        self.log_f.close()
        self.gates_f.close()
