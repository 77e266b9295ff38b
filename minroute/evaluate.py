"""The measurements behind eval.py: one pass over an eval split per method, and what is computed from it.

A pass records per sample: step type, real length, summed CE and counted tokens (all counted tokens, and
the assistant-output tokens alone), the soft gates p (L,) and the hard gates (L,, True = block ran).
Methods: `base` (no LoRA, every block), `full` (LoRA, every block), `gated` (LoRA + routers, real
skipping), or any imposed gate mask (the matched-compute controls). The routers pool over the prompt
(`route_on="prompt"`: the gates a deployment takes at prefill) or over prompt + reference answer
(`"sequence"`: teacher forcing, as the authors evaluated). PPL is exp(token-mean CE) and nothing else; the
paper's definition exp(CE + lambda * mean soft gate) is computed beside it only to show the artefact
(REFERENCE.md §2, defect 1). `differential_stats` gives the tool-minus-planning skip differential of one
run with a stratified bootstrap CI over eval samples and a permutation-test p-value.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from .data import TOOL, TokenSplit, collate
from .flops import paper_flops, sequence_flops
from .lora import lora_disabled
from .loss import lm_loss_per_sample

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

    def sel(self, t: int) -> np.ndarray:
        return self.step_type == t

    @property
    def layers_run(self) -> np.ndarray:
        return self.hard.sum(1)

    def skip_pct(self, t: int | None = None) -> float:
        h = self.hard if t is None else self.hard[self.sel(t)]
        return 100.0 * float(1 - h.mean()) if h.size else float("nan")

    @property
    def skip_per_sample(self) -> np.ndarray:
        return 100.0 * (1 - self.hard.mean(1))

    def ce(self, t: int | None = None, assistant: bool = False) -> float:
        m = np.ones_like(self.step_type, bool) if t is None else self.sel(t)
        if assistant:
            if self.asst_sum is None or self.asst_counted[m].sum() == 0:
                return float("nan")
            return float(self.asst_sum[m].sum() / self.asst_counted[m].sum())
        return float(self.ce_sum[m].sum() / max(1, self.n_counted[m].sum()))

    def ppl(self, t: int | None = None, assistant: bool = False) -> float:
        return math.exp(self.ce(t, assistant))

    def paper_ppl(self, t: int, lam: float, forced: bool) -> float:
        """The authors' 'PPL': exp(CE + lambda * mean soft gate); all-open methods count their gates as 1."""
        soft = 1.0 if forced else float(self.soft[self.sel(t)].mean())
        return math.exp(self.ce(t) + lam * soft)

    def flops_reduction(self, cfg, t: int, whole_model: bool = True) -> float:
        """% of forward FLOPs saved vs every block running: at real lengths with lm_head and routers
        (whole_model), or the paper's blocks-only formula at T = 512."""
        m = self.sel(t)
        if not whole_model:
            return 100.0 * (1 - sum(paper_flops(cfg, 512, k) for k in self.layers_run[m]) /
                            (m.sum() * paper_flops(cfg, 512)))
        run = sum(sequence_flops(cfg, int(T), int(k)) for T, k in zip(self.n_tokens[m], self.layers_run[m]))
        full = sum(sequence_flops(cfg, int(T), cfg.num_hidden_layers, routers=False) for T in self.n_tokens[m])
        return 100.0 * (1 - run / full)


@torch.no_grad()
def run_pass(route, split: TokenSplit, pad_id: int, mode: str = "gated", gates: np.ndarray | None = None,
             batch_size: int = 8, device="cpu", autocast=contextlib.nullcontext, chunk: int = 1024,
             route_on: str = "prompt", pad_to: int | None = None) -> PassResult:
    """Evaluate every sample of `split` under one method (see module docstring); real skipping throughout.

    pad_to pads every batch to a fixed length (right padding): for the authors' forward (pool='all'), whose
    routers see the padding, so that no row's gates depend on its batch-mates' lengths."""
    if mode not in ("base", "full", "gated"):
        raise ValueError(f"mode {mode!r}")
    route.eval()
    L = route.config.num_hidden_layers
    ce_sum, counted, soft, hard, a_sum, a_counted = [], [], [], [], [], []
    for a in range(0, len(split), batch_size):
        idx = list(range(a, min(len(split), a + batch_size)))
        batch = {k: v.to(device) for k, v in collate(split, idx, pad_id, pad_to, route_on=route_on).items()}
        if mode in ("base", "full"):
            forced = torch.ones(L, dtype=torch.bool)
        else:
            forced = None if gates is None else torch.as_tensor(gates[idx])
        lora = lora_disabled(route.base) if mode == "base" else contextlib.nullcontext()
        with lora, route.forcing(forced), autocast():
            h = route.hidden(batch["input_ids"], batch["attention_mask"], route_mask=batch.get("route_mask"))
            s, c = lm_loss_per_sample(h, route.lm_head.weight, batch["labels"], chunk)
            if "assistant_labels" in batch:
                sa, ca = lm_loss_per_sample(h, route.lm_head.weight, batch["assistant_labels"], chunk)
                a_sum.append(sa.cpu().numpy())
                a_counted.append(ca.cpu().numpy())
        ce_sum.append(s.cpu().numpy())
        counted.append(c.cpu().numpy())
        soft.append(route.last.soft.float().cpu().numpy())
        hard.append(route.last.hard.cpu().numpy())
    return PassResult(np.asarray(split.step_type, dtype=np.int64), split.lengths(), np.concatenate(ce_sum),
                      np.concatenate(counted), np.concatenate(soft), np.concatenate(hard).astype(bool),
                      np.concatenate(a_sum) if a_sum else None, np.concatenate(a_counted) if a_counted else None)


