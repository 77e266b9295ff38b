"""Build the mixture: fetch raw files, parse, count, split, tokenise, store, and write manifest.json.

The build writes into a temporary folder beside --out and renames it into place at the end, so an
interrupted build never leaves new arrays under an old manifest; an existing data folder is replaced only
with overwrite=True (`--overwrite`). manifest.json records every file's size and sha256 (`files`), which
train.py and eval.py verify.

Accounting: every record of every source file is exactly one of used / malformed (by reason) / unused, so
read = used + malformed + unused. Records are taken in file order until a source's count is met
(Glaive: the first 5,000 *usable*); the rest are unused. Training pool = the used samples of the four
sources, shuffled with the seed and split 90/10 into train / val.

Held-out evaluation, never in training (checked by content hash and by the first user prompt), and never
truncated (a held-out row longer than --max-len is left out and counted as `truncated`; an eval row cut short
would measure schema text instead of its question and reference call):
- tool: Hermes' multi-turn file `func-calling.json` (not the singleturn file trained on), cut to the
  prompt plus the first assistant tool call; a seeded sample of its eligible rows;
- planning: the first rows of GSM8K `test` that carry a final "#### N" answer;
- length-matched: tool prompts (remaining held-out Hermes rows, unused Glaive rows) and GSM8K test rows
  (not in the eval set) paired by token length, so a skip differential cannot come from length alone.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minroute.chat import ChatFormat, encode_chat
from minroute.checkpoint import fsync_tree
from minroute.safety import MissingFile, UserError, file_records, sha256_file

from . import glaive, gsm8k, hermes, turing
from .records import PLANNING, TOOL, Malformed, Sample, read_json_records

STEP_CODE = {TOOL: 0, PLANNING: 1}
PAPER_COUNTS = {"hermes": 1893, "glaive": 5000, "gsm8k": 5000, "turing": None}  # None: every usable row
PAPER_EVAL_COUNTS = {"tool": 50, "planning": 50}


@dataclass(frozen=True)
class SourceFile:
    repo: str
    file: str
    revision: str | None
    parse: object  # record, row -> Sample

    @property
    def local_name(self) -> str:  # DIR/<repo name>/<file>, as laid out on the Hub
        return f"{self.repo.split('/')[1]}/{self.file}"


SOURCES = {
    "hermes": SourceFile(hermes.REPO, hermes.FILE, hermes.REVISION, hermes.to_sample),
    "glaive": SourceFile(glaive.REPO, glaive.FILE, glaive.REVISION, glaive.to_sample),
    "gsm8k": SourceFile(gsm8k.REPO, gsm8k.TRAIN_FILE, gsm8k.REVISION, gsm8k.to_sample),
    "turing": SourceFile(turing.REPO, turing.FILE, turing.REVISION, turing.to_sample),
}
EVAL_SOURCES = {
    "hermes_heldout": SourceFile(hermes.REPO, hermes.HELDOUT_FILE, hermes.REVISION,
                                 lambda r, i: hermes.first_call_prefix(hermes.to_sample(r, i, "hermes_heldout"))),
    "gsm8k_test": SourceFile(gsm8k.REPO, gsm8k.TEST_FILE, gsm8k.REVISION,
                             lambda r, i: gsm8k.to_sample(r, i, "gsm8k_test", need_final=True)),
}


def fetch(name: str, spec: SourceFile, source_dir: Path | None) -> tuple[Path, str | None]:
    """Local path of a raw file and the revision it came from."""
    if source_dir is not None:
        path = Path(source_dir) / spec.local_name
        if not path.exists():
            raise MissingFile(f"{name}: {path} not found; --source-dir must hold the files as on the Hub "
                                    f"(<dir>/{spec.local_name})")
        return path, spec.revision
    from huggingface_hub import hf_hub_download
    try:
        path = Path(hf_hub_download(spec.repo, spec.file, repo_type="dataset", revision=spec.revision))
    except Exception as e:
        raise MissingFile(f"{name}: could not download {spec.file} from dataset {spec.repo} "
                                f"(revision {spec.revision or 'main'}): {type(e).__name__}: {e}. Use --source-dir "
                                "with the raw files if you are offline") from e
    parts = path.parts  # <cache>/snapshots/<commit>/<file>: record the commit actually downloaded
    revision = parts[parts.index("snapshots") + 1] if "snapshots" in parts else spec.revision
    return path, revision


def read_records(name: str, path: Path) -> list:
    if path.suffix == ".parquet":
        return gsm8k.read_parquet(path, name)
    return read_json_records(path, name)


def parse_in_order(name: str, records: list, parse, want: int | None):
    """Parse records in file order until `want` samples are usable; count every record."""
    used, malformed, n_parsed = [], {}, 0
    for i, rec in enumerate(records):
        if want is not None and len(used) >= want:
            break
        n_parsed += 1
        try:
            if isinstance(rec, Malformed):
                raise rec
            used.append(parse(rec, i))
        except Malformed as e:
            malformed[e.reason] = malformed.get(e.reason, 0) + 1
    return used, malformed, len(records) - n_parsed


def length_stats(lengths) -> dict:
    a = np.asarray(lengths)
    if a.size == 0:
        return {"n": 0}
    return {"n": int(a.size), "min": int(a.min()), "mean": round(float(a.mean()), 1),
            "median": float(np.median(a)), "p95": float(np.percentile(a, 95)), "max": int(a.max())}


def first_user(s: Sample) -> str:
    return next((m["content"] for m in s.messages if m["role"] == "user"), "")


def write_split(out: Path, name: str, samples: list[Sample], encoded: list, with_messages: bool):
    """Flat memory-mappable token arrays plus one JSON line per sample."""
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    lengths = np.array([len(e.ids) for e in encoded], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.concatenate([e.ids for e in encoded]).astype(np.uint32) if encoded else np.zeros(0, np.uint32)
    mask = np.concatenate([e.loss_mask for e in encoded]).astype(np.uint8) if encoded else np.zeros(0, np.uint8)
    np.save(d / "ids.npy", ids)
    np.save(d / "loss_mask.npy", mask)
    amask = np.concatenate([e.assistant_mask for e in encoded]).astype(np.uint8) if encoded else np.zeros(0, np.uint8)
    np.save(d / "assistant_mask.npy", amask)
    np.save(d / "offsets.npy", offsets)
    np.save(d / "step_type.npy", np.array([STEP_CODE[s.step_type] for s in samples], dtype=np.uint8))
    np.save(d / "prompt_len.npy", np.array([e.prompt_len for e in encoded], dtype=np.int32))
    with open(d / "samples.jsonl", "w", encoding="utf-8") as f:
        for s, e in zip(samples, encoded):
            rec = {"source": s.source, "row": s.row, "step_type": s.step_type, "hash": s.content_hash(),
                   "n_tokens": len(e.ids), "truncated": e.truncated, "meta": s.meta}
            if with_messages:
                rec.update(messages=s.messages, tools=s.tools)
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def match_by_length(tool: list[tuple[int, int]], plan: list[tuple[int, int]], pairs: int, seed: int,
                    rel_tol: float = 0.05, abs_tol: int = 4) -> list[tuple[int, int]]:
    """Pair (length, index) items of the two lists with |length difference| <= max(abs_tol, rel_tol * length).

    A two-pointer pass over both sorted lists gives a maximal set of disjoint pairs; a seeded subset of
    `pairs` of them is returned, so the set spans the lengths the two types share.
    """
    tool, plan = sorted(tool), sorted(plan)
    i = j = 0
    found = []
    while i < len(tool) and j < len(plan):
        lt, lp = tool[i][0], plan[j][0]
        if abs(lt - lp) <= max(abs_tol, rel_tol * max(lt, lp)):
            found.append((tool[i][1], plan[j][1]))
            i += 1
            j += 1
        elif lt < lp:
            i += 1
        else:
            j += 1
    if len(found) > pairs:
        keep = np.random.default_rng(seed).choice(len(found), size=pairs, replace=False)
        found = [found[k] for k in sorted(keep)]
    return found


def build(out_dir, tokenizer, tokenizer_name: str, tokenizer_sha256: str | None = None, source_dir=None, counts=None, eval_counts=None,
          matched_pairs: int = 50, seed: int = 42, max_len: int = 512, loss_on: str = "all",
          val_fraction: float = 0.1, glaive_candidates: int = 2000, overwrite: bool = False, log=print,
          chat_format: ChatFormat | None = None) -> dict:
    """Build everything under out_dir (atomically); return the manifest (also written to out_dir/manifest.json)."""
    t0 = time.time()
    final = Path(out_dir)
    if final.exists() and any(final.iterdir()) and not overwrite:
        what = "a data folder" if (final / "manifest.json").exists() else "files"
        raise UserError(f"{final} already holds {what}; pass --overwrite to replace it, or choose another --out")
    final.parent.mkdir(parents=True, exist_ok=True)
    out = final.parent / f".{final.name}.building-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    try:
        manifest = _build(out, tokenizer, tokenizer_name, tokenizer_sha256, source_dir, counts, eval_counts,
                          matched_pairs, seed, max_len, loss_on, val_fraction, glaive_candidates, log,
                          chat_format or ChatFormat())
        manifest["build_seconds"] = round(time.time() - t0, 2)
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
        fsync_tree(out)
        if final.exists():  # --overwrite: move the old folder aside first, so a crash here loses neither
            old = final.parent / f".{final.name}.replaced-{os.getpid()}"
            os.replace(final, old)
            os.replace(out, final)
            shutil.rmtree(old)
        else:
            os.replace(out, final)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    log(f"[data_prep] train {manifest['splits']['train']['n']}  val {manifest['splits']['val']['n']}  eval "
        f"{manifest['splits']['eval']['n']}  matched pairs {manifest['splits']['eval_matched']['pairs']}  -> {final} "
        f"({manifest['build_seconds']}s)")
    return manifest


def _build(out: Path, tokenizer, tokenizer_name, tokenizer_sha256, source_dir, counts, eval_counts, matched_pairs,
           seed, max_len, loss_on, val_fraction, glaive_candidates, log, fmt) -> dict:
    counts = {**PAPER_COUNTS, **(counts or {})}
    eval_counts = {**PAPER_EVAL_COUNTS, **(eval_counts or {})}
    source_dir = Path(source_dir) if source_dir is not None else None
    manifest = {"format": 1, "tokenizer": tokenizer_name, "tokenizer_sha256": tokenizer_sha256,
                "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True), "max_len": max_len,
                "loss_on": loss_on, "seed": seed, "val_fraction": val_fraction, "counts": counts,
                "eval_counts": eval_counts, "sources": {}, "eval_sources": {}, "splits": {}, "token_lengths": {},
                "chat_format": {"default_system": fmt.default_system, "template_has_tools": fmt.template_has_tools}}
    if not fmt.template_has_tools:
        log("[data_prep] note: the model's chat template has no tool section; tool rows are rendered in Qwen2.5's "
            "format (<tools> in the system turn, <tool_call> JSON, <tool_response> in a user turn)")

    def encode(s: Sample):
        return encode_chat(tokenizer, s.messages, s.tools, max_len=max_len, loss_on=loss_on, fmt=fmt)

    # ---- the four training sources
    pool, pool_enc, leftovers = [], [], {}
    for name, spec in SOURCES.items():
        t = time.time()
        path, revision = fetch(name, spec, source_dir)
        records = read_records(name, path)
        if not records:
            raise UserError(f"{name}: {path} holds no records")
        used, malformed, unused = parse_in_order(name, records, spec.parse, counts[name])
        want = counts[name]
        if want is not None and len(used) < want:
            raise UserError(f"{name}: only {len(used)} usable rows in {path} ({len(records)} read, "
                             f"{sum(malformed.values())} malformed: {malformed}); {want} requested. Lower it with "
                             f"--counts {name}={len(used)}")
        if not used:
            raise UserError(f"{name}: no usable rows in {path} ({len(records)} read, malformed: {malformed})")
        enc = [encode(s) for s in used]
        leftovers[name] = (records, len(records) - unused)  # unused rows start at this index
        n_no_call = sum(1 for s in used if s.step_type == TOOL and
                        not any(m.get("tool_calls") for m in s.messages))
        manifest["sources"][name] = {
            "repo": spec.repo, "file": spec.file, "revision": revision, "sha256": sha256_file(path),
            "read": len(records), "used": len(used), "malformed": sum(malformed.values()),
            "malformed_by_reason": malformed, "unused": unused, "truncated": sum(e.truncated for e in enc),
            "tool_call_cut": sum(e.tool_call_cut for e in enc), "no_tool_call": n_no_call}
        assert len(records) == len(used) + sum(malformed.values()) + unused
        pool += used
        pool_enc += enc
        log(f"[data_prep] {name:7s} read {len(records):6d}  used {len(used):5d}  malformed {sum(malformed.values()):4d}"
            f"  unused {unused:6d}  truncated {manifest['sources'][name]['truncated']:4d}  ({time.time() - t:.1f}s)")

    train_hashes = {s.content_hash() for s in pool}
    train_prompts = {first_user(s) for s in pool}

    # ---- held-out evaluation sources
    eval_pools = {}
    for name, spec in EVAL_SOURCES.items():
        path, revision = fetch(name, spec, source_dir)
        records = read_records(name, path)
        eligible, malformed, overlap, truncated = [], {}, 0, 0
        for i, rec in enumerate(records):
            try:
                if isinstance(rec, Malformed):
                    raise rec
                s = spec.parse(rec, i)
            except Malformed as e:
                malformed[e.reason] = malformed.get(e.reason, 0) + 1
                continue
            if s.content_hash() in train_hashes or first_user(s) in train_prompts:
                overlap += 1
                continue
            if encode(s).truncated:  # never evaluate a row cut short: it would score schema text
                truncated += 1
                continue
            eligible.append(s)
        eval_pools[name] = eligible
        manifest["eval_sources"][name] = {
            "repo": spec.repo, "file": spec.file, "revision": revision, "sha256": sha256_file(path),
            "read": len(records), "eligible": len(eligible), "malformed": sum(malformed.values()),
            "malformed_by_reason": malformed, "overlap_with_training": overlap, "truncated": truncated}
        assert len(records) == len(eligible) + sum(malformed.values()) + overlap + truncated
        log(f"[data_prep] {name:14s} read {len(records):5d}  eligible {len(eligible):5d}  malformed "
            f"{sum(malformed.values()):4d}  in training already {overlap}  longer than {max_len} tokens {truncated}")

    rng = np.random.default_rng(seed)
    tool_pool = [eval_pools["hermes_heldout"][k] for k in rng.permutation(len(eval_pools["hermes_heldout"]))]
    plan_pool = eval_pools["gsm8k_test"]
    for kind, avail, name in (("tool", tool_pool, "hermes_heldout"), ("planning", plan_pool, "gsm8k_test")):
        if len(avail) < eval_counts[kind]:
            raise UserError(f"{name}: only {len(avail)} held-out rows available for the {kind} eval set, "
                             f"{eval_counts[kind]} requested; lower it with --eval-counts {kind}={len(avail)}")
    eval_samples = tool_pool[: eval_counts["tool"]] + plan_pool[: eval_counts["planning"]]
    manifest["eval_sources"]["hermes_heldout"]["chosen_rows"] = [s.row for s in tool_pool[: eval_counts["tool"]]]
    manifest["eval_sources"]["gsm8k_test"]["chosen_rows"] = [s.row for s in plan_pool[: eval_counts["planning"]]]

    # ---- length-matched set: remaining held-out tool prompts + unused Glaive rows vs remaining GSM8K test
    tool_cands = tool_pool[eval_counts["tool"]:]
    records, start = leftovers["glaive"]
    for i in range(start, min(len(records), start + glaive_candidates)):
        try:
            s = glaive.to_sample(records[i], i, "glaive_unused") if not isinstance(records[i], Malformed) else None
        except Malformed:
            s = None
        has_call = s is not None and any(m.get("tool_calls") for m in s.messages)
        if has_call and s.content_hash() not in train_hashes and first_user(s) not in train_prompts:
            tool_cands.append(s)  # truncated ones are left out by the pairing below
    plan_cands = plan_pool[eval_counts["planning"]:]
    tool_enc, plan_enc = [encode(s) for s in tool_cands], [encode(s) for s in plan_cands]
    pairs = match_by_length([(len(e.ids), k) for k, e in enumerate(tool_enc) if not e.truncated],
                            [(len(e.ids), k) for k, e in enumerate(plan_enc) if not e.truncated], matched_pairs, seed)
    matched = [tool_cands[a] for a, _ in pairs] + [plan_cands[b] for _, b in pairs]
    matched_enc = [tool_enc[a] for a, _ in pairs] + [plan_enc[b] for _, b in pairs]

    # ---- split and store
    order = np.random.default_rng(seed).permutation(len(pool))
    n_val = int(len(pool) * val_fraction)
    splits = {"val": order[:n_val], "train": order[n_val:]}
    for name, idx in splits.items():
        write_split(out, name, [pool[k] for k in idx], [pool_enc[k] for k in idx], with_messages=False)
    eval_enc = [encode(s) for s in eval_samples]
    write_split(out, "eval", eval_samples, eval_enc, with_messages=True)
    write_split(out, "eval_matched", matched, matched_enc, with_messages=True)

    for s in eval_samples + matched:  # the promise of this module: nothing evaluated was trained on
        assert s.content_hash() not in train_hashes, f"eval sample {s.source}:{s.row} is in the training pool"
    by_split = {"train": ([pool[k] for k in splits["train"]], [pool_enc[k] for k in splits["train"]]),
                "val": ([pool[k] for k in splits["val"]], [pool_enc[k] for k in splits["val"]]),
                "eval": (eval_samples, eval_enc), "eval_matched": (matched, matched_enc)}
    for name, (ss, ee) in by_split.items():
        manifest["splits"][name] = {"n": len(ss), TOOL: sum(s.step_type == TOOL for s in ss),
                                    PLANNING: sum(s.step_type == PLANNING for s in ss)}
        manifest["token_lengths"][name] = {st: length_stats([len(e.ids) for s, e in zip(ss, ee) if s.step_type == st])
                                           for st in (TOOL, PLANNING)}
    diffs = [abs(len(tool_enc[a].ids) - len(plan_enc[b].ids)) for a, b in pairs]
    manifest["splits"]["eval_matched"].update(pairs=len(pairs), requested_pairs=matched_pairs,
                                              mean_abs_len_diff=round(float(np.mean(diffs)), 2) if diffs else None)
    manifest["files"] = file_records(out, sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file()))
    return manifest
