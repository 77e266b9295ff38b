"""Build a mixture: fetch raw files, parse, count, split, tokenise, store, and write manifest.json.

Mixture: exactly the sources named (`sources={"bfcl": 2000, "gsm8k": 2000}`; a source not named is
not read and its files are not needed), by default the paper's four: Hermes singleturn 1,893, Glaive
5,000, GSM8K train 5,000, Turing every usable row. Records are taken in file order until a source's
count is met (the first N *usable*); BFCL's rows are taken in a seeded random order instead, so that
training and held-out rows both span its categories. Training pool = the used samples, shuffled with
the seed and split 90/10 into train / val. GSM8K is read from the Hub's parquet
(`gsm8k/main/*.parquet`) or from its original release's JSON lines (`gsm8k/train.jsonl`,
`test.jsonl`): same rows, same parser; the manifest names the file.

Rows, before tokenising:
- `multi_turn="cut"` (default): every row ends at its routed response, so one routing decision (on
  the context before it) covers one response: a tool row at its first tool call (Glaive's rows
  otherwise go on to the function's response and a final answer, and would be routed on a prompt
  that holds their own call), a row without a call at its first assistant turn. `"whole"` keeps
  whole conversations (the authors').
- `cut_rows`: a row longer than max_len is truncated; when that cuts into its response (the call,
  the final answer) the row teaches the router nothing about it. "keep" trains on it anyway (the
  paper's 512-token truncation, the default); "drop" leaves it out (excluded as `response_cut`), and
  the next row fills its place. Either way every source counts `response_cut`.

Accounting: every record of a source is exactly one of used / malformed (by reason: it cannot become
a sample) / excluded (by reason: a well-formed record this build does not use, e.g. BFCL multi-turn
rows, dropped cut rows) / unused (beyond the count), so read = used + malformed + excluded + unused.

Held-out evaluation, never in training (checked by content hash and by prompt: the same first user
message is the same prompt), never truncated (left out and counted as `truncated`: a row cut short
would score schema text instead of its question and reference call):
- tool: BFCL rows the training selection did not take, when the mixture holds BFCL (scored by BFCL's
  AST match); otherwise Hermes' multi-turn file `func-calling.json` (not the singleturn file trained
  on), cut to the prompt plus the first tool call, a seeded sample of its eligible rows;
- planning: the first rows of GSM8K `test` that carry a final "#### N" answer;
- length-matched pairs of held-out tool prompts (the rest of the held-out tool rows, unused Glaive
  rows cut at their first call) and GSM8K test rows (not in the eval set), matched on the *prompt*
  length (what routers pooling the prompt see: `eval_matched`) and on the whole row's length
  (`eval_matched_sequence`), so a skip differential cannot come from the length the routers see.

The build writes into a temporary folder beside --out and renames it into place at the end, so an
interrupted build never leaves new arrays under an old manifest; `overwrite=True` replaces only a
folder data_prep built (its manifest says so) that holds no run and none of the source files; a lock
keeps a second build out of the same --out. manifest.json records every file's size and sha256
(`files`), which train.py and eval.py verify; `minroute.run.data.data_identity` hashes what the data
*is*, not when it was built.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minroute.run.chat import ChatFormat, encode_chat
from minroute.run.checkpoint import publish_folder
from minroute.run.safety import FileLock, MissingFile, UserError, file_records, sha256_file

from . import bfcl, glaive, gsm8k, hermes, turing
from .records import PLANNING, TOOL, Malformed, Sample, first_response, read_json_records

STEP_CODE = {TOOL: 0, PLANNING: 1}
PAPER_COUNTS = {
    "hermes": 1893,
    "glaive": 5000,
    "gsm8k": 5000,
    "turing": None,
}  # None: every usable row
PAPER_EVAL_COUNTS = {"tool": 50, "planning": 50}
CUT_ROWS, MULTI_TURN = ("keep", "drop"), ("cut", "whole")


@dataclass(frozen=True)
class RawFile:
    """One raw file: where it is on the Hub (repo None: not on the Hub) and where under
    --source-dir."""

    repo: str | None
    file: str
    revision: str | None
    local: str  # <source-dir>/<local>; the Hub layout is <repo name>/<file>


def hub(repo: str, file: str, revision: str | None) -> RawFile:
    return RawFile(repo, file, revision, f"{repo.split('/')[1]}/{file}")


@dataclass(frozen=True)
class Source:
    step_type: str
    files: tuple[RawFile, ...]  # alternatives, first found wins (BFCL: a folder, read by bfcl.read)
    parse: object  # (record, row) -> Sample


SOURCES = {
    "hermes": Source(TOOL, (hub(hermes.REPO, hermes.FILE, hermes.REVISION),), hermes.to_sample),
    "glaive": Source(TOOL, (hub(glaive.REPO, glaive.FILE, glaive.REVISION),), glaive.to_sample),
    "gsm8k": Source(
        PLANNING,
        (
            hub(gsm8k.REPO, gsm8k.TRAIN_FILE, gsm8k.REVISION),
            RawFile(None, "train.jsonl", None, gsm8k.RELEASE_TRAIN),
        ),
        gsm8k.to_sample,
    ),
    "turing": Source(PLANNING, (hub(turing.REPO, turing.FILE, turing.REVISION),), turing.to_sample),
    "bfcl": Source(TOOL, (), bfcl.to_sample),
}
HERMES_HELDOUT = Source(
    TOOL,
    (hub(hermes.REPO, hermes.HELDOUT_FILE, hermes.REVISION),),
    lambda r, i: hermes.first_call_prefix(hermes.to_sample(r, i, "hermes_heldout")),
)
GSM8K_TEST = Source(
    PLANNING,
    (
        hub(gsm8k.REPO, gsm8k.TEST_FILE, gsm8k.REVISION),
        RawFile(None, "test.jsonl", None, gsm8k.RELEASE_TEST),
    ),
    lambda r, i: gsm8k.to_sample(r, i, "gsm8k_test", need_final=True),
)


def fetch(
    name: str, files: tuple[RawFile, ...], source_dir: Path | None
) -> tuple[Path, RawFile, str | None]:
    """Local path of a raw file, which alternative it is, and the revision it came from."""
    if source_dir is not None:
        for f in files:
            if (Path(source_dir) / f.local).is_file():
                return Path(source_dir) / f.local, f, f.revision
        raise MissingFile(
            f"{name}: {' or '.join(str(Path(source_dir) / f.local) for f in files)} not found; "
            "--source-dir must hold the raw files as on the Hub (<dir>/<repo name>/<file>)"
        )
    online = [f for f in files if f.repo]
    if not online:
        raise MissingFile(f"{name}: its files are not on the Hugging Face Hub; pass --source-dir")
    f = online[0]
    from huggingface_hub import hf_hub_download

    try:
        path = Path(hf_hub_download(f.repo, f.file, repo_type="dataset", revision=f.revision))
    except Exception as e:
        raise MissingFile(
            f"{name}: could not download {f.file} from dataset {f.repo} (revision"
            f" {f.revision or 'main'}): {type(e).__name__}: {e}. Use --source-dir with the raw"
            " files if you are offline"
        ) from e
    parts = path.parts  # <cache>/snapshots/<commit>/<file>: record the commit actually downloaded
    return path, f, parts[parts.index("snapshots") + 1] if "snapshots" in parts else f.revision


def read_source(name: str, source: Source, source_dir, seed: int) -> tuple[list, dict]:
    """(records in the order they are taken, the manifest's file facts)."""
    if name == "bfcl":
        if source_dir is None:
            raise MissingFile(
                "bfcl: BFCL v4 is read from --source-dir (<dir>/bfcl-v4/), e.g. the data folder of "
                "the PyPI package bfcl-eval (`pip download --no-deps bfcl-eval`)"
            )
        records, facts = bfcl.read(Path(source_dir))
        order = np.random.default_rng([seed, 0xBFC1]).permutation(len(records))
        facts["order"] = f"seeded random order (seed {seed}), categories mixed"
        files = {c["questions"]: c for c in facts["categories"].values()}
        root = Path(source_dir) / bfcl.FOLDER
        facts["files"] = {
            n: {"sha256": sha256_file(root / n), "answers_sha256": sha256_file(root / c["answers"])}
            for n, c in files.items()
        }
        return [(int(i), records[i]) for i in order], facts
    path, f, revision = fetch(name, source.files, source_dir)
    records = (
        gsm8k.read_parquet(path, name)
        if path.suffix == ".parquet"
        else read_json_records(path, name)
    )
    if not records:
        raise UserError(f"{name}: {path} holds no records")
    return list(enumerate(records)), {
        "repo": f.repo,
        "file": f.local if f.repo is None else f.file,
        "revision": revision,
        "sha256": sha256_file(path),
    }


class Counter:
    """Counts of one source by outcome and reason."""

    def __init__(self):
        self.used, self.malformed, self.excluded = 0, {}, {}

    def bad(self, e: Malformed):
        into = (
            self.excluded
            if isinstance(e, bfcl.Excluded) or e.reason in ("response_cut",)
            else self.malformed
        )
        into[e.reason] = into.get(e.reason, 0) + 1

    def summary(self, read: int) -> dict:
        n_bad, n_ex = sum(self.malformed.values()), sum(self.excluded.values())
        return {
            "read": read,
            "used": self.used,
            "malformed": n_bad,
            "malformed_by_reason": self.malformed,
            "excluded": n_ex,
            "excluded_by_reason": self.excluded,
            "unused": read - self.used - n_bad - n_ex,
        }


def take(
    records: list, parse, want: int | None, encode, cut_rows: str
) -> tuple[list, list, Counter, int]:
    """Parse (row, record) pairs in order until `want` samples are usable; returns (samples,
    encodings, counts, records consumed). A row whose response the truncation cuts is dropped when
    cut_rows is 'drop'.
    """
    used, enc, count, k = [], [], Counter(), 0
    for k, (row, rec) in enumerate(records, start=1):  # noqa: B007 (k: the count after the loop)
        try:
            if isinstance(rec, Malformed):
                raise rec
            s = parse(rec, row)
            e = encode(s)
            if e.response_cut and cut_rows == "drop":
                raise Malformed("response_cut")
        except Malformed as err:
            count.bad(err)
        else:
            used.append(s)
            enc.append(e)
            count.used += 1
        if want is not None and len(used) >= want:
            break
    return used, enc, count, k


def length_stats(lengths) -> dict:
    a = np.asarray(lengths)
    if a.size == 0:
        return {"n": 0}
    return {
        "n": int(a.size),
        "min": int(a.min()),
        "mean": round(float(a.mean()), 1),
        "median": float(np.median(a)),
        "p95": float(np.percentile(a, 95)),
        "max": int(a.max()),
    }


def write_split(out: Path, name: str, samples: list[Sample], encoded: list, with_messages: bool):
    """Flat memory-mappable token arrays plus one JSON line per sample."""
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    lengths = np.array([len(e.ids) for e in encoded], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    def flat(key, dtype):
        return (
            np.concatenate([getattr(e, key) for e in encoded]).astype(dtype)
            if encoded
            else np.zeros(0, dtype)
        )

    np.save(d / "ids.npy", flat("ids", np.uint32))
    np.save(d / "loss_mask.npy", flat("loss_mask", np.uint8))
    np.save(d / "assistant_mask.npy", flat("assistant_mask", np.uint8))
    np.save(d / "offsets.npy", offsets)
    np.save(
        d / "step_type.npy", np.array([STEP_CODE[s.step_type] for s in samples], dtype=np.uint8)
    )
    np.save(d / "prompt_len.npy", np.array([e.prompt_len for e in encoded], dtype=np.int32))
    with open(d / "samples.jsonl", "w", encoding="utf-8") as f:
        for s, e in zip(samples, encoded):
            rec = {
                "source": s.source,
                "row": s.row,
                "step_type": s.step_type,
                "hash": s.content_hash(),
                "prompt_hash": s.prompt_hash(),
                "n_tokens": len(e.ids),
                "prompt_tokens": e.prompt_len,
                "truncated": e.truncated,
                "response_cut": e.response_cut,
                "meta": s.meta,
            }
            if with_messages:
                rec.update(messages=s.messages, tools=s.tools)
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def match_by_length(
    tool: list[tuple[int, int]],
    plan: list[tuple[int, int]],
    pairs: int,
    seed: int,
    rel_tol: float = 0.05,
    abs_tol: int = 4,
) -> list[tuple[int, int]]:
    """Pair (length, index) items of the two lists with |length difference| <= max(abs_tol, rel_tol
    * length).

    A two-pointer pass over both sorted lists gives a maximal set of disjoint pairs; a seeded subset
    of `pairs` of them is returned, so the set spans the lengths the two types share.
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


def check_out_folder(final: Path, overwrite: bool, source_dir):
    """A data folder may replace only a data folder: never a run, never the raw files, never
    anything else."""
    if final.exists() and not final.is_dir():
        raise UserError(f"--out {final} is a file; give a folder")
    if not final.exists() or not any(final.iterdir()):
        return
    manifest = final / "manifest.json"
    built = False
    if manifest.is_file():
        try:
            built = {"format", "files", "splits"} <= set(json.loads(manifest.read_text()))
        except (OSError, ValueError):
            built = False
    if not overwrite:
        what = "a data folder" if built else "files"
        raise UserError(
            f"{final} already holds {what}; pass --overwrite to replace it, or choose another --out"
        )
    if source_dir is not None:
        src = Path(source_dir).resolve()
        if src == final.resolve() or final.resolve() in src.parents:
            raise UserError(
                f"--out {final} holds the raw files of --source-dir {source_dir}; --overwrite never"
                " replaces them. Choose another --out"
            )
    if not built:
        raise UserError(
            f"{final} was not built by data_prep (no data_prep manifest.json); --overwrite replaces"
            " only a data folder. Choose another --out"
        )
    from minroute.run.folders import RUN_FILES

    held = [f for f in RUN_FILES if (final / f).exists()] + [p.name for p in final.glob("ckpt-*")][
        :1
    ]
    if held:
        raise UserError(
            f"{final} holds a train.py run ({', '.join(held)}); --overwrite never replaces a run. "
            "Choose another --out"
        )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_stale_builds(final: Path, log=print):
    """Remove the half-written `.NAME.building-PID` folders of builds whose process is gone (killed,
    e.g. by SIGKILL, which no cleanup survives); the lock held here keeps out a live build of this
    --out, and a folder whose PID is alive (another process since) is left alone."""
    for d in final.parent.glob(f".{final.name}.building-*"):
        pid = d.name.rsplit("-", 1)[-1]
        if d.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            log(f"[data_prep] removed {d}: the unfinished build of process {pid}, which is gone")


def build(
    out_dir,
    tokenizer,
    tokenizer_name: str,
    tokenizer_sha256: str | None = None,
    source_dir=None,
    counts=None,
    eval_counts=None,
    matched_pairs: int = 50,
    seed: int = 42,
    max_len: int = 512,
    loss_on: str = "all",
    val_fraction: float = 0.1,
    glaive_candidates: int = 2000,
    overwrite: bool = False,
    log=print,
    chat_format: ChatFormat | None = None,
    sources: dict | None = None,
    cut_rows: str = "keep",
    multi_turn: str = "cut",
) -> dict:
    """Build everything under out_dir (atomically); return the manifest (also written to
    out_dir/manifest.json).

    `sources` names the mixture exactly ({name: count or None = every usable row}); without it, the
    paper's four sources with `counts` overriding their counts."""
    if Path(tokenizer_name).exists():  # recorded relative to the data folder: it moves with a study
        tokenizer_name = os.path.relpath(Path(tokenizer_name).resolve(), Path(out_dir).resolve())
    if sources is not None and counts:
        raise UserError(
            "give the mixture either as sources (exactly these) or as counts (the paper's four, "
            "recounted), not both"
        )
    mixture = dict(sources) if sources is not None else {**PAPER_COUNTS, **(counts or {})}
    unknown = sorted(set(mixture) - set(SOURCES))
    if unknown or not mixture:
        raise UserError(f"sources {unknown or '(none)'}: choose from {', '.join(SOURCES)}")
    if cut_rows not in CUT_ROWS or multi_turn not in MULTI_TURN:
        raise UserError(
            f"cut_rows {cut_rows!r} / multi_turn {multi_turn!r}: expected {CUT_ROWS} / {MULTI_TURN}"
        )
    t0 = time.time()
    final = Path(out_dir)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {final}: cannot create its parent folder ({e.strerror})") from None
    with FileLock(final.parent / f".{final.name}.lock", f"--out {final}"):
        check_out_folder(final, overwrite, source_dir)
        remove_stale_builds(final, log)
        out = final.parent / f".{final.name}.building-{os.getpid()}"
        try:
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            settings = dict(
                mixture=mixture,
                eval_counts={**PAPER_EVAL_COUNTS, **(eval_counts or {})},
                matched_pairs=matched_pairs,
                seed=seed,
                max_len=max_len,
                loss_on=loss_on,
                val_fraction=val_fraction,
                glaive_candidates=glaive_candidates,
                cut_rows=cut_rows,
                multi_turn=multi_turn,
            )
            manifest = _build(
                out,
                tokenizer,
                tokenizer_name,
                tokenizer_sha256,
                source_dir,
                chat_format or ChatFormat(),
                log,
                **settings,
            )
            manifest["build_seconds"] = round(time.time() - t0, 2)
            (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
            # --overwrite: the old folder goes only once the new one is in place
            publish_folder(out, final)
        except UserError:
            raise
        except OSError as e:
            raise UserError(
                f"--out {final}: writing the data failed ({e.strerror or e}); the previous folder,"
                " if any, is unchanged"
            ) from None
        finally:
            shutil.rmtree(out, ignore_errors=True)
    sp = manifest["splits"]
    log(
        f"[data_prep] train {sp['train']['n']}  val {sp['val']['n']}  eval {sp['eval']['n']} "
        f" matched pairs {sp['eval_matched']['pairs']} (prompt length) /"
        f" {sp['eval_matched_sequence']['pairs']} (whole row)  -> {final}"
        f" ({manifest['build_seconds']}s)"
    )
    return manifest


def _build(
    out: Path,
    tokenizer,
    tokenizer_name,
    tokenizer_sha256,
    source_dir,
    fmt,
    log,
    *,
    mixture,
    eval_counts,
    matched_pairs,
    seed,
    max_len,
    loss_on,
    val_fraction,
    glaive_candidates,
    cut_rows,
    multi_turn,
) -> dict:
    source_dir = Path(source_dir) if source_dir is not None else None
    manifest = {
        "format": 2,
        "tokenizer": tokenizer_name,
        "tokenizer_sha256": tokenizer_sha256,
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "max_len": max_len,
        "loss_on": loss_on,
        "seed": seed,
        "val_fraction": val_fraction,
        "counts": mixture,
        "cut_rows": cut_rows,
        "multi_turn": multi_turn,
        "eval_counts": eval_counts,
        "chat_format": {
            "default_system": fmt.default_system,
            "template_has_tools": fmt.template_has_tools,
        },
        "sources": {},
        "eval_sources": {},
        "splits": {},
        "token_lengths": {},
    }
    if not fmt.template_has_tools and any(SOURCES[n].step_type == TOOL for n in mixture):
        log(
            "[data_prep] note: the model's chat template has no tool section; tool rows are"
            " rendered in Qwen2.5's format (<tools> in the system turn, <tool_call> JSON,"
            " <tool_response> in a user turn)"
        )

    def encode(s: Sample):
        return encode_chat(
            tokenizer, s.messages, s.tools, max_len=max_len, loss_on=loss_on, fmt=fmt
        )

    def routed(parse):  # multi_turn="cut": every row ends at its routed response
        if multi_turn == "whole":
            return parse
        return lambda rec, row: first_response(parse(rec, row))

    # ---- the training sources
    pool, pool_enc, leftovers = [], [], {}
    for name, want in mixture.items():
        t = time.time()
        src = SOURCES[name]
        records, facts = read_source(name, src, source_dir, seed)
        used, enc, count, consumed = take(records, routed(src.parse), want, encode, cut_rows)
        if want is not None and len(used) < want:
            raise UserError(
                f"{name}: only {len(used)} usable rows ({len(records)} read,"
                f" {sum(count.malformed.values())} malformed: {count.malformed}, excluded:"
                f" {count.excluded}); {want} requested. Lower it with --sources / --counts"
                f" {name}={len(used)}"
            )
        if not used:
            raise UserError(
                f"{name}: no usable rows ({len(records)} read, malformed: {count.malformed},"
                f" excluded: {count.excluded})"
            )
        leftovers[name] = records[consumed:]
        stats = {
            **facts,
            **count.summary(len(records)),
            "truncated": sum(e.truncated for e in enc),
            "response_cut": (
                sum(e.response_cut for e in enc) + count.excluded.get("response_cut", 0)
            ),
            "tool_call_cut": sum(e.tool_call_cut for e in enc),
            "cut_at_first_response": sum(bool(s.meta.get("cut_at_first_response")) for s in used),
            "no_tool_call": sum(
                s.step_type == TOOL and not any(m.get("tool_calls") for m in s.messages)
                for s in used
            ),
        }
        if name == "bfcl":
            stats["used_by_category"] = {}
            for s in used:
                c = s.meta["category"]
                stats["used_by_category"][c] = stats["used_by_category"].get(c, 0) + 1
        assert (
            stats["read"]
            == stats["used"] + stats["malformed"] + stats["excluded"] + stats["unused"]
        ), name
        manifest["sources"][name] = stats
        pool += used
        pool_enc += enc
        log(
            f"[data_prep] {name:7s} read {len(records):6d}  used {len(used):5d}  malformed"
            f" {stats['malformed']:4d}  excluded {stats['excluded']:4d}  unused"
            f" {stats['unused']:6d}  truncated {stats['truncated']:4d}  response cut"
            f" {stats['response_cut']:4d}  ({time.time() - t:.1f}s)"
        )

    train_hashes = {s.content_hash() for s in pool}
    train_prompts = {s.prompt_hash() for s in pool}

    def held_out(name: str, records: list, parse, facts: dict) -> list[Sample]:
        """The eligible held-out rows of an eval source, every record counted."""
        eligible, count, overlap, truncated = [], Counter(), 0, 0
        for row, rec in records:
            try:
                if isinstance(rec, Malformed):
                    raise rec
                s = parse(rec, row)
            except Malformed as e:
                count.bad(e)
                continue
            if s.content_hash() in train_hashes or s.prompt_hash() in train_prompts:
                overlap += 1
            elif encode(s).truncated:  # never evaluate a row cut short
                truncated += 1
            else:
                eligible.append(s)
        summary = count.summary(len(records))
        summary.update(eligible=len(eligible), overlap_with_training=overlap, truncated=truncated)
        del summary["used"], summary["unused"]
        manifest["eval_sources"][name] = {**facts, **summary}
        assert (
            len(records)
            == len(eligible) + summary["malformed"] + summary["excluded"] + overlap + truncated
        )
        log(
            f"[data_prep] {name:14s} read {len(records):5d}  eligible {len(eligible):5d}  malformed"
            f" {summary['malformed']:4d}  in training already {overlap}  longer than {max_len}"
            f" tokens {truncated}"
        )
        return eligible

    # ---- held-out evaluation: tool rows (BFCL's unused rows, else Hermes' multi-turn file), GSM8K
    # test
    rng = np.random.default_rng(seed)
    if "bfcl" in mixture:
        tool_name = "bfcl_heldout"
        tool_pool = held_out(
            tool_name,
            leftovers["bfcl"],
            lambda r, i: bfcl.to_sample(r, i, tool_name),
            {"from": "BFCL rows the training selection did not take (same seeded order)"},
        )
    else:
        tool_name = "hermes_heldout"
        records, facts = read_source(tool_name, HERMES_HELDOUT, source_dir, seed)
        eligible = held_out(tool_name, records, HERMES_HELDOUT.parse, facts)
        tool_pool = [eligible[k] for k in rng.permutation(len(eligible))]
    records, facts = read_source("gsm8k_test", GSM8K_TEST, source_dir, seed)
    plan_pool = held_out("gsm8k_test", records, GSM8K_TEST.parse, facts)
    for kind, avail, name in (
        ("tool", tool_pool, tool_name),
        ("planning", plan_pool, "gsm8k_test"),
    ):
        if len(avail) < eval_counts[kind]:
            more = " or take fewer BFCL rows for training" if name == "bfcl_heldout" else ""
            raise UserError(
                f"{name}: only {len(avail)} held-out rows available for the {kind} eval set,"
                f" {eval_counts[kind]} requested; lower it with --eval-counts"
                f" {kind}={len(avail)}{more}"
            )
    eval_samples = tool_pool[: eval_counts["tool"]] + plan_pool[: eval_counts["planning"]]
    manifest["eval_sources"][tool_name]["chosen_rows"] = [
        s.row for s in tool_pool[: eval_counts["tool"]]
    ]
    manifest["eval_sources"]["gsm8k_test"]["chosen_rows"] = [
        s.row for s in plan_pool[: eval_counts["planning"]]
    ]

    # ---- length-matched sets: the remaining held-out tool prompts + unused Glaive rows vs
    # remaining GSM8K test
    tool_cands = tool_pool[eval_counts["tool"] :]
    for row, rec in leftovers.get("glaive", [])[:glaive_candidates]:
        try:
            s = hermes.first_call_prefix(glaive.to_sample(rec, row, "glaive_unused"))
        except (Malformed, TypeError):
            continue
        if s.content_hash() not in train_hashes and s.prompt_hash() not in train_prompts:
            tool_cands.append(s)
    plan_cands = plan_pool[eval_counts["planning"] :]
    tool_enc, plan_enc = [encode(s) for s in tool_cands], [encode(s) for s in plan_cands]
    matched = {}
    for split, length in (
        ("eval_matched", lambda e: e.prompt_len),
        ("eval_matched_sequence", lambda e: len(e.ids)),
    ):
        pairs = match_by_length(
            [(length(e), k) for k, e in enumerate(tool_enc) if not e.truncated],
            [(length(e), k) for k, e in enumerate(plan_enc) if not e.truncated],
            matched_pairs,
            seed,
        )
        diffs = [abs(length(tool_enc[a]) - length(plan_enc[b])) for a, b in pairs]
        matched[split] = (
            [tool_cands[a] for a, _ in pairs] + [plan_cands[b] for _, b in pairs],
            [tool_enc[a] for a, _ in pairs] + [plan_enc[b] for _, b in pairs],
            {
                "pairs": len(pairs),
                "requested_pairs": matched_pairs,
                "matched_on": "prompt tokens" if split == "eval_matched" else "whole-row tokens",
                "candidates": {"tool": len(tool_cands), "planning": len(plan_cands)},
                "mean_abs_len_diff": round(float(np.mean(diffs)), 2) if diffs else None,
            },
        )

    # ---- split and store
    order = np.random.default_rng(seed).permutation(len(pool))
    n_val = int(len(pool) * val_fraction)
    by_split = {
        "train": ([pool[k] for k in order[n_val:]], [pool_enc[k] for k in order[n_val:]]),
        "val": ([pool[k] for k in order[:n_val]], [pool_enc[k] for k in order[:n_val]]),
        "eval": (eval_samples, [encode(s) for s in eval_samples]),
        **{k: v[:2] for k, v in matched.items()},
    }
    for name, (ss, ee) in by_split.items():
        write_split(out, name, ss, ee, with_messages=name not in ("train", "val"))
    for s in eval_samples + matched["eval_matched"][0] + matched["eval_matched_sequence"][0]:
        assert s.content_hash() not in train_hashes and s.prompt_hash() not in train_prompts, (
            f"eval sample {s.source}:{s.row} is in the training pool"
        )  # the promise of this module
    for name, (ss, ee) in by_split.items():
        manifest["splits"][name] = {
            "n": len(ss),
            TOOL: sum(s.step_type == TOOL for s in ss),
            PLANNING: sum(s.step_type == PLANNING for s in ss),
        }
        manifest["token_lengths"][name] = {
            st: {
                "row": length_stats([len(e.ids) for s, e in zip(ss, ee) if s.step_type == st]),
                "prompt": length_stats([e.prompt_len for s, e in zip(ss, ee) if s.step_type == st]),
            }
            for st in (TOOL, PLANNING)
        }
    for split, (_, _, info) in matched.items():
        manifest["splits"][split].update(info)
    manifest["files"] = file_records(
        out, sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())
    )
    return manifest
