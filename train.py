"""Train LayerRoute: rank-8 LoRA on q/k/v/o and one router per block, jointly, on a frozen Qwen2.

    loss = CE + lambda * R,  R = mean soft gate over layers and the update's sequences

The paper's setup, as written (REFERENCE.md §3): 3,000 optimizer updates of 4 x 4 = 16 sequences,
AdamW lr 2e-4, cosine to 1e-6 over the run, clipping 1.0, routers on the mean over the *prompt's* real
tokens (what a deployment has at prefill), and CE = token mean over every counted token of the update (all
micro-batches, all processes), so how the 16 sequences are cut into micro-batches changes nothing:

    python -m data_prep --out data/agentic
    python train.py --data data/agentic --out runs/paper-s42 --seed 42

What the authors' code actually ran (REFERENCE.md §2): 3,000 micro-batches = 750 updates, cosine with
T_max 3000 (so the LR only decays to 1.71e-4), right padding to 512 with no padding mask in attention, the
routers on the mean over all 512 positions of prompt + answer (padding included), CE = the mean of the
micro-batch token means, and weight decay on every tensor:

    python train.py --data data/agentic --out runs/author-s42 --preset author --seed 42

Ablations (Table 2 rows): --ablation noreg | uniform-init | bce [--bce-target open|skip] (bce default
'open': tool calls = 1, the paper's text).
Offline CPU demo (a tiny random Qwen2 and the bundled demo corpus; about a minute):

    python train.py --demo --out runs/demo && python eval.py --demo --ckpt runs/demo

On CUDA the frozen weights are bf16 under autocast; LoRA, routers and AdamW state stay fp32. On CPU all
is fp32. Closed gates skip their block's backward (router.py). On CUDA `--deterministic` (the default) turns on
torch.use_deterministic_algorithms with CUBLAS_WORKSPACE_CONFIG=:4096:8: SDPA's fused backwards and
index-style accumulations otherwise add in whatever order the GPU schedules them, and one such rounding
difference can flip a gate sitting near 0.5, after which a killed and resumed run follows another path than
the uninterrupted one. `--no-deterministic` trades that guarantee for whatever speed it costs. The training step
reads the device back once per block (which rows are open, for the closed rows' no-backward split) and once per
update (the non-finite check); batches come pinned and copied without blocking. Checkpoints (adapters + optimizer + RNG,
safetensors + JSON with each file's sha256, and the device type and dtype trained in: resuming on another
device says what changes) are atomic; `--resume RUN_DIR` continues exactly from the run's
newest complete checkpoint (latest or best, whichever is later; from update 0 with the recorded settings,
run.json, if it stopped before its first), `--resume RUN_DIR/ckpt-N` from that checkpoint, and with
`--steps N` extends the run. An existing run folder is never overwritten: `--out` refuses it (resume it,
or `--restart`, which moves the old run aside). Every input is checked before the run folder is made or
moved. The best checkpoint is the one with the lowest validation CE (the regulariser is left out, so
"best" means best language model, not most skipping).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minroute.checkpoint import (adapter_tensors, atomic_write_text, build_layerroute, check_same_shape, load_adapter,
                                 model_shape, nonfinite_tensors, restore_rng, rng_state_tensors, save_checkpoint,
                                 trained_row_hashes, trained_rows_text)
from minroute.data import ROUTE_ON, DataFolder, TokenSplit, collate, counted_tokens, update_batches
from minroute.distributed import (all_reduce_, check_processes_fit, configure_determinism, device_change_note,
                                  finish_distributed, setup_distributed)
from minroute.load import hub_revision, load_tokenizer, resolve_dir
from minroute.loss import lm_loss_per_sample
from minroute.optim import AdamW, get_lr
from minroute.resume import last_good_checkpoint, nonfinite_advice, other_checkpoint_advice, repair_latest, resume_args
from minroute.router import bce_gate_loss, gate_regulariser
from minroute.runs import PRESETS, RunLog, check_demo_flags, fresh_acc, interval_stats, open_inputs, start_run
from minroute.safety import (ArgumentParser, RunLock, UserError, WriteError, default_device, device, nonneg_float,
                             nonneg_int, os_cause, positive_float, positive_int, probability, run_cli, seed_int)


def build_parser(suppress: bool = False):
    """The command line; with suppress, unset options stay absent (to see what a resume command changes)."""
    ap = ArgumentParser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("run")
    g.add_argument("--out", help="run folder: checkpoints, train_log.csv, gates.csv (must not hold a run)")
    g.add_argument("--data", help="folder built by `python -m data_prep`")
    g.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct", help="base model: local folder or Hub repo id")
    g.add_argument("--preset", choices=list(PRESETS), default="paper", help="paper (as written) or author (as run)")
    g.add_argument("--demo", action="store_true", help="offline CPU demo: tiny random model + bundled corpus")
    g.add_argument("--demo-assets", metavar="DIR", help="with --demo: build (once) and use the demo model and data in "
                                                        "DIR instead of the run folder (shared by a study's runs)")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest checkpoint, or RUN_DIR/ckpt-N "
                                                       "from that one (exactly); with --steps N, extend it to N")
    g.add_argument("--restart", action="store_true", help="start a new run in an --out folder that holds one: the "
                                                          "old run is moved to OUT.replaced-<time>, not deleted")
    g.add_argument("--seed", type=seed_int, default=42, help="data order, LoRA init and dropout (0 to 2**32 - 1)")
    g.add_argument("--device", type=device, default=default_device(), help="cpu, cuda or cuda:N")
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=True,
                   help="CUDA: deterministic algorithms and cuBLAS workspace (CUBLAS_WORKSPACE_CONFIG=:4096:8), so a "
                        "killed and resumed run is bitwise the uninterrupted one (a rounding difference can flip a "
                        "gate near 0.5); on by default. CPU is deterministic either way")
    g.add_argument("--ddp-backend", choices=["auto", "gloo"], default="auto",
                   help="torchrun: auto = NCCL on CUDA (one GPU per process; more processes than GPUs are refused), "
                        "gloo on CPU; gloo = gloo on CUDA too, several processes may share a GPU (for testing)")
    add_training_options(ap)
    if suppress:  # argparse keeps the defaults on the actions; SUPPRESS leaves unset options out of the namespace
        for action in ap._actions:
            action.default = argparse.SUPPRESS
    return ap


def add_training_options(ap):
    """How a run trains: optimisation, the method's settings, logging and checkpoints."""
    g = ap.add_argument_group("optimisation")
    g.add_argument("--steps", type=positive_int,
                   help="optimizer updates (paper preset) or micro-batches (author preset); 3000")
    g.add_argument("--batch-size", type=positive_int, help="sequences per micro-batch (4)")
    g.add_argument("--accum", type=positive_int, help="micro-batches per optimizer update (4)")
    g.add_argument("--lr", type=positive_float, help="peak learning rate (2e-4)")
    g.add_argument("--min-lr", type=nonneg_float, default=1e-6, help="cosine floor")
    g.add_argument("--warmup", type=nonneg_int, default=0, help="linear warmup updates (authors: 0)")
    g.add_argument("--t-max", type=positive_int, help="cosine length in updates (default: the run's updates; "
                                                      "author: 3000)")
    g.add_argument("--weight-decay", type=nonneg_float, default=0.01)
    g.add_argument("--clip", type=nonneg_float, default=1.0, help="global gradient-norm clip (0 = off)")
    g.add_argument("--chunk", type=positive_int, default=512, help="tokens per LM-head chunk in the loss")
    g = ap.add_argument_group("method")
    g.add_argument("--lora-r", type=positive_int, default=8)
    g.add_argument("--lora-alpha", type=positive_float, default=16)
    g.add_argument("--lora-dropout", type=probability, default=0.05)
    g.add_argument("--gate-reg", type=nonneg_float, default=1.0, help="lambda of the gate regulariser")
    g.add_argument("--ablation", choices=["none", "noreg", "uniform-init", "bce"], default="none",
                   help="noreg: lambda 0; uniform-init: every router starts open; bce: BCE on step type")
    g.add_argument("--bce-target", choices=["open", "skip"], default="open",
                   help="bce label: 'open' = tool calls 1 (the paper's text; authors' bce_naive), "
                        "'skip' = tool calls 0 (authors' bce_corrected)")
    g.add_argument("--pool", choices=["mask", "all"], help="router input: mean over real tokens, or the authors' "
                   "forward (all positions incl. padding, no padding mask in attention)")
    g.add_argument("--route-on", choices=ROUTE_ON, help="positions the routers pool: the prompt (what deployment "
                   "sees at prefill; paper preset) or prompt + answer (authors': author preset)")
    g.add_argument("--pad-to", type=nonneg_int, help="pad batches to this length (0 = longest in batch; author: 512)")
    g.add_argument("--sort-by-length", type=nonneg_int, choices=[0, 1], help="sort each update's sequences by length "
                   "before cutting micro-batches, so less compute goes to padding (paper 1, author 0)")
    g = ap.add_argument_group("logging and checkpoints")
    g.add_argument("--log-every", type=positive_int, help="updates between log lines (10)")
    g.add_argument("--eval-every", type=positive_int, help="updates between validations (paper 200, author 50)")
    g.add_argument("--val-batches", type=nonneg_int, help="validation micro-batches, 0 = the whole val split (30)")
    g.add_argument("--save-every", type=positive_int, help="updates between checkpoints (200)")


