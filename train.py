"""Train LayerRoute: rank-8 LoRA on q/k/v/o and one router per block, jointly, on a frozen decoder.

    loss = CE + lambda * R,  R = mean soft gate over layers and the update's sequences

Read it top to bottom: the command line, `main` (settings, data, model, the loop, save), then
`one_update`, one optimizer update whole.
The method is in minroute/core/ (router.py: gates and the straight-through estimator; update.py: the
loss, get_lr, AdamW); the two presets are in minroute/run/settings.py; docs/reference.md says what
the paper and the authors' code did.

The paper, as written (3,000 optimizer updates of 4 x 4 sequences, AdamW lr 2e-4, cosine to 1e-6,
clip 1.0, routers on the mean of the prompt's real tokens, CE a token mean over the whole update):

    python -m data_prep --out data/agentic
    python train.py --data data/agentic --out runs/paper-s42 --seed 42

What the authors' code actually ran (3,000 micro-batches = 750 updates, T_max 3000, padding pooled
and not masked, the mean of micro-batch means, weight decay on every tensor), and the ablations of
Table 2:

    python train.py --data data/agentic --out runs/author-s42 --preset author --seed 42
    python train.py --data data/agentic --out runs/noreg-s42 --ablation noreg  # uniform-init, bce

Offline CPU demo (a tiny random Qwen2 and the bundled demo corpus; about 30 s):

    python train.py --demo --out runs/demo && python eval.py --demo --ckpt runs/demo

On CUDA the frozen weights are bf16 under autocast; LoRA, routers and AdamW state stay fp32; on CPU
all is fp32. `--deterministic` (CUDA, the default) makes a killed and resumed run bitwise the
uninterrupted one. Checkpoints are atomic and hashed; `--resume RUN_DIR` continues exactly (`--steps
N` extends); `--out` never overwrites a run (`--restart` moves it aside). "best" is the checkpoint
with the lowest validation CE (without the regulariser).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from data_prep.demo_assets import prepare_demo
from minroute.core.router import skip_percent
from minroute.core.update import get_lr, micro_batch_loss, param_groups
from minroute.fast.kernels import ForeachAdamW, lm_loss_per_sample
from minroute.fast.packing import train_forward
from minroute.run.checkpoint import build_layerroute
from minroute.run.data import ROUTE_ON, TokenSplit, collate, counted_tokens, update_batches
from minroute.run.distributed import (
    all_reduce_,
    check_processes_fit,
    configure_determinism,
    finish_distributed,
    setup_distributed,
)
from minroute.run.lifecycle import TrainingRun, autocast_for, open_run
from minroute.run.load import load_tokenizer
from minroute.run.log import fresh_acc, interval_stats
from minroute.run.safety import (
    ArgumentParser,
    UserError,
    default_device,
    device,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    probability,
    run_cli,
    seed_int,
)
from minroute.run.settings import PRESETS, check_demo_flags

# ----------------------------------------------------------------------------- the command line


def build_parser(suppress: bool = False):
    """The command line; with suppress, unset options stay absent (to see what a resume command
    changes)."""
    ap = ArgumentParser(
        prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = ap.add_argument_group("run")
    g.add_argument(
        "--out", help="run folder: checkpoints, train_log.csv, gates.csv (must not hold a run)"
    )
    g.add_argument("--data", help="folder built by `python -m data_prep`")
    g.add_argument(
        "--model",
        default="Qwen/Qwen2.5-0.5B-Instruct",
        help="base model: local folder or Hub repo id",
    )
    g.add_argument(
        "--preset",
        choices=list(PRESETS),
        default="paper",
        help="paper (as written) or author (as run)",
    )
    g.add_argument(
        "--demo", action="store_true", help="offline CPU demo: tiny random model + bundled corpus"
    )
    g.add_argument(
        "--demo-assets",
        metavar="DIR",
        help=(
            "with --demo: build (once) and use the demo model and data in "
            "DIR instead of the run folder (shared by a study's runs)"
        ),
    )
    g.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help=(
            "continue a run from its newest checkpoint, or RUN_DIR/ckpt-N "
            "from that one (exactly); with --steps N, extend it to N"
        ),
    )
    g.add_argument(
        "--restart",
        action="store_true",
        help=(
            "start a new run in an --out folder that holds one: the "
            "old run is moved to OUT.replaced-<time>, not deleted"
        ),
    )
    g.add_argument(
        "--seed",
        type=seed_int,
        default=42,
        help="data order, LoRA init and dropout (0 to 2**32 - 1)",
    )
    g.add_argument("--device", type=device, default=default_device(), help="cpu, cuda or cuda:N")
    g.add_argument(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=(
            "CUDA: deterministic algorithms and cuBLAS workspace (CUBLAS_WORKSPACE_CONFIG=:4096:8),"
            " so a killed and resumed run is bitwise the uninterrupted one (a rounding difference"
            " can flip a gate near 0.5); on by default. CPU is deterministic either way"
        ),
    )
    g.add_argument(
        "--ddp-backend",
        choices=["auto", "gloo"],
        default="auto",
        help=(
            "torchrun: auto = NCCL on CUDA (one GPU per process; more processes than GPUs are"
            " refused), gloo on CPU; gloo = gloo on CUDA too, several processes may share a GPU"
            " (for testing)"
        ),
    )
    add_training_options(ap)
    # argparse keeps the defaults on the actions; SUPPRESS leaves unset options out of the namespace
    if suppress:
        for action in ap._actions:
            action.default = argparse.SUPPRESS
    return ap


def add_training_options(ap):
    """How a run trains: optimisation, the method's settings, logging and checkpoints."""
    g = ap.add_argument_group("optimisation")
    g.add_argument(
        "--steps",
        type=positive_int,
        help="optimizer updates (paper preset) or micro-batches (author preset); 3000",
    )
    g.add_argument("--batch-size", type=positive_int, help="sequences per micro-batch (4)")
    g.add_argument("--accum", type=positive_int, help="micro-batches per optimizer update (4)")
    g.add_argument("--lr", type=positive_float, help="peak learning rate (2e-4)")
    g.add_argument("--min-lr", type=nonneg_float, default=1e-6, help="cosine floor")
    g.add_argument(
        "--warmup", type=nonneg_int, default=0, help="linear warmup updates (authors: 0)"
    )
    g.add_argument(
        "--t-max",
        type=positive_int,
        help="cosine length in updates (default: the run's updates; author: 3000)",
    )
    g.add_argument("--weight-decay", type=nonneg_float, default=0.01)
    g.add_argument(
        "--clip", type=nonneg_float, default=1.0, help="global gradient-norm clip (0 = off)"
    )
    g.add_argument(
        "--chunk", type=positive_int, default=512, help="tokens per LM-head chunk in the loss"
    )
    g = ap.add_argument_group("method")
    g.add_argument("--lora-r", type=positive_int, default=8)
    g.add_argument("--lora-alpha", type=positive_float, default=16)
    g.add_argument("--lora-dropout", type=probability, default=0.05)
    g.add_argument(
        "--gate-reg", type=nonneg_float, default=1.0, help="lambda of the gate regulariser"
    )
    g.add_argument(
        "--ablation",
        choices=["none", "noreg", "uniform-init", "bce", "lora-only"],
        default="none",
        help=(
            "noreg: lambda 0; uniform-init: every router starts open; bce: BCE on step type;"
            " lora-only: every block open for every row, the routers never train (LoRA alone)"
        ),
    )
    g.add_argument(
        "--bce-target",
        choices=["open", "skip"],
        default="open",
        help=(
            "bce label: 'open' = tool calls 1 (the paper's text; authors' bce_naive), "
            "'skip' = tool calls 0 (authors' bce_corrected)"
        ),
    )
    g.add_argument(
        "--pool",
        choices=["mask", "all"],
        help=(
            "router input: mean over real tokens, or the authors' "
            "forward (all positions incl. padding, no padding mask in attention)"
        ),
    )
    g.add_argument(
        "--route-on",
        choices=ROUTE_ON,
        help=(
            "positions the routers pool: the prompt (what deployment "
            "sees at prefill; paper preset) or prompt + answer (authors': author preset)"
        ),
    )
    g.add_argument(
        "--pad-to",
        type=nonneg_int,
        help="pad batches to this length (0 = longest in batch; author: 512)",
    )
    g.add_argument(
        "--sort-by-length",
        type=nonneg_int,
        choices=[0, 1],
        help=(
            "sort each update's sequences by length "
            "before cutting micro-batches, so less compute goes to padding (paper 1, author 0)"
        ),
    )
    g = ap.add_argument_group("logging and checkpoints")
    g.add_argument("--log-every", type=positive_int, help="updates between log lines (10)")
    g.add_argument(
        "--eval-every", type=positive_int, help="updates between validations (paper 200, author 50)"
    )
    g.add_argument(
        "--val-batches",
        type=nonneg_int,
        help="validation micro-batches, 0 = the whole val split (30)",
    )
    g.add_argument("--save-every", type=positive_int, help="updates between checkpoints (200)")
    g.add_argument(
        "--keep-every",
        type=nonneg_int,
        default=0,
        help=(
            "also checkpoint every N updates and keep those (ckpt-<update>/, for a learning curve);"
            " 0 = keep only latest and best"
        ),
    )


