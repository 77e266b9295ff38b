"""What an evaluation measures, per eval row and gate setting, and the controls it compares the
routing with.

`PassResult` holds one setting's measurements on an eval split: step type, real length, prompt
length, summed CE and counted tokens (all counted tokens, and the assistant-output tokens alone),
the soft gates p (L,) and the hard gates (L,, True = block ran). `run_pass` is one setting alone
(passes.run_settings does several at once, sharing their common prefixes). PPL is exp(token-mean CE)
and nothing else; the paper's definition is computed beside it only to show the artefact
(docs/reference.md §2, defect 1): the authors averaged exp(CE_i + lambda * R_i) over samples, R_i a
sample's mean soft gate.

Controls at *exactly* matched compute (`static_masks`, `random_masks`): the learned routing runs a
mean of m layers per row, a multiple of 1/N over N rows; a control gives each row k or k + 1 skipped
blocks so that its mean is exactly m (rounding k alone would compare 2.00 layers with 2.45). The
static mask closes the layers the routing skips most, in that order, the same for every row; the
random masks close random layers, matched per step type.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minroute.evaluation.flops import paper_flops, sequence_flops
from minroute.evaluation.passes import Setting, SettingResult, run_settings
from minroute.evaluation.stats import differential_stats
from minroute.run.checkpoint import atomic_write_text, trained_rows
from minroute.run.data import TOOL, DataFolder, TokenSplit
from minroute.run.safety import UserError

STEP_NAMES = {TOOL: "tool", 1: "planning"}


@dataclass
class PassResult:
    step_type: np.ndarray  # (N,) 0 = tool_call, 1 = planning
    n_tokens: np.ndarray  # (N,) real tokens
    ce_sum: np.ndarray  # (N,) summed token CE
    n_counted: np.ndarray  # (N,) tokens in the loss
    soft: np.ndarray  # (N, L) router p (what the routers think, even when gates are imposed)
    hard: np.ndarray  # (N, L) bool, True = block ran
    asst_sum: np.ndarray | None = None  # (N,) summed CE of the assistant-output tokens
    asst_counted: np.ndarray | None = None  # (N,) assistant-output tokens
    prompt_tokens: np.ndarray | None = None  # (N,) tokens of the routed prompt

    @classmethod
    def of(cls, split: TokenSplit, r: SettingResult) -> PassResult:
        return cls(
            np.asarray(split.step_type, dtype=np.int64),
            split.lengths(),
            r.ce_sum,
            r.n_counted,
            r.soft,
            r.hard.astype(bool),
            r.asst_sum,
            r.asst_counted,
            np.asarray(split.prompt_len, dtype=np.int64),
        )

    def sel(self, t: int) -> np.ndarray:
        return self.step_type == t

    @property
    def layers_run(self) -> np.ndarray:
        return self.hard.sum(1)

    def skip_pct(self, t: int | None = None) -> float:
        """skip% of step type t (all rows: None); core.router.skip_percent's definition, in numpy
        (tested equal)."""
        h = self.hard if t is None else self.hard[self.sel(t)]
        return 100.0 * float(1 - h.mean()) if h.size else float("nan")

    @property
    def skip_per_sample(self) -> np.ndarray:
        return 100.0 * (1 - self.hard.mean(1))

    def routed_length(self, route_on: str) -> np.ndarray:
        """The length the routers pool: the prompt's tokens, or the whole row's."""
        return (
            self.prompt_tokens
            if route_on == "prompt" and self.prompt_tokens is not None
            else self.n_tokens
        )

    def ce(self, t: int | None = None, assistant: bool = False) -> float:
        m = np.ones_like(self.step_type, bool) if t is None else self.sel(t)
        if assistant:
            if self.asst_sum is None or self.asst_counted[m].sum() == 0:
                return float("nan")
            return float(self.asst_sum[m].sum() / self.asst_counted[m].sum())
        return float(self.ce_sum[m].sum() / max(1, self.n_counted[m].sum()))

    def ppl(self, t: int | None = None, assistant: bool = False) -> float:
        ce = self.ce(t, assistant)
        return (
            math.exp(ce)
            if math.isfinite(ce) and ce < 700
            else float("nan" if not math.isfinite(ce) else "inf")
        )

    def paper_ppl(self, t: int, lam: float, forced: bool) -> float:
        """The authors' 'PPL': the mean over samples of exp(CE_i + lambda * R_i), CE_i a sample's
        token-mean CE and R_i its mean soft gate; all-open methods (biases forced open) count their
        gates as 1."""
        m = self.sel(t) & (self.n_counted > 0)
        ce_i = self.ce_sum[m] / self.n_counted[m]
        r_i = np.ones(m.sum()) if forced else self.soft[m].mean(1)
        return (
            float(np.mean(np.exp(np.minimum(ce_i + lam * r_i, 700)))) if m.any() else float("nan")
        )

    def flops_reduction(self, cfg, t: int, whole_model: bool = True) -> float:
        """% of forward FLOPs saved vs every block running: at real lengths with lm_head and routers
        (whole_model), or the paper's blocks-only formula at T = 512."""
        m = self.sel(t)
        if not whole_model:
            return 100.0 * (
                1
                - sum(paper_flops(cfg, 512, k) for k in self.layers_run[m])
                / (m.sum() * paper_flops(cfg, 512))
            )
        run = sum(
            sequence_flops(cfg, int(T), int(k))
            for T, k in zip(self.n_tokens[m], self.layers_run[m])
        )
        full = sum(
            sequence_flops(cfg, int(T), cfg.num_hidden_layers, routers=False)
            for T in self.n_tokens[m]
        )
        return 100.0 * (1 - run / full)

    def differential(self, seed: int = 0) -> dict:
        return differential_stats(self.skip_per_sample, self.step_type == TOOL, seed=seed)


