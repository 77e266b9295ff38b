"""A training run's life around its updates: open it, restore it, record it, checkpoint it, stop it
safely.

train.py calls each of these by name; none of them changes what an update computes.

- `open_run`: the settings (a resumed run's recorded ones), the data (every file verified) and, in
  the process that writes the run folder, its lock; a new run's folder is made only once every input
  is checked.
- `TrainingRun.restore`: a resumed run's adapters, optimizer state and RNG, after checking that its
  data and model shape are the ones it trained on.
- `TrainingRun.record`: what every checkpoint records (and run.json, for a run with no checkpoint
  yet), the run's header line, its CSV logs.
- `TrainingRun.save`: an atomic checkpoint (latest and/or best), with the rows the run trained on.
- `TrainingRun.stop_nonfinite`: a non-finite loss or gradient stops the run before the update,
  naming the last good checkpoint and a command that works.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minroute.run.checkpoint import (
    adapter_tensors,
    atomic_write_text,
    check_same_shape,
    load_adapter,
    model_shape,
    nonfinite_tensors,
    optimizer_tensors,
    restore_optimizer,
    restore_rng,
    rng_state_tensors,
    save_checkpoint,
    trained_row_hashes,
    trained_rows_text,
)
from minroute.run.data import DataFolder
from minroute.run.distributed import device_change_note
from minroute.run.folders import open_inputs, start_run
from minroute.run.inputs import record_inputs
from minroute.run.load import hub_revision, resolve_dir
from minroute.run.log import RunLog
from minroute.run.resume import (
    last_good_checkpoint,
    nonfinite_advice,
    other_checkpoint_advice,
    repair_latest,
    resume_args,
)
from minroute.run.safety import RunLock, UserError, WriteError, os_cause


def open_run(args, parser, prepare_demo=None):
    """(args, data, lock, resume or None). parser: train.py's (for the commands messages advise);
    prepare_demo: data_prep.demo_assets.prepare_demo (builds --demo's model and data)."""
    # under torchrun only rank 0 writes the run folder
    writer = int(os.environ.get("RANK", "0")) == 0
    if not args.resume:
        # nothing made before every check
        data, lock = start_run(Path(args.out), args, writer, prepare_demo)
        args.extensions = []
        return args, data, lock, None
    args, resume = resume_args(args, parser)
    out = Path(args.out)
    lock = RunLock(out) if writer else None  # held until this process exits: no second writer
    if writer:
        repair_latest(out, resume[3])
    return args, open_inputs(args, new_run=False), lock, resume


@dataclass
class TrainingRun:
    """What run management shares: the settings, this process, the run's state (the update it starts
    at, the best validation CE, what every checkpoint records, the logs)."""

    args: object
    data: DataFolder
    parser: object
    rank: int = 0
    world: int = 1
    start: int = 0
    best: float = float("inf")
    meta: dict = field(default_factory=dict)
    rows_text: str = ""
    log: RunLog | None = None

    @property
    def out(self) -> Path:
        return Path(self.args.out)

    def say(self, *a, **k):  # under torchrun only rank 0 prints
        if self.rank == 0:
            print(*a, **k)

    def restore(self, route, opt, names: dict, resume, device, dtype):
        """A resumed run: the same data and model shape as its checkpoint, whose adapters, optimizer
        state and RNG are loaded (none when it stopped before its first checkpoint: it starts at
        update 0)."""
        args, out = self.args, self.out
        adapter, opt_state, meta, _ = resume
        if not self.data.same_as_trained(meta):
            raise UserError(
                f"{args.data} is not the data this run started on (its content differs); resume"
                " needs the same data (an identical rebuild is the same data)"
            )
        check_same_shape(meta, route.config, out)
        # else: no checkpoint yet, the run starts at update 0 with its recorded settings
        if adapter is not None:
            bad = nonfinite_tensors({**adapter, **opt_state})
            if bad:
                ckpt = out / f"ckpt-{meta['step']:06d}"
                raise UserError(
                    f"{ckpt}: holds non-finite values ({bad[0]}, ...), so it cannot be resumed; "
                    + other_checkpoint_advice(out, ckpt, meta["args"], self.parser, restore=False)
                )
            load_adapter(route, adapter, out)
            restore_optimizer(opt, opt_state, names, meta["step"])
            restore_rng(opt_state)
            self.start, self.best = meta["step"], meta.get("best_val_ce", float("inf"))
        self.say(f"resumed {out} at update {self.start}/{args.updates}")
        note = device_change_note(meta, device, dtype)
        if note:
            self.say(note, file=sys.stderr)
        if args.extensions and args.extensions[-1]["at_update"] == self.start:
            self.say(
                f"extended to {args.updates} updates; the LR schedule is unchanged (T_max"
                f" {args.t_max}, then min-lr {args.min_lr:g})"
            )

    def record(self, route, n_trainable: int, device, dtype):
        """What every checkpoint records (and run.json for a run with no checkpoint yet), the
        header, the logs."""
        args, out, data, cfg = self.args, self.out, self.data, route.config
        run_args = {k: v for k, v in vars(args).items() if k not in ("given", "restart")}
        self.meta = {
            "args": run_args,
            "model_config": model_shape(cfg),
            "manifest_sha256": data.raw_sha256,
            "data_sha256": data.identity,
            "model_revision": hub_revision(resolve_dir(args.model)),
            "device_type": device.type,
            "inputs": record_inputs(out, args, data.identity),
            "dtype": str(dtype).removeprefix("torch."),
        }
        self.rows_text = trained_rows_text(trained_row_hashes(data))
        if self.rank == 0 and self.start == 0:  # the settings of a run with no checkpoint yet
            try:
                atomic_write_text(out / "run.json", json.dumps(self.meta, indent=2))
            except OSError as e:
                raise WriteError(
                    f"{e.filename or out / 'run.json'}: cannot write the run's settings"
                    f" ({os_cause(e)}); free space (or make {out} writable) and run the command"
                    " again"
                ) from None
        n_train, n_val = len(data.split("train")), len(data.split("val"))
        self.say(
            f"LayerRoute on {args.model}: {cfg.num_hidden_layers} layers, trainable {n_trainable:,}"
            f" | data {args.data}: train {n_train} val {n_val} | {args.updates} updates of"
            f" {args.batch_size}x{args.accum} on {self.world} process(es) | preset {args.preset}"
            f" ablation {args.ablation} pool {args.pool} route-on {args.route_on} CE mean per"
            f" {args.ce_mean} | {device} {dtype}"
        )
        self.log = RunLog(out, self.start) if self.rank == 0 else None

    def save(self, step: int, route, opt, names: dict, periodic: bool, improved: bool):
        """Checkpoint update `step` (rank 0): adapters, optimizer state and RNG; latest and/or best
        point at it."""
        opt_t = {**optimizer_tensors(opt, names), **rng_state_tensors()}
        save_checkpoint(
            self.out,
            step,
            adapter_tensors(route),
            opt_t,
            {**self.meta, "best_val_ce": self.best},
            (["latest"] if periodic else []) + (["best"] if improved else []),
            extra={"trained_rows.txt": self.rows_text},
            keep_every=self.args.keep_every,
        )

    def stop_nonfinite(self, u: int, sums, grad_norm):
        """Stop before update u when its loss or gradient is not finite: nothing is saved; the
        message says where the last good checkpoint is and what to do."""
        self.close()
        raise UserError(
            f"non-finite loss or gradient at update {u} (loss {sums[0].item():.4g}, ce "
            f"{sums[1].item():.4g}, reg {sums[2].item():.4g}, grad norm {grad_norm.item():.4g}); "
            f"stopped before the update, nothing saved; {last_good_checkpoint(self.out)}. "
            f"{nonfinite_advice(u, self.args, self.parser)}"
        )

    def close(self):
        if self.log:
            self.log.close()
            self.log = None


def autocast_for(device: torch.device):
    """CUDA: bf16 autocast (bf16 frozen weights; LoRA, routers, AdamW state fp32); CPU: fp32, no
    autocast."""
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return lambda: torch.autocast("cpu", enabled=False)
