"""A run's logs: train_log.csv (one row per log interval and validation) and gates.csv (one row per
layer).

`interval_stats` turns a log interval's accumulated sums and gates into those rows; skip% is
core.router.skip_percent, the same definition validation and eval.py use.
"""

from __future__ import annotations

import csv
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from minroute.core.router import skip_percent
from minroute.run.safety import WriteError, os_cause


def read_rows(path: Path) -> list[list[str]]:
    """The CSV rows of a log; lines that are not UTF-8 text (a damaged file) are left out, counted,
    and the file as it was is kept beside it, so nothing is lost and a resume is not stopped."""
    lines, bad = [], 0
    for raw in path.read_bytes().splitlines():
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            bad += 1
    if bad:
        keep = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.copy2(path, keep)
        print(
            f"note: {path}: {bad} lines are not UTF-8 text and are left out of the resumed log; the"
            f" file as it was is kept as {keep}",
            file=sys.stderr,
        )
    return list(csv.reader(lines))


class RunLog:
    """train_log.csv (one row per log interval / validation) and gates.csv (per layer).

    A resumed run first drops the rows written after its checkpoint (by the interrupted process), so
    the logs hold each step once."""

    FIELDS = [
        "step",
        "loss",
        "ce",
        "reg",
        "skip_tool",
        "skip_plan",
        "lr",
        "grad_norm",
        "dt",
        "tok_s",
        "val_ce",
        "val_skip_tool",
        "val_skip_plan",
        "grad_lora",
        "grad_router_weight",
        "grad_router_bias",
        "clipped",
    ]
    GATE_FIELDS = ["step", "layer", "mean_soft", "hard_skip_rate", "bias", "w_norm"]

    def __init__(self, out: Path, start: int):
        self.out = out
        try:
            self._open(out, start)
        except OSError as e:
            raise self._error(e, out) from None

    def _error(self, e: OSError, path) -> WriteError:
        return WriteError(
            f"{e.filename or path}: cannot write the run's log ({os_cause(e)}); its checkpoints are"
            f" untouched. Free space (or make {self.out} writable), then continue the run: python"
            f" train.py --resume {self.out}"
        )

    def _open(self, out: Path, start: int):
        for name, header in (("train_log.csv", self.FIELDS), ("gates.csv", self.GATE_FIELDS)):
            path = out / name
            rows = []
            if start > 0 and path.exists():
                rows = [
                    r for r in read_rows(path)[1:] if r and r[0].isdigit() and int(r[0]) <= start
                ]
            with open(path.with_name(name + ".tmp"), "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(header)
                w.writerows(rows)
            os.replace(path.with_name(name + ".tmp"), path)
        # held open for the run's life (closed by close()): appended to at every log interval
        self.log_f = open(out / "train_log.csv", "a", newline="")  # noqa: SIM115
        self.gates_f = open(out / "gates.csv", "a", newline="")  # noqa: SIM115
        self.log, self.gates = csv.DictWriter(self.log_f, self.FIELDS), csv.writer(self.gates_f)

    def write(self, row: dict | None, gate_rows=()):
        try:
            self.gates.writerows(gate_rows)
            if row:
                self.log.writerow(row)
            self.log_f.flush()
            self.gates_f.flush()
        except OSError as e:
            raise self._error(e, self.out / "train_log.csv") from None

    def close(self):
        for f in (self.log_f, self.gates_f):
            try:
                f.close()
            # a full disk fails the last flush too; what was flushed before is on disk
            except OSError:
                pass


def fresh_acc(device) -> dict:
    """An empty log interval: its updates' summed [loss, ce, reg, real tokens] on the device, their
    number, its start time, the gates of its micro-batches (train.py's update appends them), how
    many of its updates were clipped, and the latest update's gradient norm per parameter group."""
    return {
        "sums": torch.zeros(4, dtype=torch.float64, device=device),
        "clipped": torch.zeros((), dtype=torch.int64, device=device),
        "grad_groups": {},
        "n": 0,
        "t0": time.time(),
        "soft": [],
        "hard": [],
        "tool": [],
    }


def interval_stats(acc, route, step, lr, grad_norm):
    """The log row and the per-layer gate rows of one log interval (the only place statistics leave
    the device)."""
    soft, hard, tool = (
        torch.cat(acc["soft"]).cpu(),
        torch.cat(acc["hard"]).cpu(),
        torch.cat(acc["tool"]).cpu(),
    )
    skip_tool, skip_plan = skip_percent(hard, tool)
    n, dt = acc["n"], time.time() - acc["t0"]
    loss, ce, reg, tok = acc["sums"].tolist()
    row = {
        "step": step,
        "loss": loss / n,
        "ce": ce / n,
        "reg": reg / n,
        "skip_tool": skip_tool,
        "skip_plan": skip_plan,
        "lr": lr,
        "grad_norm": grad_norm,
        "dt": dt / n,
        "tok_s": tok / dt,
        # the last update's norms before the clip (grad_norm is theirs combined), and the fraction
        # of the interval's updates whose norm the clip cut
        **{f"grad_{k}": float(v) for k, v in acc["grad_groups"].items()},
        "clipped": int(acc["clipped"]) / n,
    }
    gate_rows = [
        [
            step,
            i,
            round(float(soft[:, i].mean()), 5),
            round(float(1 - hard[:, i].float().mean()), 5),
            round(r.bias.item(), 5),
            round(r.weight.detach().norm().item(), 5),
        ]
        for i, r in enumerate(route.routers)
    ]
    return row, gate_rows
