"""What the host costs a training update: device reads (host syncs) per micro-batch, Python-issued
ops per AdamW update, and the CPU time of one update; any minroute tree (`--root`), so two trees can
be compared interleaved.

    python bench/host_overhead.py                     # this tree: syncs, ops, CPU ms per update
    python bench/host_overhead.py --compare /tmp/old  # the same for another tree, interleaved

On CPU nothing waits for a device, so a sync is counted where it would be one on CUDA: every call
that reads a tensor's value into Python (`.item()`, `.tolist()`, `bool()` / `int()` / `float()` of a
tensor, `.numpy()`), every op whose output size depends on values (`nonzero`, boolean-mask indexing,
`masked_select`, `unique`, one-argument `where`, `repeat_interleave` without output_size) and every
blocking copy (`.cpu()`, `.cuda()`, `.to(device)` without non_blocking). `collate` runs on the
host's own data and is not counted. Each count is attributed to the first frame outside torch
(file:line), so a test can say where they come from. On a GPU, torch.cuda.set_sync_debug_mode counts
the real ones (tests/test_gpu.py).

The model is a random Qwen2 with the real depth (24 blocks, so the same syncs per micro-batch and
the same 240 trainable tensors as Qwen2.5-0.5B) and a small width; the data are random rows of
varied length with a prompt.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()


# ----------------------------------------------------------------------------- the counters


def _is_bool_index(idx) -> bool:
    import torch

    items = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class HostSyncCounter:
    """Counts (and attributes) the calls that would make the host wait for a device; see the module
    docstring."""

    READS = (
        "item",
        "tolist",
        "numpy",
        "__bool__",
        "__int__",
        "__float__",
        "__index__",
        "__complex__",
    )
    SIZED = ("nonzero", "argwhere", "masked_select", "unique", "unique_consecutive")
    COPIES = ("cpu", "cuda")
    FUNCS = (
        "nonzero",
        "argwhere",
        "masked_select",
        "unique",
        "unique_consecutive",
        "equal",
        "allclose",
        "is_nonzero",
    )

    def __init__(self):
        self.calls: collections.Counter = collections.Counter()  # (kind, where) -> n
        self._paused = 0
        self._saved: list = []

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def by_where(self) -> dict:
        out = collections.Counter()
        for (kind, where), n in self.calls.items():
            out[f"{where} {kind}"] += n
        return dict(out)

    def reset(self):
        self.calls.clear()

    @contextlib.contextmanager
    def paused(self):
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def _where(self) -> str:
        import torch

        torch_dir = str(Path(torch.__file__).parent)
        f = sys._getframe(2)
        while f is not None and (
            f.f_code.co_filename.startswith(torch_dir) or f.f_code.co_filename == __file__
        ):
            f = f.f_back
        if f is None:
            return "?"
        return f"{Path(f.f_code.co_filename).name}:{f.f_lineno}"

    def _count(self, kind: str):
        if not self._paused:
            self.calls[(kind, self._where())] += 1

    def _patch(self, owner, name, make):
        orig = getattr(owner, name)
        self._saved.append((owner, name, orig))
        setattr(owner, name, make(orig))

    def __enter__(self):
        import torch

        counter = self

        def always(kind):
            def make(orig):
                def wrapper(*a, **k):
                    counter._count(kind)
                    return orig(*a, **k)

                return wrapper

            return make

        torch_dir = str(Path(torch.__file__).parent)

        def to_make(orig):
            def wrapper(self, *a, **k):
                target = k.get("device")
                for x in a:
                    if isinstance(x, (str, torch.device)):
                        target = x
                    elif isinstance(x, torch.Tensor):
                        target = x.device
                blocking = not k.get("non_blocking", False) and not any(x is True for x in a[1:])
                if target is not None and blocking:
                    # to another device: a copy; an explicit .to(device) in our code: a blocking H2D
                    # copy on CUDA (train.py's batches); torch's own same-device .to()
                    # (clip_grad_norm_'s) is a no-op
                    same = torch.device(target) == self.device
                    if not same or not sys._getframe(1).f_code.co_filename.startswith(torch_dir):
                        counter._count("blocking copy .to(device)")
                return orig(self, *a, **k)

            return wrapper

        def index_make(kind):
            def make(orig):
                def wrapper(self, idx, *a):
                    if _is_bool_index(idx):
                        counter._count(kind)
                    return orig(self, idx, *a)

                return wrapper

            return make

        def where_make(orig):
            def wrapper(*a, **k):
                if len(a) + len(k) == 1:
                    counter._count("where(cond)")
                return orig(*a, **k)

            return wrapper

        def repeat_make(orig):
            def wrapper(*a, **k):
                repeats = a[1] if len(a) > 1 else k.get("repeats")
                if (
                    isinstance(repeats, torch.Tensor)
                    and repeats.numel() > 1
                    and k.get("output_size") is None
                ):
                    counter._count("repeat_interleave")
                return orig(*a, **k)

            return wrapper

        for name in self.READS + self.SIZED + self.COPIES:
            self._patch(torch.Tensor, name, always(name))
        for name in self.FUNCS:
            self._patch(torch, name, always(f"torch.{name}"))
        self._patch(torch.Tensor, "to", to_make)
        self._patch(torch.Tensor, "__getitem__", index_make("boolean-mask index"))
        self._patch(torch.Tensor, "__setitem__", index_make("boolean-mask assignment"))
        self._patch(torch, "where", where_make)
        self._patch(torch, "repeat_interleave", repeat_make)
        self._patch(torch.Tensor, "repeat_interleave", repeat_make)
        return self

    def __exit__(self, *exc):
        while self._saved:
            owner, name, orig = self._saved.pop()
            setattr(owner, name, orig)
        return False


def op_counter():
    """A TorchFunctionMode counting the torch functions and tensor methods Python issues (attribute
    reads and grad-mode switches left out): each one a dispatch, and on a GPU at least one kernel
    launch."""
    import torch

    class OpCounter(torch.overrides.TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") not in ("__get__", "__set__", "_set_grad_enabled"):
                self.n += 1
            return func(*args, **(kwargs or {}))

    return OpCounter()


# ----------------------------------------------------------------------------- model and data


def write_split(
    root: Path,
    name: str = "train",
    n: int = 64,
    vocab: int = 500,
    min_len: int = 24,
    max_len: int = 96,
    seed: int = 0,
) -> Path:
    """A random split in data_prep's layout: rows of varied length, a prompt, the answer counted."""
    rng = np.random.default_rng(seed)
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    lens = rng.integers(min_len, max_len + 1, n)
    prompt = (lens * rng.uniform(0.3, 0.7, n)).astype(np.int64)
    ids = rng.integers(0, vocab, int(lens.sum())).astype(np.uint32)
    loss = np.concatenate([(np.arange(L) >= p).astype(np.uint8) for L, p in zip(lens, prompt)])
    np.save(d / "ids.npy", ids)
    np.save(d / "loss_mask.npy", loss)
    np.save(d / "offsets.npy", np.concatenate([[0], np.cumsum(lens)]).astype(np.int64))
    np.save(d / "step_type.npy", (np.arange(n) % 2).astype(np.int64))
    np.save(d / "prompt_len.npy", prompt)
    return root