def parse_args(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    if not args.resume and not args.out:
        ap.error("--out RUN_DIR is required for a new run (or --resume RUN_DIR to continue one)")
    args.given = vars(build_parser(suppress=True).parse_args(argv))  # only what the command line set
    if args.resume and args.restart:
        raise UserError(f"--resume {args.resume} --restart: --resume continues a run, --restart starts a new one in "
                        "its folder (with --out); give one of them")
    if not args.resume:
        check_demo_flags(args)
    return args


@dataclass
class Run:
    """What the phases of main share: the settings, this process, the model and its optimiser, and the run's
    state (the update it starts at, the best validation CE, what every checkpoint records, the logs)."""
    args: argparse.Namespace
    out: Path
    data: DataFolder
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype
    route: torch.nn.Module
    pad_id: int
    opt: AdamW
    names: dict
    trainable: list
    start: int = 0
    best: float = float("inf")
    meta: dict | None = None
    rows_text: str = ""
    log: RunLog | None = None

    def say(self, *a, **k):  # under torchrun only rank 0 prints
        if self.rank == 0:
            print(*a, **k)

    def autocast(self):  # CUDA: bf16 autocast (bf16 frozen weights; LoRA, routers, AdamW state fp32); CPU: fp32
        cuda = self.device.type == "cuda"
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)


