"""Train LayerRoute: rank-8 LoRA on q/k/v/o and one router per block, jointly, on a frozen Qwen2.

    loss = CE (token mean over the counted tokens) + lambda * R,  R = mean soft gate over layers and batch

The paper's setup, as written (REFERENCE.md §3): 3,000 optimizer updates of 4 x 4 = 16 sequences,
AdamW lr 2e-4, cosine to 1e-6 over the run, clipping 1.0, mask-aware router pooling:

    python -m data_prep --out data/agentic
    python train.py --data data/agentic --out runs/paper-s42 --seed 42

What the authors' code actually ran (REFERENCE.md §2): 3,000 micro-batches = 750 updates, cosine with
T_max 3000 (so the LR only decays to 1.71e-4), pooling over positions padded to 512, decay on every tensor:

    python train.py --data data/agentic --out runs/author-s42 --preset author --seed 42

Ablations (Table 2 rows): --ablation noreg | uniform-init | bce [--bce-target open|skip].
Offline CPU demo (a tiny random Qwen2 and the bundled demo corpus; about a minute):

    python train.py --demo --out runs/demo && python eval.py --demo --ckpt runs/demo

On CUDA the frozen weights are bf16 under autocast; LoRA, routers and AdamW state stay fp32. On CPU all
is fp32. Checkpoints (adapters + optimizer + RNG, safetensors + JSON) are atomic; `--resume RUN_DIR`
continues exactly. The best checkpoint is the one with the lowest validation CE (the regulariser is left
out, so "best" means best language model, not most skipping).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from data_prep.build import sha256_file
from minroute.checkpoint import (adapter_tensors, build_layerroute, check_same_shape, load_adapter, load_checkpoint,
                                 model_shape, restore_rng, rng_state_tensors, save_checkpoint)
from minroute.data import TokenSplit, collate, manifest_hash, read_manifest, update_batches
from minroute.load import load_tokenizer, resolve_dir
from minroute.loss import lm_loss, lm_loss_per_sample
from minroute.optim import AdamW, get_lr
from minroute.router import bce_gate_loss, gate_regulariser

DEFAULTS = dict(batch_size=4, accum=4, lr=2e-4, save_every=200, log_every=10, t_max=None)
PRESETS = {
    "paper": dict(steps=3000, step_unit="update", pool="mask", pad_to=0, sort_by_length=1, decay_biases=False,
                  eval_every=200, val_batches=30),
    "author": dict(steps=3000, step_unit="micro", t_max=3000, pool="all", pad_to=512, sort_by_length=0,
                   decay_biases=True, eval_every=50, val_batches=30),
}
DEMO = dict(steps=120, batch_size=4, accum=2, lr=3e-3, eval_every=20, val_batches=4, save_every=40, log_every=10)
DEMO_COUNTS = {"hermes": 40, "glaive": 40, "gsm8k": 40, "turing": None}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("run")
    g.add_argument("--out", required=True, help="run folder: checkpoints, train_log.csv, gates.csv")
    g.add_argument("--data", help="folder built by `python -m data_prep`")
    g.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct", help="base model: local folder or Hub repo id")
    g.add_argument("--preset", choices=list(PRESETS), default="paper", help="paper (as written) or author (as run)")
    g.add_argument("--demo", action="store_true", help="offline CPU demo: tiny random model + bundled corpus")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint (exactly)")
    g.add_argument("--seed", type=int, default=42, help="data order, LoRA init and dropout")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g = ap.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, help="optimizer updates (paper preset) or micro-batches (author preset); 3000")
    g.add_argument("--batch-size", type=int, help="sequences per micro-batch (4)")
    g.add_argument("--accum", type=int, help="micro-batches per optimizer update (4)")
    g.add_argument("--lr", type=float, help="peak learning rate (2e-4)")
    g.add_argument("--min-lr", type=float, default=1e-6, help="cosine floor")
    g.add_argument("--warmup", type=int, default=0, help="linear warmup updates (authors: 0)")
    g.add_argument("--t-max", type=int, help="cosine length in updates (default: the run's updates; author: 3000)")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (0 = off)")
    g.add_argument("--chunk", type=int, default=512, help="tokens per LM-head chunk in the loss")
    g = ap.add_argument_group("method")
    g.add_argument("--lora-r", type=int, default=8)
    g.add_argument("--lora-alpha", type=float, default=16)
    g.add_argument("--lora-dropout", type=float, default=0.05)
    g.add_argument("--gate-reg", type=float, default=1.0, help="lambda of the gate regulariser")
    g.add_argument("--ablation", choices=["none", "noreg", "uniform-init", "bce"], default="none",
                   help="noreg: lambda 0; uniform-init: every router starts open; bce: BCE on step type")
    g.add_argument("--bce-target", choices=["open", "skip"], default="skip",
                   help="bce label: 'open' = tool calls open (authors' bce_naive), 'skip' = tool calls skip")
    g.add_argument("--pool", choices=["mask", "all"], help="router input: mean over real tokens, or over all "
                                                           "positions incl. padding (authors')")
    g.add_argument("--pad-to", type=int, help="pad batches to this length (0 = longest in batch; author: 512)")
    g.add_argument("--sort-by-length", type=int, choices=[0, 1], help="sort each update's sequences by length "
                   "before cutting micro-batches, so less compute goes to padding (paper 1, author 0)")
    g = ap.add_argument_group("logging and checkpoints")
    g.add_argument("--log-every", type=int, help="updates between log lines (10)")
    g.add_argument("--eval-every", type=int, help="updates between validations (paper 200, author 50)")
    g.add_argument("--val-batches", type=int, help="validation micro-batches, 0 = the whole val split (30)")
    g.add_argument("--save-every", type=int, help="updates between checkpoints (200)")
    return ap.parse_args(argv)


def resolve(args):
    """Fill what the command line left unset: defaults, then the preset, then the demo's; return the updates."""
    layers = [DEFAULTS, PRESETS[args.preset], DEMO if args.demo else {}]
    for key in set().union(*layers) - {"step_unit", "decay_biases"}:
        if getattr(args, key, None) is None:
            setattr(args, key, next(layer[key] for layer in reversed(layers) if key in layer))
    args.decay_biases = PRESETS[args.preset]["decay_biases"]
    args.step_unit = PRESETS[args.preset]["step_unit"]
    updates = args.steps // args.accum if args.step_unit == "micro" else args.steps
    args.t_max = args.t_max or updates
    if args.ablation == "noreg":
        args.gate_reg = 0.0
    args.init = "uniform" if args.ablation == "uniform-init" else "band"
    return updates