def parse_args(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    if not args.resume and not args.out:
        ap.error("--out RUN_DIR is required for a new run (or --resume RUN_DIR to continue one)")
    # only what the command line set
    args.given = vars(build_parser(suppress=True).parse_args(argv))
    if args.resume and args.restart:
        raise UserError(
            f"--resume {args.resume} --restart: --resume continues a run, --restart starts a new"
            " one in its folder (with --out); give one of them"
        )
    if not args.resume:
        check_demo_flags(args)
    return args


# ----------------------------------------------------------------------------- training


def main(argv=None):
    args = parse_args(argv)
    check_processes_fit(args)  # before anything touches --out
    # settings, data, the folder's lock
    args, data, lock, resume = open_run(args, build_parser(), prepare_demo)
    configure_determinism(args)  # before any CUDA work
    rank, world = setup_distributed(args)
    run = TrainingRun(args, data, build_parser(), rank, world)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    autocast = autocast_for(dev)
    updates, main_proc = args.updates, rank == 0

    # the model: the frozen decoder + LoRA on q/k/v/o + one router per block, and AdamW over what
    # trains
    torch.manual_seed(args.seed)  # LoRA A init: the same in every process
    lora = {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout}
    route = build_layerroute(
        args.model, lora, pool=args.pool, init=args.init, device=dev, dtype=dtype
    )
    if args.ablation == "lora-only":  # the open init (w = 0, b = +1: p = 0.73) stays: all run
        route.routers.requires_grad_(False)
    groups = param_groups(route, args.weight_decay, args.decay_biases)
    # = core.update.AdamW, fewer ops
    opt = ForeachAdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    trainable = [p for g in groups for p in g["params"]]
    names = {p: n for n, p in route.named_parameters()}
    if resume:
        run.restore(route, opt, names, resume, dev, dtype)
    run.record(route, sum(p.numel() for p in trainable), dev, dtype)
    pad_id = load_tokenizer(args.model).pad_id
    train, val = data.split("train"), data.split("val")
    t_run = time.time()
    route.train()
    acc = fresh_acc(dev)
    for u in range(run.start, updates):
        lr, sums, grad_norm, finite = one_update(
            u, route, opt, trainable, train, args, pad_id, autocast, dev, acc, rank, world
        )
        if not finite:
            # nothing was stepped: the run is as it was before update u
            run.stop_nonfinite(u, sums, grad_norm)
        # ------------------------------------------------------------------- logging, validation,
        # checkpoints
        acc["sums"] += sums
        acc["n"] += 1
        step = u + 1
        row, gate_rows = None, []
        if step % args.log_every == 0 or step == updates:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            # this process's batches
            row, gate_rows = interval_stats(acc, route, step, lr, float(grad_norm))
            run.say(
                f"{step:5d}/{updates} | loss {row['loss']:.4f} | ce {row['ce']:.4f} | reg"
                f" {row['reg']:.4f} | skip% tool {row['skip_tool']:5.1f} plan"
                f" {row['skip_plan']:5.1f} | lr {lr:.3e} | dt {row['dt'] * 1000:.0f} ms | tok/s"
                f" {row['tok_s']:.0f} | eta {(updates - step) * row['dt'] / 60:.1f} min",
                flush=True,
            )
            acc = fresh_acc(dev)
        improved = False
        if main_proc and (step % args.eval_every == 0 or step == updates):
            vce, vt, vp = validate(route, val, args, pad_id, autocast, dev)
            run.say(
                f"      val | ce {vce:.4f} | skip% tool {vt:5.1f} plan {vp:5.1f} | diff"
                f" {vt - vp:+.2f}",
                flush=True,
            )
            row = row or {"step": step, "lr": lr}
            row.update(val_ce=vce, val_skip_tool=vt, val_skip_plan=vp)
            improved, run.best = vce < run.best, min(run.best, vce)
        if main_proc:
            run.log.write(row, gate_rows)
            kept = args.keep_every > 0 and step % args.keep_every == 0
            periodic = step % args.save_every == 0 or step == updates or kept
            if periodic or improved:
                run.save(step, route, opt, names, periodic, improved)
        if acc["n"] == 0:  # the next interval's time starts after validation and checkpointing
            acc["t0"] = time.time()
    run.close()
    finish_distributed(world)
    if lock:
        lock.release()
    run.say(
        f"done: {updates} updates in {time.time() - t_run:.1f}s; best val CE {run.best:.4f};"
        f" checkpoints in {run.out}"
    )
    return 0


def one_update(
    u,
    route,
    opt,
    trainable,
    split: TokenSplit,
    args,
    pad_id,
    autocast,
    dev,
    acc=None,
    rank=0,
    world=1,
):
    """Optimizer update u (0-based), whole: its LR, this process's share of its micro-batches
    (forward, loss, backward), the gradients summed over processes, clipping, and the AdamW step,
    which is not taken when the loss or the gradient is not finite. acc collects the gates for the
    log. Returns (lr, sums, grad norm, finite), sums = the update's [loss, ce, reg, real tokens] on
    the device."""
    lr = get_lr(u, args.lr, args.t_max, args.warmup, args.min_lr)
    opt.set_lr(lr)
    micro_batches = update_batches(
        split, u, args.batch_size, args.accum, args.seed, args.sort_by_length
    )
    n_tokens = (
        counted_tokens(split, np.concatenate(micro_batches)) if args.ce_mean == "update" else 0
    )
    bce_target = args.bce_target if args.ablation == "bce" else None
    sums = torch.zeros(4, dtype=torch.float32, device=dev)
    for m in range(rank, args.accum, world):  # this process's share of the update's micro-batches
        # dropout masks: per micro-batch
        torch.manual_seed(args.seed * 1_000_003 + u * args.accum + m)
        batch = collate(
            split, micro_batches[m], pad_id, args.pad_to or None, route_on=args.route_on
        )
        batch = batch.to(dev, non_blocking=True)
        with autocast():
            h, soft, hard = (
                train_forward(  # = route.gated_hidden (core), without the work that cannot matter
                    route,
                    batch["input_ids"],
                    batch["attention_mask"],
                    batch.get("route_mask"),
                    padded=batch.padded,
                    lengths=batch.lengths,
                )
            )
            ce_sums, counts = (
                lm_loss_per_sample(  # = core.update.lm_loss_per_sample, no (B, T, V) logits
                    h,
                    route.lm_head.weight,
                    batch["labels"],
                    chunk=args.chunk,
                    counted=(batch["loss_index"], batch["loss_target"]),
                )
            )
        loss, ce, reg = (
            micro_batch_loss(  # CE + lambda R, scaled so the micro-batches sum to the update's loss
                ce_sums,
                counts,
                soft,
                batch["is_tool"],
                lam=args.gate_reg,
                ce_mean=args.ce_mean,
                accum=args.accum,
                n_tokens=max(n_tokens, 1),
                n_seqs=args.batch_size * args.accum,
                bce_target=bce_target,
            )
        )
        loss.backward()  # gradients accumulate over the update's micro-batches
        sums += torch.stack(
            [loss.detach(), ce.detach(), reg.detach(), batch["attention_mask"].sum().float()]
        )
        if acc is not None:
            acc["soft"].append(soft.detach().float())
            acc["hard"].append(hard)
            acc["tool"].append(batch["is_tool"])
    # a tensor no open row reached still takes its AdamW step, as in dense training
    for p in trainable:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    # sum gradients (and the logged sums) over processes: the update sees all its sequences
    if world > 1:
        all_reduce_([p.grad for p in trainable] + [sums], dev)
    if acc is not None:  # the log's gradient norms before the clip, per group: what sets the clip
        acc["grad_groups"] = {
            g["name"]: torch.nn.utils.get_total_norm([p.grad for p in g["params"]])
            for g in opt.param_groups
        }
    grad_norm = torch.nn.utils.clip_grad_norm_(
        trainable, args.clip if args.clip > 0 else float("inf")
    )
    if acc is not None and args.clip > 0:
        acc["clipped"] += grad_norm > args.clip
    if not bool(torch.isfinite(grad_norm) & torch.isfinite(sums[0])):  # the update's one host read
        return lr, sums, grad_norm, False
    opt.step()
    opt.zero_grad()
    return lr, sums, grad_norm, True


@torch.no_grad()
def validate(route, val: TokenSplit, args, pad_id, autocast, dev):
    """Validation CE (token mean, no regulariser) and skip% per step type, with real skipping (the
    inference forward, gates routed as at prefill)."""
    route.eval()
    n = len(val) if args.val_batches == 0 else min(len(val), args.val_batches * args.batch_size)
    ce_sum = torch.zeros((), dtype=torch.float64, device=dev)
    tok, hard, tool = 0, [], []
    for a in range(0, n, args.batch_size):
        batch = collate(
            val,
            range(a, min(n, a + args.batch_size)),
            pad_id,
            args.pad_to or None,
            route_on=args.route_on,
        )
        batch = {k: v.to(dev) for k, v in batch.items()}
        with autocast():
            h = route.hidden(
                batch["input_ids"], batch["attention_mask"], route_mask=batch.get("route_mask")
            )
            sums, counts = lm_loss_per_sample(h, route.lm_head.weight, batch["labels"], args.chunk)
        ce_sum += sums.sum()
        tok += int(counts.sum())
        hard.append(route.last.hard.cpu())
        tool.append(batch["is_tool"].cpu())
    route.train()
    if not hard:
        return float(ce_sum) / max(tok, 1), float("nan"), float("nan")
    skip_tool, skip_plan = skip_percent(torch.cat(hard), torch.cat(tool))
    return float(ce_sum) / max(tok, 1), skip_tool, skip_plan


if __name__ == "__main__":
    sys.exit(run_cli(main))