def main(argv=None):
    args = parse_args(argv)
    check_processes_fit(args)  # before anything touches --out
    args, data, lock, resume = open_run(args)
    configure_determinism(args)  # before any CUDA work
    rank, world = setup_distributed(args)
    torch.manual_seed(args.seed)  # LoRA A init: the same in every process
    run = build(args, data, rank, world)
    if resume:
        restore(run, resume)
    record(run)
    t_run = time.time()
    train_loop(run)
    if run.log:
        run.log.close()
    finish_distributed(world)
    if lock:
        lock.release()
    run.say(f"done: {args.updates} updates in {time.time() - t_run:.1f}s; best val CE {run.best:.4f}; checkpoints in "
            f"{run.out}")
    return 0


def open_run(args):
    """The settings (a resumed run's recorded ones), the data, and in the process that writes the run folder its
    lock (a new run's folder is made once every input is checked). Returns (args, data, lock, resume or None)."""
    writer = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 writes the run folder
    if not args.resume:
        data, lock = start_run(Path(args.out), args, writer)  # nothing is made or moved before every input is checked
        args.extensions = []
        return args, data, lock, None
    args, resume = resume_args(args, build_parser())
    out = Path(args.out)
    lock = RunLock(out) if writer else None  # held until this process exits: no second writer
    if writer:
        repair_latest(out, resume[3])
    return args, open_inputs(args, new_run=False), lock, resume


def build(args, data: DataFolder, rank: int, world: int) -> Run:
    """The frozen model with its LoRA adapters and routers, and AdamW over them, on the training device."""
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    route = build_layerroute(args.model, {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout},
                             pool=args.pool, init=args.init, device=device, dtype=dtype)
    pad_id = load_tokenizer(args.model).pad_id
    groups = param_groups(route, args.weight_decay, args.decay_biases)
    opt = AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    return Run(args, Path(args.out), data, rank, world, device, dtype, route, pad_id, opt,
               names={p: n for n, p in route.named_parameters()}, trainable=[p for g in groups for p in g["params"]])


