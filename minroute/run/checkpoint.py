"""Checkpoints: adapters (LoRA + routers) and optimizer state in safetensors, meta in JSON; atomic.

A run folder holds complete checkpoint folders `ckpt-<step>/` (adapter.safetensors,
optimizer.safetensors, trained_rows.txt, meta.json) and two pointer files, `latest.json` and
`best.json`. A checkpoint folder is written under a temporary name, fsynced and renamed; only then
is the pointer replaced (write temp, fsync, rename). A crash at any moment leaves the pointers
naming complete checkpoints. meta.json records each file's size and sha256, checked on load, so a
corrupt or missing file is named; `trained_rows.txt` lists the content hashes of the rows the run
trained and selected on, so eval.py can prove its rows are held out. Files get the permissions of
the run folder's other files (umask). Nothing here is pickled.

A write the operating system refuses (full disk, read-only folder) removes the half-written
`ckpt-*.tmp` and ends in a `WriteError` naming the path and the cause; the run's earlier checkpoints
and pointers are untouched. `checkpoints(run)` lists a run's complete checkpoints by update, so a
resume can take the newest one whichever pointer (latest or best) names it, or none.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from minroute.run.safety import (
    MissingFile,
    UserError,
    WriteError,
    file_records,
    os_cause,
    verify_files,
)


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path):
    """fsync every file under root, then root itself: what a rename of root makes durable."""
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(Path(root))


def publish_folder(tmp: Path, final: Path):
    """Make a fully written folder `tmp` be `final`: fsync it, then rename it into place. An old
    `final` is moved aside first and deleted only after the rename, so a crash at any moment leaves
    one complete folder.
    """
    fsync_tree(tmp)
    if final.exists():
        old = final.parent / f".{final.name}.replaced-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def atomic_write_text(path: Path, text: str):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def file_mode() -> int:
    """What open() gives a new file under the current umask (safetensors writes its files 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _save_tensors(tensors: dict, path: Path):
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    except Exception as e:  # safetensors reports I/O errors as its own type: "... (os error 28)"
        code = re.search(r"os error (\d+)", str(e))
        if not code:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None
    os.chmod(path, file_mode())
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_text(path: Path, text: str):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def trained_row_hashes(data) -> list[str]:
    """Content and prompt hashes of every row a run on `data` (a DataFolder) can learn from or
    select on (train and val), as trained_rows.txt lists them: eval.py refuses held-out rows whose
    conversation or whose prompt (first user message) is among them.
    """
    contents, prompts = data.trained_hashes()
    return sorted(contents | {f"prompt:{h}" for h in prompts})


def trained_rows_text(hashes) -> str:
    return "".join(f"{h}\n" for h in hashes)


def save_checkpoint(
    run_dir,
    step: int,
    adapter: dict,
    optimizer: dict,
    meta: dict,
    pointers=("latest",),
    extra: dict[str, str] | None = None,
    keep_every: int = 0,
) -> Path:
    """Write ckpt-<step>/ atomically and point `pointers` (latest and/or best) at it; prune
    unreferenced ones, except kept ones: a checkpoint of an update that is a multiple of keep_every
    (when > 0) is marked kept in its meta.json and never pruned.

    `extra` maps file names to text files written beside the tensors (trained_rows.txt). An OSError
    (full disk, read-only folder) removes the half-written folder and becomes a WriteError naming
    the path; what the run had before is untouched."""
    run = Path(run_dir)
    tmp = run / f"ckpt-{step:06d}.tmp"
    try:
        return _save_checkpoint(run, step, adapter, optimizer, meta, pointers, extra, keep_every)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back
        for p in pointers:
            (run / f"{p}.json.tmp").unlink(missing_ok=True)
        where = e.filename or tmp
        have = ", ".join(f"{n.name} (update {k})" for k, n in checkpoints(run)) or "none yet"
        raise WriteError(
            f"{where}: cannot write the checkpoint of update {step} ({os_cause(e)}); the run's "
            f"checkpoints on disk are untouched ({have}). Free space (or make {run} writable), "
            f"then continue the run: python train.py --resume {run}"
        ) from None


def _save_checkpoint(
    run: Path, step: int, adapter: dict, optimizer: dict, meta: dict, pointers, extra, keep_every
) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{step:06d}"
    final, tmp = run / name, run / (name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _save_tensors(adapter, tmp / "adapter.safetensors")
    _save_tensors(optimizer, tmp / "optimizer.safetensors")
    for fname, text in (extra or {}).items():
        _write_text(tmp / fname, text)
    files = file_records(
        tmp, ["adapter.safetensors", "optimizer.safetensors", *sorted(extra or {})]
    )
    kept = keep_every > 0 and step % keep_every == 0
    meta = {**meta, "step": step, "files": files, **({"kept": True} if kept else {})}
    _write_text(tmp / "meta.json", json.dumps(meta, indent=2))
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(run)
    for p in pointers:
        atomic_write_text(run / f"{p}.json", json.dumps({"dir": name, "step": step}))
    # an unreadable pointer keeps nothing
    keep = {pointer_target(run, p) for p in ("latest", "best")} | {name}
    for old in run.glob("ckpt-*"):
        if old.name not in keep and not old.name.endswith(".tmp") and not _is_kept(old):
            shutil.rmtree(old, ignore_errors=True)
    return final


def _is_kept(ckpt: Path) -> bool:
    """Whether a checkpoint was saved to be kept (--keep-every); an unreadable meta.json is not."""
    try:
        return json.loads((ckpt / "meta.json").read_text()).get("kept") is True
    except (OSError, ValueError, AttributeError):
        return False


def is_checkpoint_dir(p: Path) -> bool:
    return p.name.startswith("ckpt-") and (p / "meta.json").exists()


CKPT_NAME = re.compile(r"ckpt-(\d+)")


def checkpoints(run) -> list[tuple[int, Path]]:
    """The complete checkpoints of a run folder, (update, folder), oldest first. A ckpt-<step>
    folder is complete by construction (written as .tmp, renamed when whole), whichever pointer
    names it, if any.
    """
    found = []
    for d in Path(run).glob("ckpt-*"):
        m = CKPT_NAME.fullmatch(d.name)
        if m and is_checkpoint_dir(d):
            found.append((int(m.group(1)), d))
    return sorted(found)


def pointer_target(run, which: str) -> str | None:
    """The folder name latest.json / best.json names (None without a readable pointer)."""
    try:
        return json.loads((Path(run) / f"{which}.json").read_text())["dir"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_dir_of(path) -> Path:
    """The run folder of a run folder or of one of its ckpt-* folders."""
    p = Path(path)
    if not p.exists():
        if p.name.startswith("ckpt-") and p.parent.is_dir():
            have = ", ".join(str(d) for _, d in checkpoints(p.parent)) or "none"
            raise MissingFile(
                f"{p}: no such checkpoint (the checkpoints of {p.parent}: {have}); pass one of"
                f" them, or the run folder {p.parent} for its newest"
            )
        raise MissingFile(f"{p}: no such run folder")
    return p.parent if is_checkpoint_dir(p) else p


def resolve_checkpoint(path, which: str = "latest") -> Path:
    """A run folder (follow latest.json / best.json) or a ckpt-* folder itself."""
    p = Path(path)
    if not p.exists():
        raise MissingFile(
            f"{p}: no such folder; pass a train.py --out folder or one of its ckpt-* folders"
        )
    if (p / "meta.json").exists():
        return p
    pointer = p / f"{which}.json"
    if not pointer.exists():
        raise MissingFile(
            f"{p}: no {which}.json and no checkpoint files; pass a train.py --out folder "
            "or one of its ckpt-* folders"
        )
    try:
        d = p / json.loads(pointer.read_text())["dir"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise UserError(
            f"{pointer}: unreadable ({type(e).__name__}); point it at a ckpt-* folder or pass one "
            "directly"
        ) from None
    if not d.is_dir():
        others = [str(c) for _, c in checkpoints(p)][::-1]
        fix = (
            f"pass one of its checkpoints instead ({', '.join(others[:3])})"
            if others
            else "the run has no other checkpoint; restore the folder from a copy"
        )
        raise MissingFile(f"{pointer} names {d.name}, which is missing; {fix}")
    return d


def read_meta(d: Path) -> dict:
    path = d / "meta.json"
    if not path.exists():
        raise MissingFile(f"{path}: missing; the checkpoint is incomplete")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(
            f"{path}: not valid JSON ({e}); the checkpoint is corrupt: restore it from a copy, or"
            f" use another checkpoint of {d.parent}"
        ) from None
    if not isinstance(meta, dict):
        raise UserError(
            f"{path}: a JSON {type(meta).__name__}, not the object train.py writes; the checkpoint"
            f" is corrupt: restore it from a copy, or use another checkpoint of {d.parent}"
        )
    return meta


def load_checkpoint(path, which: str = "latest", fix: str | None = None) -> tuple[dict, dict, dict]:
    """(adapter tensors, optimizer tensors, meta) of a checkpoint folder or a run folder's pointer;
    every file is checked against the size and sha256 that meta.json records (`fix`: what the
    message advises then).
    """
    d = resolve_checkpoint(path, which)
    meta = read_meta(d)
    if "files" in meta:
        verify_files(
            d,
            meta["files"],
            f"checkpoint {d}",
            fix
            or "restore it from a copy, or use another checkpoint (a ckpt-* folder, or --which "
            "best)",
        )
    elif not (d / "adapter.safetensors").exists():
        raise MissingFile(f"{d / 'adapter.safetensors'}: missing; the checkpoint is incomplete")
    try:
        adapter = load_file(str(d / "adapter.safetensors"))
        opt = (
            load_file(str(d / "optimizer.safetensors"))
            if (d / "optimizer.safetensors").exists()
            else {}
        )
    except Exception as e:  # safetensors raises its own error type for corrupt headers and data
        raise UserError(
            f"{d}: cannot read the checkpoint's tensors ({e}); it is corrupt"
            + (f"; {fix}" if fix else "")
        ) from None
    return adapter, opt, meta


def nonfinite_tensors(tensors: dict) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    return [
        k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]


def trained_rows(d: Path) -> set[str] | None:
    """Content hashes of the rows a checkpoint's run trained and selected on (None for older
    checkpoints)."""
    path = Path(d) / "trained_rows.txt"
    return set(path.read_text().split()) if path.exists() else None


def optimizer_tensors(opt, names: dict) -> dict[str, torch.Tensor]:
    """AdamW's moments keyed by parameter name (names: param -> name), for a safetensors file."""
    out = {}
    for p, s in opt.state.items():
        out[f"m.{names[p]}"], out[f"v.{names[p]}"] = s["m"], s["v"]
    return out


def restore_optimizer(opt, tensors: dict[str, torch.Tensor], names: dict, t: int):
    """Load AdamW's moments (optimizer_tensors' keys) and its update count t."""
    for p, s in opt.state.items():
        for k in ("m", "v"):
            key = f"{k}.{names[p]}"
            if key not in tensors or tensors[key].shape != p.shape:
                raise ValueError(f"optimizer state '{key}' missing or misshapen in the checkpoint")
            s[k].copy_(tensors[key])
    opt.t = t


def rng_state_tensors() -> dict[str, torch.Tensor]:
    out = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["rng.torch_cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(tensors: dict):
    if "rng.torch_cpu" in tensors:
        torch.set_rng_state(tensors["rng.torch_cpu"])
    if "rng.torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.torch_cuda"])


# ----------------------------------------------------------------------------- LayerRoute <->
# checkpoint


def adapter_tensors(route) -> dict[str, torch.Tensor]:
    """What training changes: LoRA A/B and the routers, by their LayerRoute parameter names."""
    return {
        n: p
        for n, p in route.named_parameters()
        if n.endswith((".lora_A", ".lora_B")) or n.startswith("routers.")
    }


def build_layerroute(
    model_path, lora: dict, pool: str = "mask", init: str = "band", device="cpu", dtype=None
):
    """Frozen decoder from model_path + LoRA(r, alpha, dropout) on q/k/v/o + routers; its MLPs take
    the fused SwiGLU backward (fast/kernels.py: the same values, less memory)."""
    from minroute.core.lora import add_lora
    from minroute.core.router import LayerRoute
    from minroute.fast.kernels import fuse_swiglu
    from minroute.run.load import load_model

    base = fuse_swiglu(load_model(model_path, dtype=dtype, device=device))
    add_lora(base, r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"])
    return LayerRoute(base, pool=pool, init=init)


def load_layerroute(ckpt, which: str = "latest", model=None, device="cpu", dtype=None):
    """(LayerRoute with the checkpoint's adapters, meta). `model` overrides the base model; without
    it the run's own is located (run/inputs.py: by content, wherever the run folder moved) and
    meta['args']['model'] names where it was found."""
    from minroute.run.inputs import locate

    adapter, _, meta = load_checkpoint(ckpt, which)
    a = meta.get("args")
    need = ("model", "lora_r", "lora_alpha", "lora_dropout", "pool")
    if not isinstance(a, dict) or any(k not in a for k in need):
        raise UserError(
            f"{resolve_checkpoint(ckpt, which)}/meta.json lacks the run's settings ('args' with "
            f"{', '.join(need)}); it is not a checkpoint train.py wrote, or it was edited"
        )
    if model is None:
        a["model"] = locate(resolve_checkpoint(ckpt, which).parent, meta, "model")
    route = build_layerroute(
        model or a["model"],
        {"r": a["lora_r"], "alpha": a["lora_alpha"], "dropout": a["lora_dropout"]},
        pool=a["pool"],
        device=device,
        dtype=dtype,
    )
    check_same_shape(meta, route.config, ckpt)
    bad = nonfinite_tensors(adapter)
    if bad:
        raise UserError(
            f"{resolve_checkpoint(ckpt, which)}: non-finite weights in {len(bad)} tensors"
            f" ({bad[0]}, ...); this checkpoint cannot be evaluated, use an earlier one"
        )
    load_adapter(route, adapter, ckpt)
    return route.eval(), meta


SHAPE_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
)


def model_shape(cfg) -> dict:
    """What a checkpoint records of its base model, to refuse another shape on load."""
    return {k: getattr(cfg, k) for k in SHAPE_KEYS}


def check_same_shape(meta: dict, cfg, where):
    saved = meta.get("model_config", {})
    diff = {
        k: (saved.get(k), getattr(cfg, k))
        for k in SHAPE_KEYS
        if k in saved and saved[k] != getattr(cfg, k)
    }
    if diff:
        raise UserError(
            f"{where}: checkpoint is from another model shape (checkpoint vs model: {diff}); pass"
            " the base model it was trained on"
        )


def load_adapter(route, tensors: dict, where):
    params = adapter_tensors(route)
    missing, unexpected = (
        sorted(set(params) - set(tensors)),
        sorted(k for k in tensors if k not in params),
    )
    if missing or unexpected:
        raise UserError(
            f"{where}: adapter tensors do not match the model (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); was it trained with other LoRA settings or another model?"
        )
    with torch.no_grad():
        for k, p in params.items():
            if tensors[k].shape != p.shape:
                raise UserError(
                    f"{where}: '{k}' has shape {tuple(tensors[k].shape)}, the model expects "
                    f"{tuple(p.shape)}: a checkpoint from another model shape"
                )
            p.copy_(tensors[k])