def prepare_demo(out: Path, args):
    """Tiny random Qwen2 (tokenizer trained on the demo corpus) and the demo data, inside the run folder."""
    from data_prep.build import build
    from minroute.tiny import write_tiny_checkpoint
    demo = Path(__file__).resolve().parent / "data_prep" / "demo"
    if not demo.is_dir():
        import data_prep
        demo = Path(data_prep.__file__).parent / "demo"
    model_dir, data_dir = out / "demo-model", out / "demo-data"
    if not (model_dir / "model.safetensors").exists():
        text = [p.read_text(encoding="utf-8", errors="replace") for p in demo.rglob("*.json")]
        write_tiny_checkpoint(model_dir, hidden_size=64, num_hidden_layers=8, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=192, seed=args.seed, bpe_vocab=1024,
                              init_std=0.1,  # 0.02 leaves the tied head too weak for LoRA to move the loss
                              extra_text=[line for t in text for line in t.splitlines()])
    if not (data_dir / "manifest.json").exists():
        tok = load_tokenizer(model_dir).tokenizer
        build(data_dir, tok, str(model_dir), source_dir=demo, counts=DEMO_COUNTS,
              eval_counts={"tool": 10, "planning": 10}, matched_pairs=10, seed=args.seed,
              tokenizer_sha256=sha256_file(model_dir / "tokenizer.json"))
    args.model, args.data = str(model_dir), str(data_dir)


