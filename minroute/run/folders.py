"""A new run's inputs and its folder, checked before anything is written.

`open_inputs` checks the data (every file verified) and the model against each other and the
settings; `start_run` does all of it (and has the --demo's tiny model and data built) before the run
folder is made or moved.

A folder holding run.json, latest.json, best.json, train_log.csv, gates.csv or a ckpt-* folder is a
run. `check_out_folder` checks a new run's --out before anything is written (a file, a path under a
file, a dangling link, a folder that cannot be written, a data folder, a checkpoint folder, a run
without --restart: each refused by name); `make_run_folder` then creates it, or with --restart moves
the old run aside (never deletes it). `run.json` (the run's settings, written before its first
update) makes a run that stopped before its first checkpoint resumable: from update 0, with the same
settings, which is exactly the run it would have been.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from minroute.run.data import DataFolder
from minroute.run.load import load_config, resolve_dir
from minroute.run.safety import RunLock, UserError, WriteError, os_cause
from minroute.run.settings import resolve

RUN_FILES = ("run.json", "latest.json", "best.json", "train_log.csv", "gates.csv")


def held_run_files(out: Path) -> list[str]:
    """What makes `out` a run folder (empty: not a run)."""
    if not out.is_dir():
        return []
    return [f for f in RUN_FILES if (out / f).exists()] + sorted(
        p.name for p in out.glob("ckpt-*")
    )[:1]


def resumable(out: Path) -> bool:
    """Can `python train.py --resume out` continue it (a checkpoint, or the settings of a run with
    none)?"""
    return (out / "run.json").exists() or any(
        p.is_dir() and (p / "meta.json").exists() for p in out.glob("ckpt-*")
    )


def check_out_folder(out: Path, restart: bool):
    """Refuse, before anything is written, an --out that cannot be a new run's folder. Returns
    whether it holds a run (which --restart will move aside)."""
    if not str(out):
        raise UserError("--out '': give a folder for the run")
    if out.is_symlink() and not out.exists():
        raise UserError(
            f"--out {out}: a symbolic link to {os.readlink(out)}, which does not exist; give a"
            " folder (or create the link's target)"
        )
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, not a folder; give a folder for the run")
    if out.is_dir():
        if (out / "manifest.json").exists():
            raise UserError(
                f"--out {out}: is a data folder (it holds manifest.json); a run needs a folder of"
                f" its own, e.g. --out runs/{out.resolve().name}-run"
            )
        if (out / "meta.json").exists() and out.name.startswith("ckpt-"):
            raise UserError(
                f"--out {out}: is a checkpoint folder of the run {out.parent}; to continue that"
                f" run: python train.py --resume {out}; for a new run give a folder of its own"
            )
    if out.name.startswith("ckpt-") and held_run_files(out.resolve().parent):
        raise UserError(
            f"--out {out}: a ckpt-* folder inside the run {out.parent}, which would delete it as a "
            "superseded checkpoint; give a folder of its own"
        )
    # as typed, links not followed: each folder on the way is checked
    full = Path(os.path.abspath(out))
    for anc in full.parents:
        if anc.name.startswith("ckpt-") and (anc / "meta.json").exists():
            raise UserError(
                f"--out {out}: inside the checkpoint folder {anc}, which its run replaces or"
                " deletes; give a folder of its own"
            )
    here = full if out.is_dir() else next(a for a in full.parents if a.exists() or a.is_symlink())
    if here.is_symlink() and not here.exists():
        raise UserError(
            f"--out {out}: {here} is a symbolic link to {os.readlink(here)}, which does not exist;"
            " give another --out"
        )
    if not here.is_dir():
        raise UserError(
            f"--out {out}: {here} is a file, not a folder, so the run folder cannot be made under"
            " it; give another --out"
        )
    if not os.access(here, os.W_OK | os.X_OK):
        raise UserError(
            f"--out {out}: {here} is not writable (permission denied or a read-only file system);"
            " give another --out"
        )
    held = held_run_files(out)
    if held and not restart:
        if resumable(out):
            cont = f"To continue it: python train.py --resume {out}  (add --steps N to extend it). "
        # logs of an older train.py's run that stopped before its first checkpoint: nothing to
        # resume
        else:
            cont = (
                "It stopped before its first checkpoint and records no settings (run.json), so"
                " nothing can be resumed. "
            )
        raise UserError(
            f"{out} already holds a run ({', '.join(held)}). {cont}To start over: choose another"
            f" --out, or add --restart (the old run is moved to {out}.replaced-<time>, nothing is"
            " deleted)"
        )
    if held and restart:
        cwd = Path.cwd().resolve()
        if out.resolve() == cwd or out.resolve() in cwd.parents:
            raise UserError(
                f"--out {out} --restart: the run folder is the current folder (or holds it), which "
                "cannot be moved aside; run the command from outside it"
            )
        if not os.access(out.resolve().parent, os.W_OK | os.X_OK):
            raise UserError(
                f"--out {out} --restart: {out.resolve().parent} is not writable, so the old run"
                " cannot be moved aside; give another --out"
            )
    return bool(held)


def make_run_folder(out: Path, restart: bool, say=print) -> bool:
    """Create a new run's folder (after check_out_folder and every other input check); with
    --restart, first move the run it holds to OUT.replaced-<time>. Returns whether a run was moved
    aside."""
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
        raise WriteError(
            f"--out {e.filename or out}: cannot create the run folder ({os_cause(e)}); give another"
            " --out"
        ) from None
    return moved


def check_data_matches_model(data: DataFolder, model_path: str, vocab_size: int):
    data.check_tokenizer(model_path)
    data.check_token_ids(vocab_size, model_path)
    if data.manifest["vocab_size"] > vocab_size:
        raise UserError(
            f"{data} uses {data.manifest['vocab_size']} token ids, the model {model_path} has"
            f" {vocab_size}"
        )


def open_inputs(args, new_run: bool = True) -> DataFolder:
    """The data (every file verified) and the model checked against each other and against the
    numbers that depend on them, before the run folder is made: a refused command changes nothing on
    disk. A resumed run (new_run False) is not held to bounds it could not change (it trained with
    them)."""
    data = DataFolder(args.data)
    cfg = load_config(resolve_dir(args.model))
    check_data_matches_model(data, args.model, cfg.vocab_size)
    train_split, val_split = data.split("train"), data.split("val")
    longest = max(
        int(train_split.lengths().max()), int(val_split.lengths().max()) if len(val_split) else 0
    )
    if args.pad_to and args.pad_to < longest:
        raise UserError(
            f"--pad-to {args.pad_to} is shorter than the longest sample of {args.data} ({longest}"
            f" tokens); use --pad-to {data.manifest['max_len']} (the data's --max-len) or 0"
        )
    if not new_run:
        return data
    if args.pad_to > cfg.max_position_embeddings:
        raise UserError(
            f"--pad-to {args.pad_to} is longer than the context of {args.model}"
            f" ({cfg.max_position_embeddings} positions); use --pad-to {data.manifest['max_len']}"
            " or 0"
        )
    if args.lora_r > cfg.hidden_size:
        raise UserError(
            f"--lora-r {args.lora_r} is above the hidden size of {args.model} ({cfg.hidden_size}),"
            f" which bounds a LoRA's rank; use --lora-r <= {cfg.hidden_size} (the paper: 8)"
        )
    if args.batch_size * args.accum > len(train_split):
        raise UserError(
            f"--batch-size {args.batch_size} x --accum {args.accum} ="
            f" {args.batch_size * args.accum} sequences per update, more than the"
            f" {len(train_split)} of {args.data}'s train split (an update would hold a sequence"
            " twice); lower them"
        )
    return data


def start_run(out: Path, args, writer: bool, prepare_demo=None):
    """Check every input of a new run, then (only then) make its folder, or with --restart move the
    run it holds aside. With --demo, `prepare_demo(folder, args, record_as)`
    (data_prep.demo_assets's; the library does not import the scripts' packages) builds the demo's
    model and data beside the folder; they are moved in. Returns (data, lock)."""
    check_out_folder(out, args.restart)
    staging = None
    try:
        if args.demo:
            args.device = "cpu"
            assets = Path(args.demo_assets) if args.demo_assets else out
            ready = (out / "demo-model" / "model.safetensors").exists() and (
                out / "demo-data" / "manifest.json"
            ).exists()
            if not args.demo_assets and (held_run_files(out) or not ready):
                here = next(a for a in Path(os.path.abspath(out)).parents if a.is_dir())
                try:
                    staging = assets = Path(tempfile.mkdtemp(prefix=f".{out.name}.demo-", dir=here))
                except OSError as e:
                    raise WriteError(
                        f"--out {out}: cannot build the demo beside it in {here} ({os_cause(e)});"
                        " give another --out"
                    ) from None
            prepare_demo(assets, args, record_as=out if staging else None)
        if not args.data:
            raise UserError(
                "--data DIR is required (build it with `python -m data_prep --out DIR`), or use"
                " --demo"
            )
        args.updates = resolve(args)
        data = open_inputs(args)
        if not writer:  # under torchrun rank 0 makes the folder
            return data, None
        lock = RunLock(out) if out.is_dir() else None  # refuses a run another process is writing
        # the old run (and its lock file) moved aside
        if make_run_folder(out, args.restart) and lock:
            lock.release()
            lock = None
        lock = lock or RunLock(out)  # held until this process exits: no second writer
        if staging:
            try:
                for name in ("demo-model", "demo-data"):
                    os.replace(staging / name, out / name)
            except OSError as e:
                raise WriteError(
                    f"{e.filename or out}: cannot move the demo's model and data into the run"
                    f" folder ({os_cause(e)}); give another --out"
                ) from None
            args.model, args.data = str(out / "demo-model"), str(out / "demo-data")
            data = DataFolder(args.data)
        return data, lock
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
