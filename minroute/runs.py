"""Run folders of train.py: what makes one a run, starting over without losing it, and its CSV logs.

A folder holding run.json, latest.json, best.json, train_log.csv, gates.csv or a ckpt-* folder is a run.
`check_out_folder` checks a new run's --out before anything is written (a file, a path under a file, a
dangling link, a folder that cannot be written, a data folder, a checkpoint folder, a run without
--restart: each refused by name); `make_run_folder` then creates it, or with --restart moves the old run
aside (never deletes it). `run.json` (the run's settings, written before its first update) makes a run
that stopped before its first checkpoint resumable: from update 0, with the same settings, which is
exactly the run it would have been. `RunLog` appends train_log.csv and gates.csv; a resumed run first
drops the rows the interrupted process wrote after its checkpoint, so the logs hold every step once.
"""
from __future__ import annotations

import csv
import os
import time
from pathlib import Path

from .safety import UserError, WriteError, os_cause

RUN_FILES = ("run.json", "latest.json", "best.json", "train_log.csv", "gates.csv")


def held_run_files(out: Path) -> list[str]:
    """What makes `out` a run folder (empty: not a run)."""
    if not out.is_dir():
        return []
    return [f for f in RUN_FILES if (out / f).exists()] + sorted(p.name for p in out.glob("ckpt-*"))[:1]


def resumable(out: Path) -> bool:
    """Can `python train.py --resume out` continue it (a checkpoint, or the settings of a run with none)?"""
    return (out / "run.json").exists() or any(p.is_dir() and (p / "meta.json").exists() for p in out.glob("ckpt-*"))


def check_out_folder(out: Path, restart: bool):
    """Refuse, before anything is written, an --out that cannot be a new run's folder. Returns whether it holds
    a run (which --restart will move aside)."""
    if not str(out):
        raise UserError("--out '': give a folder for the run")
    if out.is_symlink() and not out.exists():
        raise UserError(f"--out {out}: a symbolic link to {os.readlink(out)}, which does not exist; give a folder "
                        "(or create the link's target)")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, not a folder; give a folder for the run")
    if out.is_dir():
        if (out / "manifest.json").exists():
            raise UserError(f"--out {out}: is a data folder (it holds manifest.json); a run needs a folder of its own, "
                            f"e.g. --out runs/{out.resolve().name}-run")
        if (out / "meta.json").exists() and out.name.startswith("ckpt-"):
            raise UserError(f"--out {out}: is a checkpoint folder of the run {out.parent}; to continue that run: python "
                            f"train.py --resume {out}; for a new run give a folder of its own")
    if out.name.startswith("ckpt-") and held_run_files(out.resolve().parent):
        raise UserError(f"--out {out}: a ckpt-* folder inside the run {out.parent}, which would delete it as a "
                        "superseded checkpoint; give a folder of its own")
    full = Path(os.path.abspath(out))  # as typed, links not followed: each folder on the way is checked
    for anc in full.parents:
        if anc.name.startswith("ckpt-") and (anc / "meta.json").exists():
            raise UserError(f"--out {out}: inside the checkpoint folder {anc}, which its run replaces or deletes; "
                            "give a folder of its own")
    here = full if out.is_dir() else next(a for a in full.parents if a.exists() or a.is_symlink())
    if here.is_symlink() and not here.exists():
        raise UserError(f"--out {out}: {here} is a symbolic link to {os.readlink(here)}, which does not exist; give "
                        "another --out")
    if not here.is_dir():
        raise UserError(f"--out {out}: {here} is a file, not a folder, so the run folder cannot be made under it; "
                        "give another --out")
    if not os.access(here, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {here} is not writable (permission denied or a read-only file system); give "
                        "another --out")
    held = held_run_files(out)
    if held and not restart:
        if resumable(out):
            cont = f"To continue it: python train.py --resume {out}  (add --steps N to extend it). "
        else:  # logs of an older train.py's run that stopped before its first checkpoint: nothing to resume
            cont = "It stopped before its first checkpoint and records no settings (run.json), so nothing can be " \
                   "resumed. "
        raise UserError(f"{out} already holds a run ({', '.join(held)}). {cont}To start over: choose another "
                        f"--out, or add --restart (the old run is moved to {out}.replaced-<time>, nothing is deleted)")
    if held and restart:
        cwd = Path.cwd().resolve()
        if out.resolve() == cwd or out.resolve() in cwd.parents:
            raise UserError(f"--out {out} --restart: the run folder is the current folder (or holds it), which "
                            "cannot be moved aside; run the command from outside it")
        if not os.access(out.resolve().parent, os.W_OK | os.X_OK):
            raise UserError(f"--out {out} --restart: {out.resolve().parent} is not writable, so the old run cannot "
                            "be moved aside; give another --out")
    return bool(held)


def make_run_folder(out: Path, restart: bool, say=print) -> bool:
    """Create a new run's folder (after check_out_folder and every other input check); with --restart, first move
    the run it holds to OUT.replaced-<time>. Returns whether a run was moved aside."""
    moved = False
    try:
        if held_run_files(out):
            if not restart:  # checked before; the folder changed since
                check_out_folder(out, restart)
            aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            n = 1
            while aside.exists():
                aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
                n += 1
            os.replace(out, aside)
            moved = True
            say(f"moved the previous run in {out} to {aside}")
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"--out {e.filename or out}: cannot create the run folder ({os_cause(e)}); give another "
                         "--out") from None
    return moved


class RunLog:
    """train_log.csv (one row per log interval / validation) and gates.csv (per layer).

    A resumed run first drops the rows written after its checkpoint (by the interrupted process), so the
    logs hold each step once."""

    FIELDS = ["step", "loss", "ce", "reg", "skip_tool", "skip_plan", "lr", "grad_norm", "dt", "tok_s", "val_ce",
              "val_skip_tool", "val_skip_plan"]
    GATE_FIELDS = ["step", "layer", "mean_soft", "hard_skip_rate", "bias", "w_norm"]

    def __init__(self, out: Path, start: int):
        self.out = out
        try:
            self._open(out, start)
        except OSError as e:
            raise self._error(e, out) from None

    def _error(self, e: OSError, path) -> WriteError:
        return WriteError(f"{e.filename or path}: cannot write the run's log ({os_cause(e)}); its checkpoints are "
                          f"untouched. Free space (or make {self.out} writable), then continue the run: python "
                          f"train.py --resume {self.out}")

    def _open(self, out: Path, start: int):
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
            except OSError:  # a full disk fails the last flush too; what was flushed before is on disk
                pass
