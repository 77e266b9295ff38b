"""A new run of train.py: its settings, its inputs and its folder, checked in that order; and its CSV logs.

Settings: what the command line leaves unset comes from DEFAULTS, then the preset (PRESETS: paper = as
written, author = as the authors ran it; FIXED ones from the preset alone), then the demo's (DEMO);
`resolve` fills them in and refuses numbers that contradict each other. `open_inputs` checks the data
(every file verified) and the model against each other and the settings; `start_run` does all of it, and
builds the --demo's tiny model and data (`prepare_demo`), before the run folder is made or moved.

A folder holding run.json, latest.json, best.json, train_log.csv, gates.csv or a ckpt-* folder is a run.
`check_out_folder` checks a new run's --out before anything is written (a file, a path under a file, a
dangling link, a folder that cannot be written, a data folder, a checkpoint folder, a run without
--restart: each refused by name); `make_run_folder` then creates it, or with --restart moves the old run
aside (never deletes it). `run.json` (the run's settings, written before its first update) makes a run
that stopped before its first checkpoint resumable: from update 0, with the same settings, which is
exactly the run it would have been. `RunLog` appends train_log.csv and gates.csv; a resumed run first
drops the rows the interrupted process wrote after its checkpoint, so the logs hold every step once.
`interval_stats` makes a log interval's rows.
"""
from __future__ import annotations

import csv
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .data import DataFolder
from .load import load_config, load_tokenizer, resolve_dir
from .safety import RunLock, UserError, WriteError, os_cause, sha256_file

DEFAULTS = dict(batch_size=4, accum=4, lr=2e-4, save_every=200, log_every=10, t_max=None)
PRESETS = {
    "paper": dict(steps=3000, step_unit="update", pool="mask", route_on="prompt", ce_mean="update", pad_to=0,
                  sort_by_length=1, decay_biases=False, eval_every=200, val_batches=30),
    "author": dict(steps=3000, step_unit="micro", t_max=3000, pool="all", route_on="sequence", ce_mean="micro",
                   pad_to=512, sort_by_length=0, decay_biases=True, eval_every=50, val_batches=30),
}
FIXED = ("step_unit", "decay_biases", "ce_mean")  # set by the preset alone
DEMO = dict(steps=120, batch_size=4, accum=2, lr=3e-3, eval_every=20, val_batches=4, save_every=40, log_every=10)
DEMO_COUNTS = {"hermes": 40, "glaive": 40, "gsm8k": 40, "turing": None}
DEMO_ASSET_SEED = 42  # the demo model and data do not change with --seed

RUN_FILES = ("run.json", "latest.json", "best.json", "train_log.csv", "gates.csv")


def check_demo_flags(args):
    """--demo brings its own model, data and device: refuse what it would otherwise silently replace."""
    given = args.given
    if args.demo and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--demo runs in one process; build the data and model first for torchrun")
    if args.demo:
        clash = [f"--{k} {given[k]}" for k in ("data", "model") if k in given]
        if clash:
            raise UserError(f"{' and '.join(clash)} with --demo: the demo trains its own tiny model on its bundled data "
                            f"and would not use {'them' if len(clash) > 1 else 'it'}; drop "
                            f"{' and '.join(c.split()[0] for c in clash)}, or drop --demo to train on yours")
        if given.get("device", "cpu") != "cpu":
            raise UserError(f"--device {given['device']} with --demo: the demo runs on the CPU; drop --device")
    elif args.demo_assets:
        raise UserError(f"--demo-assets {args.demo_assets} without --demo: it says where the demo keeps its model and "
                        "data; add --demo, or drop --demo-assets")


