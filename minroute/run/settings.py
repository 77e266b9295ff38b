"""A run's settings: defaults, the two presets (paper = as written, author = as the authors ran it)
and the demo's.

What the command line leaves unset comes from DEFAULTS, then the preset (PRESETS; the FIXED keys
from the preset alone), then the demo's (DEMO); `resolve` fills them in, derives what follows from
them (the number of optimizer updates, the cosine length, lambda for NoReg, the router init for
UniformInit) and refuses numbers that contradict each other. docs/reference.md §3 says why each
preset value is what it is.
"""

from __future__ import annotations

import os

from minroute.run.safety import UserError

DEFAULTS = dict(batch_size=4, accum=4, lr=2e-4, save_every=200, log_every=10, t_max=None)
PRESETS = {
    "paper": dict(
        steps=3000,
        step_unit="update",
        pool="mask",
        route_on="prompt",
        ce_mean="update",
        pad_to=0,
        sort_by_length=1,
        decay_biases=False,
        eval_every=200,
        val_batches=30,
    ),
    "author": dict(
        steps=3000,
        step_unit="micro",
        t_max=3000,
        pool="all",
        route_on="sequence",
        ce_mean="micro",
        pad_to=512,
        sort_by_length=0,
        decay_biases=True,
        eval_every=50,
        val_batches=30,
    ),
}
FIXED = ("step_unit", "decay_biases", "ce_mean")  # set by the preset alone
DEMO = dict(
    steps=120,
    batch_size=4,
    accum=2,
    lr=3e-3,
    eval_every=20,
    val_batches=4,
    save_every=40,
    log_every=10,
)


def check_demo_flags(args):
    """--demo brings its own model, data and device: refuse what it would otherwise silently
    replace."""
    given = args.given
    if args.demo and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--demo runs in one process; build the data and model first for torchrun")
    if args.demo:
        clash = [f"--{k} {given[k]}" for k in ("data", "model") if k in given]
        if clash:
            raise UserError(
                f"{' and '.join(clash)} with --demo: the demo trains its own tiny model on its"
                f" bundled data and would not use {'them' if len(clash) > 1 else 'it'}; drop"
                f" {' and '.join(c.split()[0] for c in clash)}, or drop --demo to train on yours"
            )
        if given.get("device", "cpu") != "cpu":
            raise UserError(
                f"--device {given['device']} with --demo: the demo runs on the CPU; drop --device"
            )
    elif args.demo_assets:
        raise UserError(
            f"--demo-assets {args.demo_assets} without --demo: it says where the demo keeps its"
            " model and data; add --demo, or drop --demo-assets"
        )


def resolve(args):
    """Fill what the command line left unset: defaults, then the preset, then the demo's; return the
    updates."""
    layers = [DEFAULTS, PRESETS[args.preset], DEMO if args.demo else {}]
    for key in set().union(*layers) - set(FIXED):
        if getattr(args, key, None) is None:
            setattr(args, key, next(layer[key] for layer in reversed(layers) if key in layer))
    for key in FIXED:
        setattr(args, key, PRESETS[args.preset][key])
    updates = args.steps // args.accum if args.step_unit == "micro" else args.steps
    if updates == 0:
        raise UserError(
            f"--steps {args.steps} micro-batches with --accum {args.accum} make no optimizer"
            f" update; use --steps >= {args.accum}"
        )
    if args.min_lr > args.lr:
        raise UserError(f"--min-lr {args.min_lr:g} is above --lr {args.lr:g}")
    if args.lr * args.weight_decay >= 1:
        raise UserError(
            f"--weight-decay {args.weight_decay:g} with --lr {args.lr:g}: each update would scale"
            f" every weight by 1 - lr x wd = {1 - args.lr * args.weight_decay:g} (to zero or past"
            " it); lower one of them"
        )
    args.t_max = args.t_max or updates
    if args.warmup and args.warmup >= args.t_max:
        raise UserError(
            f"--warmup {args.warmup} is not shorter than the cosine's {args.t_max} updates"
            f" (--t-max), so the LR would never decay; use --warmup < {args.t_max}"
        )
    if args.ablation in ("noreg", "lora-only"):
        args.gate_reg = 0.0
    args.init = "uniform" if args.ablation in ("uniform-init", "lora-only") else "band"
    return updates