def static_mask(gated: PassResult) -> np.ndarray:
    """(L,) mask closing the k most-skipped layers, k = the learned routing's mean skipped layers (rounded)."""
    L = gated.hard.shape[1]
    k = int(round(L - gated.layers_run.mean()))
    rate = 1 - gated.hard.mean(0)  # skip rate per layer
    closed = np.argsort(-rate, kind="stable")[:k]
    mask = np.ones(L, dtype=bool)
    mask[closed] = False
    return mask


def random_masks(gated: PassResult, seed: int = 0) -> np.ndarray:
    """(N, L): each sample skips k_t random layers, k_t = its step type's mean skipped layers (rounded)."""
    rng = np.random.default_rng(seed)
    N, L = gated.hard.shape
    out = np.ones((N, L), dtype=bool)
    for t in np.unique(gated.step_type):
        k = int(round(L - gated.layers_run[gated.sel(t)].mean()))
        for i in np.flatnonzero(gated.sel(t)):
            out[i, rng.choice(L, size=k, replace=False)] = False
    return out


def bootstrap_ci(values, n: int = 10_000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean."""
    v = np.asarray(values, dtype=float)
    if v.size < 2:
        return float("nan"), float("nan")
    means = np.random.default_rng(seed).choice(v, size=(n, v.size), replace=True).mean(1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def t_quantile(q: float, df: int) -> float:
    """Quantile of Student's t with df degrees of freedom (0.5 < q < 1): the CDF integrated from the density
    with Simpson's rule, inverted by bisection (no scipy). Matches tables to 1e-6 for df >= 1."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf_above_half(x: float) -> float:  # P(0 < T < x)
        n = 2000
        t = np.linspace(0.0, x, n + 1)
        f = np.exp(log_c - (df + 1) / 2 * np.log1p(t * t / df))
        return float((x / n / 3) * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum()))
    lo, hi = 0.0, 1.0
    while cdf_above_half(hi) < q - 0.5:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf_above_half(mid) < q - 0.5 else (lo, mid)
    return (lo + hi) / 2


def t_ci(values, level: float = 0.95) -> tuple[float, float]:
    """mean +- t_(n-1) sd / sqrt(n): the CI of a mean over a few seeds (a bootstrap is too narrow for small n)."""
    v = np.asarray(values, dtype=float)
    if v.size < 2:
        return float("nan"), float("nan")
    half = t_quantile(1 - (1 - level) / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)
    return float(v.mean() - half), float(v.mean() + half)


def differential_stats(result: PassResult, n: int = 10_000, seed: int = 0, level: float = 0.95) -> dict:
    """Tool-minus-planning skip% of one run: a stratified percentile-bootstrap CI (tool and planning samples
    resampled separately) and a two-sided permutation test of 'step type does not matter' (labels shuffled)."""
    skip, tool = result.skip_per_sample, result.step_type == 0
    a, b = skip[tool], skip[~tool]
    if a.size < 2 or b.size < 2:
        return {"diff": float("nan"), "ci95": [float("nan"), float("nan")], "p_permutation": float("nan"), "n": n}
    diff = float(a.mean() - b.mean())
    rng = np.random.default_rng(seed)
    boot = rng.choice(a, (n, a.size)).mean(1) - rng.choice(b, (n, b.size)).mean(1)
    q = (1 - level) / 2
    perm = np.argsort(rng.random((n, skip.size)), axis=1)  # n label shuffles
    shuffled = skip[perm]
    perm_diff = shuffled[:, :a.size].mean(1) - shuffled[:, a.size:].mean(1)
    p = (1 + int((np.abs(perm_diff) >= abs(diff) - 1e-12).sum())) / (n + 1)
    return {"diff": diff, "ci95": [float(np.quantile(boot, q)), float(np.quantile(boot, 1 - q))], "p_permutation": p,
            "n_tool": int(a.size), "n_planning": int(b.size), "n": n}


def length_regression(n_tokens, is_tool, score) -> dict:
    """OLS of a per-sample gate score on length (per 100 tokens) and step type, with the correlations."""
    x_len = np.asarray(n_tokens, float) / 100.0
    x_tool = np.asarray(is_tool, float)
    y = np.asarray(score, float)
    X = np.column_stack([np.ones_like(x_len), x_len, x_tool])
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ coef
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - float((resid ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")

    def corr(a, b):
        return float(np.corrcoef(a, b)[0, 1]) if np.std(a) > 0 and np.std(b) > 0 else float("nan")
    return {"intercept": float(coef[0]), "per_100_tokens": float(coef[1]), "tool": float(coef[2]), "r2": r2,
            "r_length_score": corr(x_len, y), "r_tool_score": corr(x_tool, y), "r_length_tool": corr(x_len, x_tool)}
