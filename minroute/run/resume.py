"""Resuming a train.py run exactly, and what to do when it cannot be resumed.

`resume_args` turns `--resume RUN_DIR` (or `RUN_DIR/ckpt-N`) into the run's recorded settings: only
--steps (an extension), --device, --deterministic and --ddp-backend may be given again with a new
value (RESUME_MAY_CHANGE), any other setting that differs is refused by name. It continues from the
run's newest complete checkpoint, whichever pointer names it (`resume_point`; `repair_latest` then
makes latest.json say so), or from update 0 with run.json's settings when the run stopped before its
first. Settings that runs before them did not record get the value those runs used. Where a resume
cannot help (a corrupt checkpoint, a non-finite loss), the messages advise a command that works: an
earlier checkpoint, or the run started over (`new_run_command`). The functions that write a train.py
command take its parser, so train.py keeps its command line and this module does not import it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from minroute.run.checkpoint import (
    CKPT_NAME,
    atomic_write_text,
    checkpoints,
    is_checkpoint_dir,
    load_checkpoint,
    nonfinite_tensors,
    pointer_target,
    read_meta,
    run_dir_of,
)
from minroute.run.inputs import check_demo_assets, locate
from minroute.run.safety import MissingFile, UserError
from minroute.run.settings import PRESETS, resolve

# what a resumed run may be given again with a new value
# how often the run logs, validates and checkpoints: no number of the training depends on it (the
# validation takes no random draw), so a resume may change it
CADENCE = ("log_every", "eval_every", "val_batches", "save_every", "keep_every")
RESUME_MAY_CHANGE = {
    "steps",
    "device",
    "resume",
    "out",
    "deterministic",
    "ddp_backend",
    *CADENCE,
}


def new_run_command(args, ap: argparse.ArgumentParser, **change) -> str:
    """A train.py command (`ap`: its parser) that starts this run over in its own folder (--restart
    moves the stopped run aside) with its settings and `change` applied: what a message advises
    where a resume cannot help (a resumed run keeps its settings). Options that resolve() would fill
    with the same value are left out.
    """
    base = ap.parse_args(
        ["--out", "x", "--preset", args.preset] + (["--demo"] if args.demo else [])
    )
    resolve(base)
    base.preset, base.demo = (
        ap.get_default("preset"),
        False,
    )  # these two are given whenever they are not the default
    cmd = ["python", "train.py", "--out", str(args.out)]
    for action in ap._actions:
        k = action.dest
        if (
            not action.option_strings
            or k in ("help", "out", "resume", "restart")
            or (args.demo and k in ("model", "data"))
        ):  # the demo builds its own
            continue
        v = change.get(k, getattr(args, k, None))
        if v is None or (k not in change and v == getattr(base, k, None)):
            continue
        if (
            k == "t_max"
            and k not in change
            and v == (PRESETS[args.preset].get("t_max") or args.updates)
        ):
            continue  # what resolve() fills in
        if isinstance(action, argparse._StoreTrueAction):
            cmd += [action.option_strings[0]] if v else []
        else:
            cmd += [action.option_strings[0], str(v)]
    return shlex.join(cmd + ["--restart"])


def step_of(ckpt: Path) -> int:
    m = CKPT_NAME.fullmatch(ckpt.name)
    return int(m.group(1)) if m else read_meta(ckpt).get("step", 0)


def resume_point(run: Path, target: Path) -> tuple[Path | None, list[str]]:
    """The checkpoint a resume continues from, and notes to print: the one named (RUN/ckpt-N), else
    the run's newest complete checkpoint, whichever pointer names it (a run killed after a
    validation checkpoint but before its first --save-every one has only best.json), or None when
    there is none."""
    found = checkpoints(run)
    notes = []
    if target != run:  # a ckpt-* folder, as asked
        newer = [d.name for k, d in found if k > step_of(target)]
        if newer:
            notes.append(
                f"resuming {run} from {target.name}, as asked; its newer checkpoints"
                f" ({', '.join(newer)}) are superseded by the first checkpoint this resume writes"
                " (training repeats them, bitwise the same)"
            )
        return target, notes
    for which in ("latest", "best"):
        name = pointer_target(run, which)
        if name and not (run / name).is_dir():
            notes.append(f"{run / (which + '.json')} names {name}, which is missing")
    if not found:
        return None, notes
    step, ckpt = found[-1]
    # latest.json names another, a missing one, or is unreadable
    if pointer_target(run, "latest") != ckpt.name:
        how = (
            "best.json names it"
            if pointer_target(run, "best") == ckpt.name
            else "no pointer names it"
        )
        notes.append(
            f"resuming from {ckpt.name} (update {step}), the newest complete checkpoint ({how})"
        )
    return ckpt, notes


def repair_latest(run: Path, ckpt: Path | None):
    """Point latest.json at the checkpoint a resume of the whole run continues from, when it names
    another one or cannot be read: what the run folder says is then what training did, also when no
    update is left to run.
    """
    if ckpt is None:
        return
    if pointer_target(run, "latest") != ckpt.name:
        atomic_write_text(
            run / "latest.json", json.dumps({"dir": ckpt.name, "step": step_of(ckpt)})
        )


def read_run_json(run: Path, notes) -> dict:
    path = run / "run.json"
    if not path.exists():
        raise MissingFile(
            f"{run}: no checkpoint and no run.json, so there is nothing to resume ("
            + ("; ".join(notes) + "; " if notes else "")
            + "not a train.py run folder, or an older train.py's run that stopped before its first"
            f" checkpoint). Start a new run there: python train.py --out {run} --restart --data"
            " DATA ... (the old files are moved aside)"
        )
    try:
        meta = json.loads(path.read_text())
        meta["args"]["steps"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"{path}: unreadable ({type(e).__name__}); it records the settings of a run that"
            " stopped before its first checkpoint; restore it, or start a new run there with"
            " --restart"
        ) from None
    return meta


def resume_args(args, ap):
    """The recorded settings of the run to resume, with --steps (extension) and --device taken from
    the command line; any other setting given with a different value is refused by name. `ap`:
    train.py's parser (for the commands its messages advise). Returns (settings, (adapter, optimizer
    state, meta, the checkpoint latest.json should name, or None))."""
    target = Path(args.resume)
    run = run_dir_of(target)
    if args.out and Path(args.out).resolve() != run.resolve():
        raise UserError(
            f"--resume {args.resume} continues {run}; drop --out {args.out} (a run cannot move)"
        )
    # RUN_DIR (its newest checkpoint), not RUN_DIR/ckpt-N as asked
    whole_run = not is_checkpoint_dir(target)
    ckpt, notes = resume_point(run, run if whole_run else target)
    # stopped before its first checkpoint: start from update 0 with its recorded settings
    if ckpt is None:
        meta = read_run_json(run, notes)
        if notes:  # pointers name checkpoints that are gone: do not silently redo the whole run
            raise MissingFile(
                f"{'; '.join(notes)}, and {run} has no other checkpoint; restore it from a copy, or"
                " start the run over: "
                + new_run_command(argparse.Namespace(**{**meta["args"], "out": str(run)}), ap)
            )
        notes.append(
            f"{run} has no checkpoint yet (it stopped before its first): starting from update 0"
            " with its settings (run.json), exactly the run it would have been"
        )
        adapter = opt_state = None
    else:
        meta = read_meta(ckpt)
        if not isinstance(meta.get("args"), dict):
            raise UserError(
                f"{ckpt / 'meta.json'} lacks the run's settings ('args'); it is not a checkpoint"
                " train.py wrote, or it was edited"
            )
        adapter, opt_state, meta = load_checkpoint(
            ckpt, fix=other_checkpoint_advice(run, ckpt, meta["args"], ap)
        )
    if int(os.environ.get("RANK", "0")) == 0:
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    saved = meta["args"]
    inputs = locate_inputs(run, meta, args.given)  # data, model, demo assets: by content, not path
    changed = sorted(
        k
        for k, v in args.given.items()
        if k not in RESUME_MAY_CHANGE and k not in inputs and saved.get(k) != v
    )
    if changed:
        detail = ", ".join(
            f"--{k.replace('_', '-')} {args.given[k]} (run: {saved.get(k)})" for k in changed
        )
        raise UserError(
            f"{run} was trained with other settings than {detail}; resume with the run's own"
            " settings (only --steps, --device and how often it logs, validates and checkpoints"
            " may change), or start a new run in another --out"
        )
    legacy = {
        "route_on": "sequence",
        "ce_mean": "micro",
        "demo_assets": None,
    }  # what runs before these settings did
    new = argparse.Namespace(
        **{
            **legacy,
            **saved,
            "resume": str(run),
            "out": str(run),
            "device": args.device,
            "deterministic": args.deterministic,
            "ddp_backend": args.ddp_backend,
            **{
                k: args.given.get(k, saved.get(k, 0 if k == "keep_every" else None))
                for k in CADENCE
            },
            "given": args.given,
            "restart": False,
            **inputs,
        }
    )
    new.extensions = list(saved.get("extensions", []))
    if "steps" in args.given and args.given["steps"] != saved["steps"]:
        if args.given["steps"] < saved["steps"]:
            raise UserError(
                f"--steps {args.given['steps']} is fewer than the run's {saved['steps']}; a run can"
                " only be extended"
            )
        new.steps = args.given["steps"]
        new.updates = new.steps // new.accum if new.step_unit == "micro" else new.steps
        new.extensions.append(
            {
                "from_steps": saved["steps"],
                "to_steps": new.steps,
                "at_update": meta.get("step", 0),
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
        )
    return new, (adapter, opt_state, meta, ckpt if whole_run else None)


def locate_inputs(run: Path, meta: dict, given: dict) -> dict:
    """Where the resumed run's data and model are now (and its demo assets): what the command line
    gives, held to the recorded content, else found from the recorded paths (run/inputs.py)."""
    given = dict(given)
    out = {}
    if given.get("demo_assets"):  # the demo's model and data live in the assets folder
        check_demo_assets(run, meta, given["demo_assets"])
        out["demo_assets"] = given["demo_assets"]
        given.setdefault("data", str(Path(given["demo_assets"]) / "demo-data"))
        given.setdefault("model", str(Path(given["demo_assets"]) / "demo-model"))
    for key in ("data", "model"):
        if key in given or (meta.get("args") or {}).get(key) is not None:
            out[key] = locate(run, meta, key, given.get(key))
    return out


def other_checkpoint_advice(run: Path, ckpt: Path, saved: dict, ap, restore: bool = True) -> str:
    """What to do when `ckpt` cannot be used: resume from an earlier checkpoint, or start the run
    over."""
    first = "restore it from a copy, or " if restore else ""
    older = [d for k, d in checkpoints(run) if k < step_of(ckpt)]
    if older:
        return f"{first}resume from an earlier checkpoint: python train.py --resume {older[-1]}"
    try:
        again = new_run_command(argparse.Namespace(**{**saved, "out": str(run)}), ap)
    except (
        AttributeError,
        KeyError,
        TypeError,
        ValueError,
    ):  # settings of an older train.py: no command
        again = f"python train.py --out {run} --restart ... (the run's own settings)"
    return f"{first}start the run over (it has no earlier checkpoint): {again}"


def last_good_checkpoint(run: Path) -> str:
    """Where a run stopped by a non-finite loss can be taken up again, in words."""
    found = checkpoints(run)
    if not found:
        return f"no checkpoint was written in {run} yet"
    d = found[-1][1]
    bad = nonfinite_tensors(load_checkpoint(d)[0])
    return f"the last good checkpoint is {d}" if not bad else f"{d} holds non-finite {bad[:2]}"


def nonfinite_advice(u: int, args, ap) -> str:
    """What to do about a non-finite loss at update u: a resume would repeat it, so start over with
    a lower --lr."""
    if u == 0:  # the initial weights: no learning rate has acted yet
        return (
            "The loss is not finite before any update, so no --lr can help: check the data, the"
            " model and --gate-reg / --lora-alpha"
        )
    lower = float(f"{args.lr / 10:.3g}")
    change = {"lr": lower, **({"min_lr": lower} if args.min_lr > lower else {})}
    return (
        "A resumed run keeps its --lr (resuming repeats this); start the run again with a lower"
        f" one (the stopped run is moved to {Path(args.out)}.replaced-<time>):"
        f" {new_run_command(args, ap, **change)}; or check the data"
    )