def train_args(batch_size=4, accum=4, **kw):
    from argparse import Namespace

    base = dict(
        batch_size=batch_size,
        accum=accum,
        seed=1,
        sort_by_length=1,
        ce_mean="update",
        pad_to=0,
        route_on="prompt",
        chunk=512,
        ablation="none",
        bce_target="open",
        gate_reg=1.0,
        clip=1.0,
        lr=2e-4,
        t_max=1000,
        warmup=0,
        min_lr=1e-6,
    )
    return Namespace(**{**base, **kw})


def setup(work: Path, layers=24, hidden=64, heads=4, kv=2, ffn=128, vocab=512):
    """A LayerRoute on a random checkpoint, its optimizer as train.py builds it, a random split, the
    pad id."""
    import torch

    import train
    from minroute.run.checkpoint import build_layerroute
    from minroute.run.data import TokenSplit
    from minroute.run.tiny import write_tiny_checkpoint

    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / f"m{layers}x{hidden}"
    if not (ckpt / "model.safetensors").exists():
        write_tiny_checkpoint(
            ckpt,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            intermediate_size=ffn,
            vocab_size=vocab,
            seed=0,
        )
    data = work / "data"
    if not (data / "train" / "ids.npy").exists():
        write_split(data, vocab=vocab)
    torch.manual_seed(0)
    route = build_layerroute(ckpt, {"r": 8, "alpha": 16, "dropout": 0.05}).train()
    if not hasattr(train, "one_update"):  # older trees
        groups = train.param_groups(route, 0.01, False)
        from minroute.optim import AdamW
    else:
        from minroute.core.update import param_groups
        from minroute.fast.kernels import ForeachAdamW as AdamW

        groups = param_groups(route, 0.01, False)
    opt = AdamW(groups, lr=2e-4)
    trainable = [p for g in groups for p in g["params"]]
    return route, opt, trainable, TokenSplit(data, "train"), 0


