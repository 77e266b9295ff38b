"""Reading what data_prep built: memory-mapped token arrays, padded batches with labels, a pure sampler.

A split folder holds ids.npy (flat uint32), loss_mask.npy (flat uint8), offsets.npy (n + 1), step_type.npy
(0 = tool_call, 1 = planning), prompt_len.npy and samples.jsonl. `batch_indices(step)` is a pure function
of (seed, step), so a resumed run sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

TOOL, PLANNING = 0, 1


def read_manifest(data_dir) -> dict:
    path = Path(data_dir) / "manifest.json"
    if not Path(data_dir).is_dir():
        raise FileNotFoundError(f"{data_dir}: data directory not found; build it with `python -m data_prep --out "
                                f"{data_dir}` (or use --demo)")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no manifest.json; {data_dir} was not built by data_prep")
    return json.loads(path.read_text())


def manifest_hash(data_dir) -> str:
    return hashlib.sha256((Path(data_dir) / "manifest.json").read_bytes()).hexdigest()


class TokenSplit:
    """One split, memory-mapped: len(), and `get(i)` -> (ids, loss_mask) numpy arrays."""

    def __init__(self, data_dir, name: str):
        d = Path(data_dir) / name
        if not (d / "ids.npy").exists():
            raise FileNotFoundError(f"{d}: split '{name}' not found in {data_dir}")
        self.dir, self.name = d, name
        self.ids = np.load(d / "ids.npy", mmap_mode="r")
        self.loss_mask = np.load(d / "loss_mask.npy", mmap_mode="r")
        self.offsets = np.load(d / "offsets.npy")
        self.step_type = np.load(d / "step_type.npy")
        self.prompt_len = np.load(d / "prompt_len.npy")
        self._rows = None

    def __len__(self):
        return len(self.step_type)

    def get(self, i: int):
        a, b = self.offsets[i], self.offsets[i + 1]
        return np.asarray(self.ids[a:b], dtype=np.int64), np.asarray(self.loss_mask[a:b])

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def rows(self) -> list[dict]:
        """samples.jsonl, one dict per sample (source, row, hash, step_type, and messages for eval splits)."""
        if self._rows is None:
            with open(self.dir / "samples.jsonl", encoding="utf-8") as f:
                self._rows = [json.loads(line) for line in f]
        return self._rows


def collate(split: TokenSplit, indices, pad_id: int, pad_to: int | None = None, side: str = "right",
            prompt_only: bool = False) -> dict:
    """Padded batch: input_ids, attention_mask (1 = real), labels (-100 = not counted), is_tool (B,).

    Labels are unshifted (HF convention); the loss shifts them. Padding never counts. pad_to None pads
    to the longest sequence of the batch; prompt_only keeps each sample's generation prompt only.
    """
    seqs = []
    for i in indices:
        ids, mask = split.get(int(i))
        if prompt_only:
            ids, mask = ids[: split.prompt_len[i]], mask[: split.prompt_len[i]]
        seqs.append((ids, mask))
    T = max(len(s[0]) for s in seqs) if pad_to is None else pad_to
    B = len(seqs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for b, (ids, mask) in enumerate(seqs):
        if len(ids) > T:
            raise ValueError(f"sample of {len(ids)} tokens does not fit pad_to={T}")
        sl = slice(0, len(ids)) if side == "right" else slice(T - len(ids), T)
        input_ids[b, sl] = torch.from_numpy(ids)
        attn[b, sl] = 1
        labels[b, sl] = torch.where(torch.from_numpy(mask.astype(bool)), torch.from_numpy(ids), -100)
    is_tool = torch.tensor([split.step_type[int(i)] == TOOL for i in indices])
    return {"input_ids": input_ids, "attention_mask": attn, "labels": labels, "is_tool": is_tool}


def batch_indices(n: int, batch_size: int, micro_step: int, seed: int) -> np.ndarray:
    """Indices of micro-batch `micro_step`: epochs are seeded permutations, batches cut from their concatenation."""
    pos = micro_step * batch_size + np.arange(batch_size)
    epochs, within = pos // n, pos % n
    out = np.empty(batch_size, dtype=np.int64)
    for e in np.unique(epochs):
        perm = np.random.default_rng([seed, int(e)]).permutation(n)
        out[epochs == e] = perm[within[epochs == e]]
    return out


def update_batches(split: TokenSplit, update: int, batch_size: int, accum: int, seed: int,
                   sort_by_length: bool = True) -> list[np.ndarray]:
    """The `accum` micro-batches of optimizer update `update`: its batch_size x accum sequences (a pure function
    of seed and update), sorted by length before they are cut into micro-batches when sort_by_length, so
    that sequences of similar length are padded together. The update sees the same sequences either way."""
    idx = batch_indices(len(split), batch_size * accum, update, seed)
    if sort_by_length:
        idx = idx[np.argsort(split.lengths()[idx], kind="stable")]
    return [idx[m * batch_size:(m + 1) * batch_size] for m in range(accum)]