def resolve(args):
    """Fill what the command line left unset: defaults, then the preset, then the demo's; return the updates."""
    layers = [DEFAULTS, PRESETS[args.preset], DEMO if args.demo else {}]
    for key in set().union(*layers) - set(FIXED):
        if getattr(args, key, None) is None:
            setattr(args, key, next(layer[key] for layer in reversed(layers) if key in layer))
    for key in FIXED:
        setattr(args, key, PRESETS[args.preset][key])
    updates = args.steps // args.accum if args.step_unit == "micro" else args.steps
    if updates == 0:
        raise UserError(f"--steps {args.steps} micro-batches with --accum {args.accum} make no optimizer update; "
                        f"use --steps >= {args.accum}")
    if args.min_lr > args.lr:
        raise UserError(f"--min-lr {args.min_lr:g} is above --lr {args.lr:g}")
    if args.lr * args.weight_decay >= 1:
        raise UserError(f"--weight-decay {args.weight_decay:g} with --lr {args.lr:g}: each update would scale every "
                        f"weight by 1 - lr x wd = {1 - args.lr * args.weight_decay:g} (to zero or past it); lower one "
                        "of them")
    args.t_max = args.t_max or updates
    if args.warmup and args.warmup >= args.t_max:
        raise UserError(f"--warmup {args.warmup} is not shorter than the cosine's {args.t_max} updates (--t-max), so "
                        f"the LR would never decay; use --warmup < {args.t_max}")
    if args.ablation == "noreg":
        args.gate_reg = 0.0
    args.init = "uniform" if args.ablation == "uniform-init" else "band"
    return updates


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


def prepare_demo(out: Path, args, record_as: Path | None = None):
    """Tiny random Qwen2 (tokenizer trained on the demo corpus) and the demo data in `out` (the run folder, or
    --demo-assets to share one model and data set between runs). Built once, with a fixed seed, so every seed
    of a demo study trains the same base model on the same data. `record_as`: the folder the assets will be
    moved to (the data's manifest names the model there), when they are built elsewhere first."""
    from data_prep.build import build
    from minroute.tiny import write_tiny_checkpoint
    demo = Path(__file__).resolve().parent.parent / "data_prep" / "demo"  # beside minroute/ (train.py's folder)
    if not demo.is_dir():
        import data_prep
        demo = Path(data_prep.__file__).parent / "demo"
    model_dir, data_dir = out / "demo-model", out / "demo-data"
    if not (model_dir / "model.safetensors").exists():
        text = [p.read_text(encoding="utf-8", errors="replace") for p in demo.rglob("*.json")]
        write_tiny_checkpoint(model_dir, hidden_size=64, num_hidden_layers=8, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=192, seed=DEMO_ASSET_SEED, bpe_vocab=1024,
                              init_std=0.1,  # 0.02 leaves the tied head too weak for LoRA to move the loss
                              extra_text=[line for t in text for line in t.splitlines()])
    if not (data_dir / "manifest.json").exists():
        tok = load_tokenizer(model_dir)
        build(data_dir, tok.tokenizer, str((record_as or out) / "demo-model"), source_dir=demo, counts=DEMO_COUNTS,
              chat_format=tok.chat,
              eval_counts={"tool": 10, "planning": 10}, matched_pairs=10, seed=DEMO_ASSET_SEED,
              tokenizer_sha256=sha256_file(model_dir / "tokenizer.json"))
    args.model, args.data = str(model_dir), str(data_dir)


def check_data_matches_model(data: DataFolder, model_path: str, vocab_size: int):
    data.check_tokenizer(model_path)
    if data.manifest["vocab_size"] > vocab_size:
        raise UserError(f"{data} uses {data.manifest['vocab_size']} token ids, the model {model_path} has {vocab_size}")


def open_inputs(args, new_run: bool = True) -> DataFolder:
    """The data (every file verified) and the model checked against each other and against the numbers that
    depend on them, before the run folder is made: a refused command changes nothing on disk. A resumed run
    (new_run False) is not held to bounds it could not change (it trained with them)."""
    data = DataFolder(args.data)
    cfg = load_config(resolve_dir(args.model))
    check_data_matches_model(data, args.model, cfg.vocab_size)
    train_split, val_split = data.split("train"), data.split("val")
    longest = max(int(train_split.lengths().max()), int(val_split.lengths().max()) if len(val_split) else 0)
    if args.pad_to and args.pad_to < longest:
        raise UserError(f"--pad-to {args.pad_to} is shorter than the longest sample of {args.data} ({longest} tokens); "
                        f"use --pad-to {data.manifest['max_len']} (the data's --max-len) or 0")
    if not new_run:
        return data
    if args.pad_to > cfg.max_position_embeddings:
        raise UserError(f"--pad-to {args.pad_to} is longer than the context of {args.model} "
                        f"({cfg.max_position_embeddings} positions); use --pad-to {data.manifest['max_len']} or 0")
    if args.lora_r > cfg.hidden_size:
        raise UserError(f"--lora-r {args.lora_r} is above the hidden size of {args.model} ({cfg.hidden_size}), which "
                        f"bounds a LoRA's rank; use --lora-r <= {cfg.hidden_size} (the paper: 8)")
    if args.batch_size * args.accum > len(train_split):
        raise UserError(f"--batch-size {args.batch_size} x --accum {args.accum} = {args.batch_size * args.accum} "
                        f"sequences per update, more than the {len(train_split)} of {args.data}'s train split (an "
                        "update would hold a sequence twice); lower them")
    return data