def check_data_matches_model(manifest: dict, model_path: str, vocab_size: int, data_dir):
    tok_file = resolve_dir(model_path) / "tokenizer.json"
    if manifest.get("tokenizer_sha256") and tok_file.exists() and sha256_file(tok_file) != manifest["tokenizer_sha256"]:
        raise SystemExit(f"error: {data_dir}/manifest.json was built with another tokenizer ({manifest['tokenizer']}) "
                         f"than {model_path}'s tokenizer.json; rebuild the data with --tokenizer {model_path}")
    if manifest["vocab_size"] > vocab_size:
        raise SystemExit(f"error: {data_dir} uses {manifest['vocab_size']} token ids, the model has {vocab_size}")


def param_groups(route, weight_decay: float, decay_biases: bool):
    lora = [p for n, p in route.named_parameters() if n.endswith((".lora_A", ".lora_B"))]
    r_w = [r.weight for r in route.routers]
    r_b = [r.bias for r in route.routers]
    return [{"params": lora, "weight_decay": weight_decay, "name": "lora"},
            {"params": r_w, "weight_decay": weight_decay, "name": "router_weight"},
            {"params": r_b, "weight_decay": weight_decay if decay_biases else 0.0, "name": "router_bias"}]


def forward_loss(route, batch, args, autocast):
    """CE + regulariser (or BCE ablation) of one micro-batch, and its gates."""
    with autocast():
        h, soft, hard = route.gated_hidden(batch["input_ids"], batch["attention_mask"])
        ce = lm_loss(h, route.lm_head.weight, batch["labels"], chunk=args.chunk)
    if args.ablation == "bce":  # LayerRoute-BCE: the regulariser replaced by BCE on the step type
        reg = bce_gate_loss(soft, batch["is_tool"], args.bce_target)
    else:
        reg = gate_regulariser(soft)
    return ce + args.gate_reg * reg, ce, reg, soft, hard


@torch.no_grad()
def validate(route, val: TokenSplit, args, pad_id, autocast, device):
    """Validation CE (token mean, no regulariser) and skip% per step type, with real skipping."""
    route.eval()
    n = len(val) if args.val_batches == 0 else min(len(val), args.val_batches * args.batch_size)
    ce_sum, tok, skips = 0.0, 0, {0: [], 1: []}
    for a in range(0, n, args.batch_size):
        batch = collate(val, range(a, min(n, a + args.batch_size)), pad_id, args.pad_to or None)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            h = route.hidden(batch["input_ids"], batch["attention_mask"])
            sums, counts = lm_loss_per_sample(h, route.lm_head.weight, batch["labels"], args.chunk)
        ce_sum += float(sums.sum())
        tok += int(counts.sum())
        for b, tool in enumerate(batch["is_tool"].tolist()):
            skips[0 if tool else 1].append(1 - route.last.hard[b].float().mean().item())
    route.train()
    pct = {k: 100 * float(np.mean(v)) if v else float("nan") for k, v in skips.items()}
    return ce_sum / max(tok, 1), pct[0], pct[1]


class RunLog:
    """train_log.csv (one row per log interval / validation) and gates.csv (per layer), appended on resume."""

    FIELDS = ["step", "loss", "ce", "reg", "skip_tool", "skip_plan", "lr", "grad_norm", "dt", "tok_s", "val_ce",
              "val_skip_tool", "val_skip_plan"]

    def __init__(self, out: Path, fresh: bool):
        if fresh:
            for name in ("train_log.csv", "gates.csv"):
                (out / name).unlink(missing_ok=True)
        new = not (out / "train_log.csv").exists()
        self.log_f, self.gates_f = open(out / "train_log.csv", "a", newline=""), open(out / "gates.csv", "a", newline="")
        self.log, self.gates = csv.DictWriter(self.log_f, self.FIELDS), csv.writer(self.gates_f)
        if new:
            self.log.writeheader()
            self.gates.writerow(["step", "layer", "mean_soft", "hard_skip_rate", "bias", "w_norm"])

    def write(self, row: dict | None, gate_rows=()):
        self.gates.writerows(gate_rows)
        if row:
            self.log.writerow(row)
        self.log_f.flush()
        self.gates_f.flush()

    def close(self):
        self.log_f.close()
        self.gates_f.close()