def mix_gates(route, seed: int = 0, scale: float = 3.0):
    """Router weights that give different rows different gates (the late-training case)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in route.routers:
            r.weight.copy_(
                scale * torch.randn(r.weight.shape, generator=g) / r.weight.shape[1] ** 0.5
            )
            r.bias.zero_()


def one_update(route, opt, trainable, split, u, args, pad_id, device="cpu"):
    """train.py's update (train.one_update where the tree has it; older trees: accumulate_update,
    then zero-filled gradients, clip, the non-finite read, AdamW, by train.finish_update or the same
    lines as their loop).
    """
    import torch

    import train

    if hasattr(train, "one_update"):
        _, _, gn, ok = train.one_update(
            u,
            route,
            opt,
            trainable,
            split,
            args,
            pad_id,
            lambda: torch.autocast("cpu", enabled=False),
            torch.device(device),
        )
        return gn, ok
    sums = train.accumulate_update(
        route, split, u, args, pad_id, lambda: torch.autocast("cpu", enabled=False), device
    )
    if hasattr(train, "finish_update"):
        return train.finish_update(opt, trainable, sums, args.clip, 1, torch.device(device))
    for p in trainable:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    gn = torch.nn.utils.clip_grad_norm_(trainable, args.clip)
    ok = bool(torch.isfinite(gn) & torch.isfinite(sums[0]))
    opt.step()
    opt.zero_grad()
    return gn, ok


# ----------------------------------------------------------------------------- measurements


def count(work: Path) -> dict:
    """Syncs per micro-batch (initial band gates; gates differing by row) and per update tail; ops
    per AdamW step."""
    import torch

    import train

    route, opt, trainable, split, pad_id = setup(work)
    args = train_args()
    L = route.config.num_hidden_layers
    out = {"blocks": L, "trainable_tensors": len(trainable)}
    real_collate = train.collate
    for gates in ("band", "mixed"):
        if gates == "mixed":
            mix_gates(route)
        one_update(route, opt, trainable, split, 0, args, pad_id)  # warm-up: per-device caches
        counter = HostSyncCounter()

        def collate(*a, counter=counter, **k):
            with counter.paused():
                return real_collate(*a, **k)

        train.collate = collate
        try:
            # micro-batches vs the update's tail: by where the sync is
            if hasattr(train, "one_update"):
                with counter:
                    one_update(route, opt, trainable, split, 1, args, pad_id)
                where = counter.by_where()
                where_micro = {w: n for w, n in where.items() if not w.startswith("train.py:")}
                where_tail = {w: n for w, n in where.items() if w.startswith("train.py:")}
                micro, tail = sum(where_micro.values()), sum(where_tail.values())
            else:
                micro, where_micro, tail, where_tail = count_older_tree(
                    counter, route, opt, trainable, split, args, pad_id
                )
        finally:
            train.collate = real_collate
        hard = route.last.hard
        out[gates] = {
            "syncs_per_micro_batch": micro / args.accum,
            "syncs_update_tail": tail,
            "where_tail": where_tail,
            "blocks_with_mixed_rows": int((hard.any(0) & ~hard.all(0)).sum()),
            "where": where_micro,
        }
    one_update(route, opt, trainable, split, 2, args, pad_id)
    for p in trainable:
        p.grad = torch.randn_like(p)
    with op_counter() as c:
        opt.step()
    out["adamw_ops_per_update"] = c.n
    opt.zero_grad()
    # the whole update, as Python issues it (autograd's backward kernels not included)
    with op_counter() as c:
        one_update(route, opt, trainable, split, 4, args, pad_id)
    out["python_ops_per_update"] = c.n
    return out


def count_older_tree(counter, route, opt, trainable, split, args, pad_id):
    """Syncs of an older tree's accumulate_update (per micro-batch) and update tail, apart."""
    import torch

    import train

    with counter:
        sums = train.accumulate_update(
            route, split, 1, args, pad_id, lambda: torch.autocast("cpu", enabled=False), "cpu"
        )
        micro = counter.total
        where_micro = counter.by_where()
        counter.reset()
        if hasattr(train, "finish_update"):
            train.finish_update(opt, trainable, sums, args.clip, 1, torch.device("cpu"))
        else:
            for p in trainable:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            gn = torch.nn.utils.clip_grad_norm_(trainable, args.clip)
            bool(torch.isfinite(gn) & torch.isfinite(sums[0]))
            opt.step()
            opt.zero_grad()
        tail = counter.total
        where_tail = counter.by_where()
    return micro, where_micro, tail, where_tail


