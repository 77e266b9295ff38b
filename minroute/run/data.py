"""Reading what data_prep built: memory-mapped token arrays, padded batches with labels, a pure
sampler.

A split folder holds ids.npy (flat uint32), loss_mask.npy (flat uint8), assistant_mask.npy (flat
uint8: the tokens of assistant outputs), offsets.npy (n + 1), step_type.npy (0 = tool_call, 1 =
planning), prompt_len.npy and samples.jsonl. `manifest.json` records every file's size and sha256;
`read_manifest(verify=True)` checks them and names a file that does not match. `batch_indices(step)`
is a pure function of (seed, step), so a resumed run sees exactly the batches an uninterrupted one
would.

The prompt of a sample (`prompt_len`) is the context before its response: every token up to and
including the header of the *last* assistant turn (system + tools + all earlier turns). For
single-turn rows that is the question; for multi-turn rows (Glaive) the whole conversation before
the final answer, which is what a deployment has in hand when it decides the gates for that answer.
Routing on the prompt pools over it.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

from minroute.fast.kernels import counted_positions
from minroute.run.safety import MissingFile, UserError, verify_files

TOOL, PLANNING = 0, 1


def read_manifest(data_dir, verify: bool = False) -> dict:
    """manifest.json of a data folder; with verify, every split file is checked against its size and
    sha256."""
    path = Path(data_dir) / "manifest.json"
    if not Path(data_dir).is_dir():
        raise MissingFile(
            f"{data_dir}: data directory not found; build it with `python -m data_prep --out "
            f"{data_dir}` (or use --demo)"
        )
    if not path.exists():
        raise MissingFile(
            f"{path}: no manifest.json; {data_dir} was not built by data_prep (or its build was "
            "interrupted); rebuild it"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); rebuild the data folder") from None
    # built before manifests recorded hashes: usable, not verifiable
    if verify and "files" not in manifest:
        print(
            f"note: {path} records no file hashes (built by an older data_prep), so its files"
            " cannot be verified; rebuild it to get them",
            file=sys.stderr,
        )
    elif verify:
        verify_files(data_dir, manifest["files"], f"manifest of {data_dir}")
    return manifest


def check_tokenizer(manifest: dict, data_dir, model_path: str):
    """Refuse data tokenised by another tokenizer than the model's (sha256 of tokenizer.json, as
    data_prep records)."""
    from minroute.run.load import resolve_dir
    from minroute.run.safety import sha256_file

    tok_file = resolve_dir(model_path) / "tokenizer.json"
    if (
        manifest.get("tokenizer_sha256")
        and tok_file.exists()
        and sha256_file(tok_file) != manifest["tokenizer_sha256"]
    ):
        raise UserError(
            f"{data_dir} was tokenised by {manifest['tokenizer']}: built with another tokenizer"
            f" than {model_path}'s tokenizer.json; rebuild the data with `python -m data_prep"
            f" --tokenizer {model_path}`"
        )


def manifest_hash(data_dir) -> str:
    """sha256 of manifest.json's bytes (what runs before data_identity recorded)."""
    return hashlib.sha256((Path(data_dir) / "manifest.json").read_bytes()).hexdigest()


VOLATILE = (
    "build_seconds",
    "tokenizer",
)  # when it was built, and how the tokenizer path was spelled


def data_identity(manifest: dict) -> str:
    """sha256 of what a data folder *is*: its files' hashes and every setting that made them, not
    when it was built; an identical rebuild has the same identity, so the runs trained on it can
    still resume.
    """
    kept = {k: v for k, v in manifest.items() if k not in VOLATILE}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class TokenSplit:
    """One split, memory-mapped: len(), and `get(i)` -> (ids, loss_mask) numpy arrays."""

    def __init__(self, data_dir, name: str):
        d = Path(data_dir) / name
        if not (d / "ids.npy").exists():
            raise MissingFile(f"{d}: split '{name}' not found in {data_dir}")
        self.dir, self.name = d, name
        self.ids = np.load(d / "ids.npy", mmap_mode="r")
        self.loss_mask = np.load(d / "loss_mask.npy", mmap_mode="r")
        self.offsets = np.load(d / "offsets.npy")
        self.step_type = np.load(d / "step_type.npy")
        self.prompt_len = np.load(d / "prompt_len.npy")
        am = d / "assistant_mask.npy"
        self.assistant_mask = np.load(am, mmap_mode="r") if am.exists() else None
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
        """samples.jsonl, one dict per sample (source, row, hash, step_type, and messages for eval
        splits)."""
        if self._rows is None:
            with open(self.dir / "samples.jsonl", encoding="utf-8") as f:
                self._rows = [json.loads(line) for line in f]
        return self._rows