def restore(run: Run, resume):
    """A resumed run: the same data and model shape as its checkpoint, whose adapters, optimizer state and RNG
    are loaded (none when it stopped before its first checkpoint: it starts at update 0)."""
    args, out = run.args, run.out
    adapter, opt_state, meta, _ = resume
    if not run.data.same_as_trained(meta):
        raise UserError(f"{args.data} is not the data this run started on (its content differs); resume needs the "
                        "same data (an identical rebuild is the same data)")
    check_same_shape(meta, run.route.config, out)
    if adapter is not None:  # else: no checkpoint yet, the run starts at update 0 with its recorded settings
        bad = nonfinite_tensors({**adapter, **opt_state})
        if bad:
            ckpt = out / f"ckpt-{meta['step']:06d}"
            raise UserError(f"{ckpt}: holds non-finite values ({bad[0]}, ...), so it cannot be resumed; "
                            + other_checkpoint_advice(out, ckpt, meta["args"], build_parser(), restore=False))
        load_adapter(run.route, adapter, out)
        run.opt.load_state_tensors(opt_state, run.names, meta["step"])
        restore_rng(opt_state)
        run.start, run.best = meta["step"], meta.get("best_val_ce", float("inf"))
    run.say(f"resumed {out} at update {run.start}/{args.updates}")
    note = device_change_note(meta, run.device, run.dtype)
    if note:
        run.say(note, file=sys.stderr)
    if args.extensions and args.extensions[-1]["at_update"] == run.start:
        run.say(f"extended to {args.updates} updates; the LR schedule is unchanged (T_max {args.t_max}, then "
                f"min-lr {args.min_lr:g})")


def record(run: Run):
    """What every checkpoint records (and run.json, for a run with no checkpoint yet), the run's header, its logs."""
    args, out, data, cfg = run.args, run.out, run.data, run.route.config
    run_args = {k: v for k, v in vars(args).items() if k not in ("given", "restart")}
    run.meta = {"args": run_args, "model_config": model_shape(cfg), "manifest_sha256": data.raw_sha256,
                "data_sha256": data.identity, "model_revision": hub_revision(resolve_dir(args.model)),
                "device_type": run.device.type, "dtype": str(run.dtype).removeprefix("torch.")}
    run.rows_text = trained_rows_text(trained_row_hashes(data))
    if run.rank == 0 and run.start == 0:  # the settings of a run with no checkpoint yet: --resume starts it from 0
        try:
            atomic_write_text(out / "run.json", json.dumps(run.meta, indent=2))
        except OSError as e:
            raise WriteError(f"{e.filename or out / 'run.json'}: cannot write the run's settings ({os_cause(e)}); "
                             f"free space (or make {out} writable) and run the command again") from None
    train_split, val_split = data.split("train"), data.split("val")
    run.say(f"LayerRoute on {args.model}: {cfg.num_hidden_layers} layers, trainable "
            f"{sum(p.numel() for p in run.trainable):,} | data {args.data}: train {len(train_split)} val "
            f"{len(val_split)} | {args.updates} updates of {args.batch_size}x{args.accum} on {run.world} process(es) | "
            f"preset {args.preset} ablation {args.ablation} pool {args.pool} route-on {args.route_on} CE mean per "
            f"{args.ce_mean} | {run.device} {run.dtype}")
    run.log = RunLog(out, run.start) if run.rank == 0 else None