def run_pass(
    route,
    split: TokenSplit,
    pad_id: int,
    mode: str = "gated",
    gates: np.ndarray | None = None,
    batch_size: int = 8,
    device="cpu",
    autocast=contextlib.nullcontext,
    chunk: int = 1024,
    route_on: str = "prompt",
    pad_to: int | None = None,
) -> PassResult:
    """One method alone: 'base' (no LoRA, every block), 'full' (LoRA, every block), 'gated' (the
    routers, or `gates` imposed). pad_to pads every batch to a fixed length (the authors' forward
    pools over padding).
    """
    if mode not in ("base", "full", "gated"):
        raise ValueError(f"mode {mode!r}")
    L = route.config.num_hidden_layers
    s = Setting(
        mode, np.ones(L, bool) if mode != "gated" else gates, route_on=route_on, lora=mode != "base"
    )
    r = run_settings(route, split, pad_id, [s], batch_size, device, autocast, pad_to, chunk)[mode]
    return PassResult.of(split, r)


def _k_or_k_plus_one(rows: np.ndarray, skipped_total: int, rng) -> dict[int, int]:
    """Skipped blocks per row so that they sum to skipped_total: k for most rows, k + 1 for a seeded
    few."""
    n = len(rows)
    k, extra = divmod(int(skipped_total), n) if n else (0, 0)
    plus = set(rng.choice(n, size=extra, replace=False).tolist()) if extra else set()
    return {int(r): k + (j in plus) for j, r in enumerate(rows)}


def static_masks(gated: PassResult, seed: int = 0) -> np.ndarray:
    """(N, L): every row closes the most-skipped layers of the learned routing, in that order, k or
    k + 1 of them, so that the mean layers run equals the learned routing's exactly."""
    N, L = gated.hard.shape
    # layers by skip rate, highest first
    order = np.argsort(-(1 - gated.hard.mean(0)), kind="stable")
    out = np.ones((N, L), dtype=bool)
    per_row = _k_or_k_plus_one(
        np.arange(N), int((~gated.hard).sum()), np.random.default_rng([seed, 1])
    )
    for r, k in per_row.items():
        out[r, order[:k]] = False
    return out


def random_masks(gated: PassResult, seed: int = 0) -> np.ndarray:
    """(N, L): each row closes k_t or k_t + 1 random layers, so that each step type's mean layers
    run equals the learned routing's for that type exactly."""
    rng = np.random.default_rng(seed)
    N, L = gated.hard.shape
    out = np.ones((N, L), dtype=bool)
    for t in np.unique(gated.step_type):
        rows = np.flatnonzero(gated.sel(t))
        for r, k in _k_or_k_plus_one(rows, int((~gated.hard[rows]).sum()), rng).items():
            out[r, rng.choice(L, size=k, replace=False)] = False
    return out


def static_mask(gated: PassResult) -> np.ndarray:
    """(L,): the one mask closing the round(mean skipped) most-skipped layers (for generation, one
    mask for all)."""
    L = gated.hard.shape[1]
    k = int(round(L - gated.layers_run.mean()))
    mask = np.ones(L, dtype=bool)
    mask[np.argsort(-(1 - gated.hard.mean(0)), kind="stable")[:k]] = False
    return mask