class DataFolder:
    """A data folder built by data_prep, opened and verified once: its manifest (every file's size
    and sha256 checked), identity, splits, and the checks every script needs (tokenizer, same data
    as a run, trained rows).

    Everything downstream takes this object, not the path, so the manifest is read and hashed once.
    """

    def __init__(self, path, verify: bool = True):
        self.path = Path(path)
        self.manifest = read_manifest(self.path, verify=verify)
        self.identity = data_identity(self.manifest)
        self.raw_sha256 = manifest_hash(self.path)
        self._splits: dict[str, TokenSplit] = {}

    def __str__(self):
        return str(self.path)

    def split(self, name: str) -> TokenSplit:
        if name not in self._splits:
            self._splits[name] = TokenSplit(self.path, name)
        return self._splits[name]

    def has_split(self, name: str) -> bool:
        return (self.path / name / "ids.npy").exists()

    def matched_split(self, route_on: str) -> str | None:
        """The length-matched eval split for routers that pool the prompt ('eval_matched', matched
        on prompt length) or the whole row ('eval_matched_sequence'); older folders have only the
        first (whole-row).
        """
        if route_on == "sequence" and self.has_split("eval_matched_sequence"):
            return "eval_matched_sequence"
        return "eval_matched" if self.has_split("eval_matched") else None

    def matched_on(self, split: str) -> str:
        return self.manifest.get("splits", {}).get(split, {}).get("matched_on", "whole-row tokens")

    def check_tokenizer(self, model_path: str):
        check_tokenizer(self.manifest, self.path, model_path)

    def check_token_ids(self, vocab_size: int, model, splits=("train", "val")):
        """Refuse token ids the model has no embedding for (data tokenised by another tokenizer
        whose manifest predates the tokenizer hash): before any forward, not an IndexError in it."""
        for name in splits:
            if not self.has_split(name) or len(self.split(name)) == 0:
                continue
            top = int(self.split(name).ids.max())
            if top >= vocab_size:
                raise UserError(
                    f"{self.path}/{name}: token id {top} is outside the vocabulary of {model}"
                    f" ({vocab_size} ids): the data was tokenised by another tokenizer; rebuild it"
                    f" with `python -m data_prep --tokenizer {model}`"
                )

    def same_as_trained(self, meta: dict) -> bool:
        """Is this the data a run trained on? By content (data_sha256), or for older runs by
        manifest bytes."""
        if meta.get("data_sha256"):
            return meta["data_sha256"] == self.identity
        return meta.get("manifest_sha256") == self.raw_sha256

    def trained_hashes(self) -> tuple[set[str], set[str]]:
        """Content and prompt hashes of the rows a run on this folder can learn from or select on
        (train, val)."""
        rows = [r for split in ("train", "val") for r in self.split(split).rows]
        return {r["hash"] for r in rows}, {r["prompt_hash"] for r in rows if "prompt_hash" in r}


ROUTE_ON = ("prompt", "sequence")


class Batch(dict):
    """collate's batch: a dict of CPU tensors, plus what the host knows about it without reading a
    device: `padded` (does attention_mask hold a 0), `real_tokens` (its 1s) and, for right padding,
    `lengths` (each row's real tokens; the training forward then packs the rows without their
    padding). `{k: v.to(device) ...}` still works.
    """

    padded: bool = True
    real_tokens: int = 0
    lengths: list[int] | None = None

    def to(self, device, non_blocking: bool = False) -> Batch:
        """The same batch on `device` (the host facts kept); on CUDA from pinned memory, without
        blocking."""
        device = torch.device(device)
        if device.type == "cpu":  # collate's tensors are CPU tensors already
            return self
        if non_blocking:
            out = Batch((k, v.pin_memory().to(device, non_blocking=True)) for k, v in self.items())
        else:
            out = Batch((k, v.to(device)) for k, v in self.items())
        out.padded, out.real_tokens, out.lengths = self.padded, self.real_tokens, self.lengths
        return out