def train_loop(run: Run):
    """The optimizer updates from run.start: log every --log-every, validate every --eval-every (rank 0), and
    checkpoint every --save-every and whenever the validation CE is the best yet."""
    args, route, updates, main_proc = run.args, run.route, run.args.updates, run.rank == 0
    train_split, val_split = run.data.split("train"), run.data.split("val")
    route.train()
    acc = fresh_acc(run.device)
    for u in range(run.start, updates):
        lr = get_lr(u, args.lr, args.t_max, args.warmup, args.min_lr)
        run.opt.set_lr(lr)
        sums = accumulate_update(route, train_split, u, args, run.pad_id, run.autocast, run.device, acc, run.rank,
                                 run.world)
        grad_norm, finite = finish_update(run.opt, run.trainable, sums, args.clip, run.world, run.device)
        if not finite:
            stop_nonfinite(run, u, sums, grad_norm)
        acc["sums"] += sums
        acc["n"] += 1
        step = u + 1
        row, gate_rows = None, []
        if step % args.log_every == 0 or step == updates:
            if run.device.type == "cuda":
                torch.cuda.synchronize()
            row, gate_rows = interval_stats(acc, route, step, lr, float(grad_norm))  # this process's batches
            run.say(f"{step:5d}/{updates} | loss {row['loss']:.4f} | ce {row['ce']:.4f} | reg {row['reg']:.4f} | "
                    f"skip% tool {row['skip_tool']:5.1f} plan {row['skip_plan']:5.1f} | lr {lr:.3e} | "
                    f"dt {row['dt'] * 1000:.0f} ms | tok/s {row['tok_s']:.0f} | "
                    f"eta {(updates - step) * row['dt'] / 60:.1f} min", flush=True)
            acc = fresh_acc(run.device)
        improved = False
        if main_proc and (step % args.eval_every == 0 or step == updates):
            vce, vt, vp = validate(route, val_split, args, run.pad_id, run.autocast, run.device)
            run.say(f"      val | ce {vce:.4f} | skip% tool {vt:5.1f} plan {vp:5.1f} | diff {vt - vp:+.2f}", flush=True)
            row = row or {"step": step, "lr": lr}
            row.update(val_ce=vce, val_skip_tool=vt, val_skip_plan=vp)
            improved, run.best = vce < run.best, min(run.best, vce)
        if main_proc:
            run.log.write(row, gate_rows)
            periodic = step % args.save_every == 0 or step == updates
            if periodic or improved:
                opt_t = {**run.opt.state_tensors(run.names), **rng_state_tensors()}
                save_checkpoint(run.out, step, adapter_tensors(route), opt_t, {**run.meta, "best_val_ce": run.best},
                                (["latest"] if periodic else []) + (["best"] if improved else []),
                                extra={"trained_rows.txt": run.rows_text})
        if acc["n"] == 0:  # the next interval's time starts after validation and checkpointing
            acc["t0"] = time.time()


def stop_nonfinite(run: Run, u: int, sums, grad_norm):
    """Stop before update u when its loss or gradient is not finite: nothing is saved; the message says where the
    last good checkpoint is and what to do."""
    if run.log:
        run.log.close()
    raise UserError(f"non-finite loss or gradient at update {u} (loss {sums[0].item():.4g}, ce "
                    f"{sums[1].item():.4g}, reg {sums[2].item():.4g}, grad norm {grad_norm.item():.4g}); "
                    f"stopped before the update, nothing saved; {last_good_checkpoint(run.out)}. "
                    f"{nonfinite_advice(u, run.args, build_parser())}")


def param_groups(route, weight_decay: float, decay_biases: bool):
    lora = [p for n, p in route.named_parameters() if n.endswith((".lora_A", ".lora_B"))]
    r_w = [r.weight for r in route.routers]
    r_b = [r.bias for r in route.routers]
    return [{"params": lora, "weight_decay": weight_decay, "name": "lora"},
            {"params": r_w, "weight_decay": weight_decay, "name": "router_weight"},
            {"params": r_b, "weight_decay": weight_decay if decay_biases else 0.0, "name": "router_bias"}]


def forward_loss(route, batch, args, autocast, n_tokens: int, n_seqs: int):
    """Loss of one micro-batch, scaled so that the update's sum of them is its loss; and its gates.

    ce_mean 'update' (paper): CE summed here / the update's counted tokens (n_tokens), so the update's CE is a
    token mean over all of its micro-batches and processes; the regulariser (or BCE) is weighted by this
    micro-batch's share of the update's sequences (n_seqs). ce_mean 'micro' (authors'): each micro-batch's token
    mean CE plus lambda R, divided by accum. Returns (loss, ce part, reg part, soft, hard), scaled alike.
    """
    counted = (batch["loss_index"], batch["loss_target"]) if "loss_index" in batch else None  # from collate
    with autocast():
        h, soft, hard = route.gated_hidden(batch["input_ids"], batch["attention_mask"], batch.get("route_mask"),
                                           padded=getattr(batch, "padded", None),
                                           lengths=getattr(batch, "lengths", None))
        ce_sums, counts = lm_loss_per_sample(h, route.lm_head.weight, batch["labels"], chunk=args.chunk,
                                             counted=counted)
    if args.ablation == "bce":  # LayerRoute-BCE: the regulariser replaced by BCE on the step type
        reg = bce_gate_loss(soft, batch["is_tool"], args.bce_target)
    else:
        reg = gate_regulariser(soft)
    if args.ce_mean == "update":
        ce, reg = ce_sums.sum() / n_tokens, reg * (soft.shape[0] / n_seqs)
    else:
        ce, reg = ce_sums.sum() / counts.sum().clamp(min=1) / args.accum, reg / args.accum
    return ce + args.gate_reg * reg, ce, reg, soft, hard