def worker(work: Path, shape: dict):
    """Answer 'update' lines on stdin with the seconds of one full update (train.py's), at this
    shape."""
    route, opt, trainable, split, pad_id = setup(work, **shape)
    args = train_args()
    print(json.dumps({"ready": True}), flush=True)
    for u, line in enumerate(sys.stdin):
        if line.strip() != "update":
            break
        t0 = time.perf_counter()
        one_update(route, opt, trainable, split, u, args, pad_id)
        print(json.dumps({"s": time.perf_counter() - t0}), flush=True)


SHAPES = {
    "depth24-d64": dict(layers=24, hidden=64, heads=4, kv=2, ffn=128),
    "depth8-d256": dict(layers=8, hidden=256, heads=4, kv=2, ffn=704),
}


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--root",
        default=str(HERE.parent.parent),
        help="the minroute tree to measure (default: this one)",
    )
    ap.add_argument("--compare", help="a second minroute tree, measured interleaved with --root")
    ap.add_argument(
        "--work", default="/tmp/minroute-host-overhead", help="where the random model and data go"
    )
    ap.add_argument(
        "--updates", type=int, default=7, help="timed updates per tree and shape (after 2 warm-up)"
    )
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"timed shapes: {', '.join(SHAPES)}")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--count", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    sys.path.insert(0, a.root)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(a.work)
    if a.worker:
        return worker(work / a.worker, SHAPES[a.worker])
    if a.count:
        print(json.dumps(count(work / "count")))
        return
    roots = [a.root] + ([a.compare] if a.compare else [])
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    counts = {}
    for root in roots:
        res = subprocess.run(
            [sys.executable, str(HERE), "--root", root, "--work", str(work), "--count"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        counts[root] = json.loads(res.stdout.strip().splitlines()[-1])
    times = {}
    for shape in a.shapes.split(","):
        procs = {}
        for root in roots:
            procs[root] = subprocess.Popen(
                [sys.executable, str(HERE), "--root", root, "--work", str(work), "--worker", shape],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            json.loads(procs[root].stdout.readline())
        ts = {root: [] for root in roots}
        for r in range(a.updates + 2):
            for root in roots if r % 2 == 0 else roots[::-1]:  # alternate who goes first
                procs[root].stdin.write("update\n")
                procs[root].stdin.flush()
                s = json.loads(procs[root].stdout.readline())["s"]
                if r >= 2:
                    ts[root].append(s)
        for p in procs.values():
            p.stdin.close()
            p.wait()
        times[shape] = {
            root: {
                "median_ms": 1000 * statistics.median(t),
                "min_ms": 1000 * min(t),
                "max_ms": 1000 * max(t),
            }
            for root, t in ts.items()
        }
    print(
        "one update = 4 micro-batches of 4 rows (24..96 tokens, prompt-routed), clip, non-finite"
        f" check, AdamW; CPU, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, {a.updates} timed updates"
        " after 2 warm-up, interleaved"
    )
    for root in roots:
        c = counts[root]
        band, mixed = c["band"], c["mixed"]
        print(
            f"{root}: syncs per micro-batch {band['syncs_per_micro_batch']:.1f} (initial band"
            f" gates), {mixed['syncs_per_micro_batch']:.1f} (gates differing by row,"
            f" {mixed['blocks_with_mixed_rows']} of {c['blocks']} blocks mixed); update tail"
            f" {band['syncs_update_tail']}; AdamW ops per update {c['adamw_ops_per_update']}"
            f" ({c['trainable_tensors']} tensors); Python-issued ops per update"
            f" {c['python_ops_per_update']}"
        )
        for shape in times:
            t = times[shape][root]
            print(
                f"    {shape}: {t['median_ms']:.1f} ms per update (min {t['min_ms']:.1f}, max"
                f" {t['max_ms']:.1f})"
            )
    print(json.dumps({"counts": counts, "times": times}))


if __name__ == "__main__":
    main()