def collate(
    split: TokenSplit,
    indices,
    pad_id: int,
    pad_to: int | None = None,
    side: str = "right",
    prompt_only: bool = False,
    route_on: str = "sequence",
) -> dict:
    """Padded batch: input_ids, attention_mask (1 = real), labels (-100 = not counted), is_tool
    (B,); route_mask (1 = pooled by the routers) when route_on is 'prompt'; assistant_labels (labels
    of the assistant-output tokens only) when the split records them; loss_index, loss_target (the
    counted positions of `labels` and their next tokens, fast.kernels.counted_positions, computed
    here on the host). A `Batch`: the host also knows `.padded` and `.real_tokens`, so the training
    step never reads them back from a device.

    Labels are unshifted (HF convention); the loss shifts them. Padding never counts. pad_to None
    pads to the longest sequence of the batch; prompt_only keeps each sample's generation prompt
    only.
    """
    if route_on not in ROUTE_ON:
        raise ValueError(f"route_on {route_on!r}: expected one of {ROUTE_ON}")
    seqs = []
    for i in indices:
        ids, mask = split.get(int(i))
        a, b = split.offsets[int(i)], split.offsets[int(i) + 1]
        amask = None if split.assistant_mask is None else np.asarray(split.assistant_mask[a:b])
        n = len(ids) if not prompt_only else int(split.prompt_len[i])
        seqs.append(
            (ids[:n], mask[:n], None if amask is None else amask[:n], int(split.prompt_len[i]))
        )
    T = max(len(s[0]) for s in seqs) if pad_to is None else pad_to
    B = len(seqs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    route = torch.zeros((B, T), dtype=torch.long)
    a_labels = (
        torch.full((B, T), -100, dtype=torch.long) if split.assistant_mask is not None else None
    )
    for b, (ids, mask, amask, plen) in enumerate(seqs):
        if len(ids) > T:
            raise UserError(
                f"{split.dir}: a sample of {len(ids)} tokens does not fit a batch padded to {T}"
            )
        start = 0 if side == "right" else T - len(ids)
        sl = slice(start, start + len(ids))
        tokens = torch.from_numpy(ids)
        input_ids[b, sl] = tokens
        attn[b, sl] = 1
        route[b, start : start + min(plen, len(ids))] = 1
        labels[b, sl] = torch.where(torch.from_numpy(mask.astype(bool)), tokens, -100)
        if a_labels is not None:
            a_labels[b, sl] = torch.where(torch.from_numpy(amask.astype(bool)), tokens, -100)
    is_tool = torch.tensor([split.step_type[int(i)] == TOOL for i in indices])
    loss_index, loss_target = counted_positions(labels)
    out = Batch(
        input_ids=input_ids,
        attention_mask=attn,
        labels=labels,
        is_tool=is_tool,
        loss_index=loss_index,
        loss_target=loss_target,
    )
    out.real_tokens = sum(len(s[0]) for s in seqs)
    out.padded = out.real_tokens < B * T
    out.lengths = [len(s[0]) for s in seqs] if side == "right" else None
    if route_on == "prompt":
        out["route_mask"] = route
    if a_labels is not None:
        out["assistant_labels"] = a_labels
    return out


def counted_tokens(split: TokenSplit, indices) -> int:
    """Tokens the LM loss counts in these samples: positions t >= 1 whose loss mask is 1 (t predicts
    from t-1)."""
    total = 0
    for i in indices:
        a, b = split.offsets[int(i)], split.offsets[int(i) + 1]
        total += int(np.asarray(split.loss_mask[a + 1 : b]).sum())
    return total


def batch_indices(n: int, batch_size: int, micro_step: int, seed: int) -> np.ndarray:
    """Indices of micro-batch `micro_step`: epochs are seeded permutations, batches cut from their
    concatenation."""
    pos = micro_step * batch_size + np.arange(batch_size)
    epochs, within = pos // n, pos % n
    out = np.empty(batch_size, dtype=np.int64)
    for e in np.unique(epochs):
        perm = np.random.default_rng([seed, int(e)]).permutation(n)
        out[epochs == e] = perm[within[epochs == e]]
    return out


def update_batches(
    split: TokenSplit,
    update: int,
    batch_size: int,
    accum: int,
    seed: int,
    sort_by_length: bool = True,
) -> list[np.ndarray]:
    """The `accum` micro-batches of optimizer update `update`: its batch_size x accum sequences (a
    pure function of seed and update), sorted by length before they are cut into micro-batches when
    sort_by_length, so that sequences of similar length are padded together. The update sees the
    same sequences either way.
    """
    idx = batch_indices(len(split), batch_size * accum, update, seed)
    if sort_by_length:
        idx = idx[np.argsort(split.lengths()[idx], kind="stable")]
    return [idx[m * batch_size : (m + 1) * batch_size] for m in range(accum)]