def accumulate_update(route, split: TokenSplit, u: int, args, pad_id, autocast, device, acc=None, rank=0, world=1):
    """Forward and backward of this process's micro-batches of update u (gradients accumulate in .grad).

    Returns the update's [loss, ce, reg, real tokens] on the device; appends gates to acc. Reads nothing back from
    the device but each block's open-row count (router.py); batches are pinned and copied without blocking."""
    device = torch.device(device)
    sums = torch.zeros(4, dtype=torch.float32, device=device)
    micro_batches = update_batches(split, u, args.batch_size, args.accum, args.seed, args.sort_by_length)
    n_tokens = counted_tokens(split, np.concatenate(micro_batches)) if args.ce_mean == "update" else 0
    for m in range(rank, args.accum, world):  # this process's share of the update's micro-batches
        torch.manual_seed(args.seed * 1_000_003 + u * args.accum + m)  # dropout masks: per micro-batch, any process
        batch = collate(split, micro_batches[m], pad_id, args.pad_to or None, route_on=args.route_on).to(
            device, non_blocking=True)
        loss, ce, reg, soft, hard = forward_loss(route, batch, args, autocast, max(n_tokens, 1),
                                                 args.batch_size * args.accum)
        loss.backward()
        sums += torch.stack([loss.detach(), ce.detach(), reg.detach(), batch["attention_mask"].sum().float()])
        if acc is not None:
            acc["soft"].append(soft.detach().float())
            acc["hard"].append(hard)
            acc["tool"].append(batch["is_tool"])
    return sums


def finish_update(opt, trainable, sums, clip: float, world: int, device) -> tuple[torch.Tensor, bool]:
    """The rest of an update after its micro-batches: zero gradients for tensors no open row reached (they still
    take their AdamW step, as dense training would), the sum over processes, clipping, the update's one host
    read (is the loss and gradient finite?), then AdamW. Returns (grad norm, finite); not finite: no step taken."""
    for p in trainable:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if world > 1:  # sum gradients (and the logged sums) over processes: the update sees all 16 sequences
        all_reduce_([p.grad for p in trainable] + [sums], device)  # one flat fp32 reduction
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, clip if clip > 0 else float("inf"))
    if not bool(torch.isfinite(grad_norm) & torch.isfinite(sums[0])):  # the one host read of the update
        return grad_norm, False
    opt.step()
    opt.zero_grad()
    return grad_norm, True


@torch.no_grad()
def validate(route, val: TokenSplit, args, pad_id, autocast, device):
    """Validation CE (token mean, no regulariser) and skip% per step type, with real skipping."""
    route.eval()
    n = len(val) if args.val_batches == 0 else min(len(val), args.val_batches * args.batch_size)
    ce_sum = torch.zeros((), dtype=torch.float64, device=device)
    tok, skips = 0, {0: [], 1: []}
    for a in range(0, n, args.batch_size):
        batch = collate(val, range(a, min(n, a + args.batch_size)), pad_id, args.pad_to or None,
                        route_on=args.route_on)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            h = route.hidden(batch["input_ids"], batch["attention_mask"], route_mask=batch.get("route_mask"))
            sums, counts = lm_loss_per_sample(h, route.lm_head.weight, batch["labels"], args.chunk)
        ce_sum += sums.sum()
        tok += int(counts.sum())
        skip = 1 - route.last.hard.float().mean(1)
        for b, tool in enumerate(batch["is_tool"].tolist()):
            skips[0 if tool else 1].append(float(skip[b]))
    route.train()
    pct = {k: 100 * float(np.mean(v)) if v else float("nan") for k, v in skips.items()}
    return float(ce_sum) / max(tok, 1), pct[0], pct[1]


if __name__ == "__main__":
    sys.exit(run_cli(main))