def setup_distributed(args):
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: NCCL on CUDA, gloo on CPU. Returns (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist
    if args.demo:
        raise SystemExit("error: --demo runs in one process; build the data and model first for torchrun")
    if args.device.startswith("cuda"):
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    if args.accum % world:
        raise SystemExit(f"error: --accum {args.accum} must be a multiple of the {world} processes (the global batch "
                         f"stays batch_size x accum = {args.batch_size * args.accum} sequences)")
    return dist.get_rank(), world


def all_reduce_(tensors: list[torch.Tensor]):
    """Sum tensors across processes in one flat all-reduce (gradients of the ~1.1M trainable parameters)."""
    import torch.distributed as dist
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    for t, chunk in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(chunk.view_as(t))


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.resume or args.out)
    resume = None
    if args.resume:
        adapter, opt_state, meta = load_checkpoint(out, "latest")
        args = argparse.Namespace(**{**meta["args"], "resume": args.resume, "out": str(out)})
        resume = (adapter, opt_state, meta)
    else:
        out.mkdir(parents=True, exist_ok=True)
        if args.demo:
            args.device = "cpu"
            prepare_demo(out, args)
        if not args.data:
            raise SystemExit("error: --data DIR is required (build it with `python -m data_prep --out DIR`), or use --demo")
        args.updates = resolve(args)
    updates = args.updates
    rank, world = setup_distributed(args)
    main_proc = rank == 0
    say = print if main_proc else (lambda *a, **k: None)
    torch.manual_seed(args.seed)  # LoRA A init: the same in every process
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    manifest = read_manifest(args.data)
    train_split, val_split = TokenSplit(args.data, "train"), TokenSplit(args.data, "val")
    route = build_layerroute(args.model, {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout},
                             pool=args.pool, init=args.init, device=device, dtype=dtype)
    cfg = route.config
    check_data_matches_model(manifest, args.model, cfg.vocab_size, args.data)
    pad_id = load_tokenizer(args.model).pad_id
    groups = param_groups(route, args.weight_decay, args.decay_biases)
    opt = AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    names = {p: n for n, p in route.named_parameters()}
    trainable = [p for g in groups for p in g["params"]]
    start, best = 0, float("inf")
    if resume:
        adapter, opt_state, meta = resume
        if meta.get("manifest_sha256") != manifest_hash(args.data):
            raise SystemExit(f"error: {args.data}/manifest.json changed since this run started; resume needs the same data")
        check_same_shape(meta, cfg, out)
        load_adapter(route, adapter, out)
        opt.load_state_tensors(opt_state, names, meta["step"])
        restore_rng(opt_state)
        start, best = meta["step"], meta.get("best_val_ce", float("inf"))
        say(f"resumed {out} at update {start}/{updates}")
    meta_base = {"args": vars(args), "model_config": model_shape(cfg), "manifest_sha256": manifest_hash(args.data)}
    say(f"LayerRoute on {args.model}: {cfg.num_hidden_layers} layers, trainable {sum(p.numel() for p in trainable):,} | "
        f"data {args.data}: train {len(train_split)} val {len(val_split)} | {updates} updates of {args.batch_size}x"
        f"{args.accum} on {world} process(es) | preset {args.preset} ablation {args.ablation} pool {args.pool} | "
        f"{device} {dtype}")
    log = RunLog(out, fresh=start == 0) if main_proc else None

    def fresh_acc():
        return {"sums": torch.zeros(4, dtype=torch.float64), "n": 0, "dt": 0.0, "soft": [], "hard": [], "tool": []}

    route.train()
    acc, t_run = fresh_acc(), time.time()
    for u in range(start, updates):
        t0 = time.time()
        lr = get_lr(u, args.lr, args.t_max, args.warmup, args.min_lr)
        opt.set_lr(lr)
        sums = torch.zeros(4, dtype=torch.float64)  # loss, ce, reg (each / accum), real tokens
        micro_batches = update_batches(train_split, u, args.batch_size, args.accum, args.seed, args.sort_by_length)
        for m in range(rank, args.accum, world):  # this process's share of the update's micro-batches
            torch.manual_seed(args.seed * 1_000_003 + u * args.accum + m)  # dropout masks: per micro-batch, any process
            batch = {k: v.to(device) for k, v in
                     collate(train_split, micro_batches[m], pad_id, args.pad_to or None).items()}
            loss, ce, reg, soft, hard = forward_loss(route, batch, args, autocast)
            if not torch.isfinite(loss):
                if log:
                    log.close()
                sys.exit(f"error: non-finite loss ({loss.item()}) at update {u} micro-batch {m} (ce {ce.item()}, reg "
                         f"{reg.item()}); stopped without saving. The last good checkpoint is in {out} (latest.json); "
                         "try a lower --lr or --clip")
            (loss / args.accum).backward()
            sums += torch.tensor([loss.item(), ce.item(), reg.item(), 0.0], dtype=torch.float64) / args.accum
            sums[3] += int(batch["attention_mask"].sum())
            acc["soft"].append(soft.detach().float().cpu())
            acc["hard"].append(hard.cpu())
            acc["tool"].append(batch["is_tool"].cpu())
        if world > 1:  # sum gradients (and the logged sums) over processes: the update sees all 16 sequences
            all_reduce_([p.grad if p.grad is not None else p.new_zeros(p.shape) for p in trainable])
            all_reduce_([sums])
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, args.clip if args.clip > 0 else float("inf")))
        opt.step()
        opt.zero_grad()
        if cuda:
            torch.cuda.synchronize()
        acc["sums"] += sums
        acc["dt"] += time.time() - t0
        acc["n"] += 1
        step = u + 1
        row, gate_rows = None, []
        if step % args.log_every == 0 or step == updates:
            row, gate_rows = interval_stats(acc, route, step, lr, grad_norm)  # gate stats: this process's batches
            say(f"{step:5d}/{updates} | loss {row['loss']:.4f} | ce {row['ce']:.4f} | reg {row['reg']:.4f} | "
                f"skip% tool {row['skip_tool']:5.1f} plan {row['skip_plan']:5.1f} | lr {lr:.3e} | "
                f"dt {row['dt'] * 1000:.0f} ms | tok/s {row['tok_s']:.0f} | "
                f"eta {(updates - step) * row['dt'] / 60:.1f} min", flush=True)
            acc = fresh_acc()
        improved = False
        if main_proc and (step % args.eval_every == 0 or step == updates):
            vce, vt, vp = validate(route, val_split, args, pad_id, autocast, device)
            say(f"      val | ce {vce:.4f} | skip% tool {vt:5.1f} plan {vp:5.1f} | diff {vt - vp:+.2f}", flush=True)
            row = row or {"step": step, "lr": lr}
            row.update(val_ce=vce, val_skip_tool=vt, val_skip_plan=vp)
            improved, best = vce < best, min(best, vce)
        if main_proc:
            log.write(row, gate_rows)
            periodic = step % args.save_every == 0 or step == updates
            if periodic or improved:
                opt_t = {**opt.state_tensors(names), **rng_state_tensors()}
                save_checkpoint(out, step, adapter_tensors(route), opt_t, {**meta_base, "best_val_ce": best},
                                (["latest"] if periodic else []) + (["best"] if improved else []))
    if log:
        log.close()
    if world > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
    say(f"done: {updates} updates in {time.time() - t_run:.1f}s; best val CE {best:.4f}; checkpoints in {out}")
    return 0


def interval_stats(acc, route, step, lr, grad_norm):
    """The log row and the per-layer gate rows of one log interval."""
    soft, hard, tool = torch.cat(acc["soft"]), torch.cat(acc["hard"]), torch.cat(acc["tool"])
    skip = 100 * (1 - hard.float().mean(1))
    n, dt = acc["n"], acc["dt"]
    loss, ce, reg, tok = acc["sums"].tolist()
    row = {"step": step, "loss": loss / n, "ce": ce / n, "reg": reg / n,
           "skip_tool": float(skip[tool].mean()) if tool.any() else float("nan"),
           "skip_plan": float(skip[~tool].mean()) if (~tool).any() else float("nan"),
           "lr": lr, "grad_norm": grad_norm, "dt": dt / n, "tok_s": tok / dt}
    gate_rows = [[step, i, round(float(soft[:, i].mean()), 5), round(float(1 - hard[:, i].float().mean()), 5),
                  round(r.bias.item(), 5), round(r.weight.detach().norm().item(), 5)]
                 for i, r in enumerate(route.routers)]
    return row, gate_rows


if __name__ == "__main__":
    sys.exit(main())