class BaseCache:
    """What an evaluation computes of the base model alone (no LoRA, no routers: the same for every
    run of a study), in DIR under a key of the model's files, the data's identity and the evaluation
    settings; None = no cache.
    """

    def __init__(self, folder, run, args):
        self.dir = Path(folder) if folder else None
        if self.dir is None:
            return
        from minroute.run.inputs import model_identity
        from minroute.run.load import resolve_dir

        mdir = resolve_dir(run.meta["args"]["model"] if not args.model else args.model)
        ident = {
            "data": run.data.identity,
            "model": model_identity(mdir),  # by content: a moved or copied study keeps its cache
            "batching": run.batching,
            "max_new_tokens": args.max_new_tokens,
            "dtype": str(next(run.route.parameters()).dtype),
        }
        import hashlib

        self.key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]

    def path(self, what: str) -> Path | None:
        return None if self.dir is None else self.dir / f"base-{what}-{self.key}"

    def load_pass(self):
        p = self.path("pass")
        if p is None or not p.with_suffix(".npz").exists():
            return None
        from minroute.evaluation.passes import SettingResult

        with np.load(p.with_suffix(".npz")) as z:  # plain arrays only: never unpickles
            return SettingResult(**{k: z[k] for k in z.files})

    def save_pass(self, r):
        p = self.path("pass")
        if p is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(p.name + ".tmp.npz")
            arrays = {k: v for k, v in vars(r).items() if v is not None}
            # the routers of this run: meaningless for another
            arrays["soft"] = np.full_like(r.soft, np.nan)
            np.savez(tmp, **arrays)
            os.replace(tmp, p.with_suffix(".npz"))

    def load_json(self, what: str):
        p = self.path(what)
        return (
            json.loads(p.with_suffix(".json").read_text())
            if p is not None and p.with_suffix(".json").exists()
            else None
        )

    def save_json(self, what: str, value):
        p = self.path(what)
        if p is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(p.with_suffix(".json"), json.dumps(value, default=float))


# ----------------------------------------------------------------------------- which rows, batched
# how


def check_held_out(data: DataFolder, meta: dict, ckpt_dir: Path, say=print, allow_unverified=False):
    """Refuse eval rows the run trained or selected on: same conversation, or same prompt (first
    user message). A checkpoint from before trained_rows.txt is checked against the data folder's
    own train and val rows, which are what it trained on only if it is that data folder: on another
    one, the check cannot be made, and is refused unless allow_unverified
    (--unverified-held-out)."""
    if not data.same_as_trained(meta):
        say(
            f"note: {data} is not the data folder {ckpt_dir.name} was trained on (its content"
            " differs); its held-out rows are checked against the rows the run trained on"
        )
    trained = trained_rows(ckpt_dir)
    if trained is None:  # checkpoints written before trained_rows.txt: the data folder's own rows
        if not data.same_as_trained(meta) and not allow_unverified:
            raise UserError(
                f"{ckpt_dir} records no trained rows (trained_rows.txt; older runs) and {data} is"
                " not the data it trained on, so whether its eval rows were trained on cannot be"
                " checked; evaluate on the run's own data folder, or pass --unverified-held-out"
            )
        contents, prompts = data.trained_hashes()
        trained = contents | {f"prompt:{h}" for h in prompts}
    for split in ("eval", "eval_matched", "eval_matched_sequence"):
        if not data.has_split(split):
            continue
        leak = [
            r
            for r in data.split(split).rows
            if r["hash"] in trained or f"prompt:{r.get('prompt_hash')}" in trained
        ]
        if leak:
            r = leak[0]
            why = "conversation" if r["hash"] in trained else "prompt"
            raise UserError(
                f"{len(leak)} rows of {data}/{split} (e.g. {r['source']} row {r['row']}, by its"
                f" {why}) were trained on by {ckpt_dir}; evaluate on held-out data (rebuild it"
                " without them)"
            )


def eval_batching(meta: dict, batch_size: int) -> tuple[dict, str]:
    """How to batch a checkpoint's eval rows so that no row's gates depend on its batch-mates:
    mask-aware pooling ignores padding; the authors' forward (pool 'all') pools over it, so it is
    evaluated at the padded length it trained with, or one row at a time (as the authors'
    evaluate.py) when it trained unpadded."""
    a = meta["args"]
    if a.get("pool") != "all":
        return {
            "batch_size": batch_size,
            "pad_to": None,
        }, "padding excluded from pooling and attention"
    if a.get("pad_to"):
        return (
            {"batch_size": batch_size, "pad_to": a["pad_to"]},
            (
                f"right-padded to {a['pad_to']} tokens as in training (the authors' forward pools"
                " over padding)"
            ),
        )
    return {
        "batch_size": 1,
        "pad_to": None,
    }, "one row at a time (the authors' forward pools over padding)"
