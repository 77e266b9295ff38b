"""A run's inputs (its data folder, its base model, the demo's assets), found by what they are.

A run records each input in its run.json and in every checkpoint's meta.json (`inputs`): the path as
given (absolute), the path relative to the run folder, and what it is (a data folder's identity
hash; a local model's `model_identity`; a Hub id as itself). After the run folder moves with them
(mv, cp -r, rsync, a tarball on another machine), `locate` finds each input at its relative path,
else at its recorded absolute path, and takes it only if its content is the recorded one; a path the
user passes is held to the same hash. An input found nowhere is named, with the option that supplies
it. Runs recorded before `inputs` existed are located by their recorded path (and data by its
identity).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from minroute.run.safety import MissingFile, UserError, sha256_file

_IDENTITY_CACHE: dict[tuple, str] = {}
OPTION = {"data": "--data", "model": "--model", "demo_assets": "--demo-assets"}


def model_identity(model_dir) -> str:
    """sha256 over a model folder's config.json, tokenizer.json and weight files (names, hashes)."""
    d = Path(model_dir)
    named = ("config.json", "tokenizer.json")
    files = sorted(p for p in d.iterdir() if p.name in named or p.suffix == ".safetensors")
    key = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if key not in _IDENTITY_CACHE:
        h = hashlib.sha256()
        for p in files:
            h.update(f"{p.name}\0{sha256_file(p)}\n".encode())
        _IDENTITY_CACHE[key] = h.hexdigest()
    return _IDENTITY_CACHE[key]


def is_local(model: str) -> bool:
    return Path(model).is_dir()


def identity_of(key: str, path) -> str | None:
    """What the input at `path` is (None: not an input of that kind there)."""
    p = Path(path)
    if key == "data":
        from minroute.run.data import data_identity, read_manifest

        if not (p / "manifest.json").is_file():
            return None
        try:
            return data_identity(read_manifest(p))
        except UserError:
            return None
    if key == "model":
        return model_identity(p) if (p / "config.json").is_file() else None
    return None


def record_inputs(run_dir, args, data_identity: str) -> dict:
    """The `inputs` a run records: each input's absolute path, its path from the run folder, its
    hash."""
    run_dir = Path(run_dir).resolve()

    def where(path) -> dict:
        a = Path(path).resolve()
        return {"path": str(a), "relative": os.path.relpath(a, run_dir)}

    out = {"data": {**where(args.data), "sha256": data_identity}}
    if is_local(args.model):
        out["model"] = {**where(args.model), "sha256": model_identity(args.model)}
    else:
        out["model"] = {"hub": args.model}
    if getattr(args, "demo_assets", None):
        out["demo_assets"] = where(args.demo_assets)
    return out


def locate(run_dir, meta: dict, key: str, given=None) -> str:
    """The path of input `key` ('data' or 'model') of the run in run_dir: `given` if the user passed
    one (it must hold the recorded content), else the recorded relative path, else the recorded
    absolute path, whichever holds the recorded content. Raises with what to pass when none does."""
    run_dir = Path(run_dir)
    rec = (meta.get("inputs") or {}).get(key)
    saved = (meta.get("args") or {}).get(key)
    want = rec.get("sha256") if rec else (meta.get("data_sha256") if key == "data" else None)
    if rec and "hub" in rec:
        return given or rec["hub"]
    if given is not None:
        have = identity_of(key, given) if want else None
        if want and have != want:
            raise UserError(
                f"{OPTION[key]} {given}: holds other content than the run {run_dir} trained on"
                f" ({key} {'sha256 ' + have[:12] if have else 'not found there'}; the run's:"
                f" {want[:12]}); pass the {key} the run trained on"
            )
        return str(given)
    candidates = []
    if rec:
        candidates += [run_dir / rec["relative"], Path(rec["path"])]
    if saved:
        candidates.append(Path(saved))
    tried = []
    for c in candidates:
        if str(c) in tried:
            continue
        tried.append(str(c))
        if not c.exists():
            continue
        if want is None or identity_of(key, c) == want:
            return str(c.resolve()) if rec else str(c)
    if saved and not rec and not want and not is_local(saved):
        return saved  # a Hub id recorded by an older run
    where = " or ".join(tried) or "(no path recorded)"
    found = any(Path(t).exists() for t in tried)
    raise MissingFile(
        f"{run_dir}: its {key} was {where}, which "
        + ("holds other content now" if found else "does not exist here")
        + f"; pass the {key} the run trained on with {OPTION[key]} DIR"
    )


def locate_args(run_dir, meta: dict, given: dict) -> dict:
    """meta['args'] with 'data' and 'model' located (given: what the command line passed)."""
    args = dict(meta.get("args") or {})
    for key in ("data", "model"):
        if args.get(key) is not None or key in given:
            args[key] = locate(run_dir, meta, key, given.get(key))
    return args


def check_demo_assets(run_dir, meta: dict, assets) -> None:
    """A --demo-assets folder given to a resumed demo run must hold its demo data and model."""
    assets = Path(assets)
    locate(run_dir, meta, "data", assets / "demo-data")
    locate(run_dir, meta, "model", assets / "demo-model")