def start_run(out: Path, args, writer: bool):
    """Check every input of a new run, then (only then) make its folder, or with --restart move the run it
    holds aside. The demo's model and data are built beside the folder and moved in. Returns (data, lock)."""
    check_out_folder(out, args.restart)
    staging = None
    try:
        if args.demo:
            args.device = "cpu"
            assets = Path(args.demo_assets) if args.demo_assets else out
            ready = (out / "demo-model" / "model.safetensors").exists() and (out / "demo-data" / "manifest.json").exists()
            if not args.demo_assets and (held_run_files(out) or not ready):
                here = next(a for a in Path(os.path.abspath(out)).parents if a.is_dir())
                try:
                    staging = assets = Path(tempfile.mkdtemp(prefix=f".{out.name}.demo-", dir=here))
                except OSError as e:
                    raise WriteError(f"--out {out}: cannot build the demo beside it in {here} ({os_cause(e)}); give "
                                     "another --out") from None
            prepare_demo(assets, args, record_as=out if staging else None)
        if not args.data:
            raise UserError("--data DIR is required (build it with `python -m data_prep --out DIR`), or use --demo")
        args.updates = resolve(args)
        data = open_inputs(args)
        if not writer:  # under torchrun rank 0 makes the folder
            return data, None
        lock = RunLock(out) if out.is_dir() else None  # refuses a run another process is writing
        if make_run_folder(out, args.restart) and lock:  # the old run (and its lock file) moved aside
            lock.release()
            lock = None
        lock = lock or RunLock(out)  # held until this process exits: no second writer
        if staging:
            try:
                for name in ("demo-model", "demo-data"):
                    os.replace(staging / name, out / name)
            except OSError as e:
                raise WriteError(f"{e.filename or out}: cannot move the demo's model and data into the run folder "
                                 f"({os_cause(e)}); give another --out") from None
            args.model, args.data = str(out / "demo-model"), str(out / "demo-data")
            data = DataFolder(args.data)
        return data, lock
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)


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


def fresh_acc(device) -> dict:
    """An empty log interval: its updates' summed [loss, ce, reg, real tokens] on the device, their number, its
    start time, and the gates of its micro-batches (train.py's accumulate_update appends them)."""
    return {"sums": torch.zeros(4, dtype=torch.float64, device=device), "n": 0, "t0": time.time(),
            "soft": [], "hard": [], "tool": []}


def interval_stats(acc, route, step, lr, grad_norm):
    """The log row and the per-layer gate rows of one log interval (the only place statistics leave the device)."""
    soft, hard, tool = torch.cat(acc["soft"]).cpu(), torch.cat(acc["hard"]).cpu(), torch.cat(acc["tool"]).cpu()
    skip = 100 * (1 - hard.float().mean(1))
    n, dt = acc["n"], time.time() - acc["t0"]
    loss, ce, reg, tok = acc["sums"].tolist()
    row = {"step": step, "loss": loss / n, "ce": ce / n, "reg": reg / n,
           "skip_tool": float(skip[tool].mean()) if tool.any() else float("nan"),
           "skip_plan": float(skip[~tool].mean()) if (~tool).any() else float("nan"),
           "lr": lr, "grad_norm": grad_norm, "dt": dt / n, "tok_s": tok / dt}
    gate_rows = [[step, i, round(float(soft[:, i].mean()), 5), round(float(1 - hard[:, i].float().mean()), 5),
                  round(r.bias.item(), 5), round(r.weight.detach().norm().item(), 5)]
                 for i, r in enumerate(route.routers)]
    return row, gate_rows
