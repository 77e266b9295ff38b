"""data_prep: exact parses of raw-format fixtures, counted malformed records, splits, eval
disjointness."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_prep import glaive, gsm8k, hermes, turing
from data_prep.__main__ import main as cli
from data_prep.build import build
from data_prep.records import Malformed, read_json_records
from minroute.run.safety import UserError, run_cli, sha256_file

FIX = Path(__file__).parent / "fixtures"
ALL = {"hermes": None, "glaive": None, "gsm8k": None, "turing": None}


def records(rel):
    p = FIX / rel
    return gsm8k.read_parquet(p, "t") if p.suffix == ".parquet" else read_json_records(p, "t")


def parse_all(rel, parse):
    """Every record of a fixture file: (samples, malformed counts by reason)."""
    ok, bad = [], {}
    for i, rec in enumerate(records(rel)):
        try:
            if isinstance(rec, Malformed):
                raise rec
            ok.append(parse(rec, i))
        except Malformed as e:
            bad[e.reason] = bad.get(e.reason, 0) + 1
    return ok, bad


def test_hermes_parses_repr_tools_and_calls():
    ok, bad = parse_all("hermes-function-calling-v1/func-calling-singleturn.json", hermes.to_sample)
    assert bad == {"bad_tool_call": 1, "missing_field": 1, "empty_conversation": 1, "wrong_type": 1}
    assert [s.row for s in ok] == [0, 1, 6]
    s0 = ok[0]
    assert [t["function"]["name"] for t in s0.tools] == ["get_weather", "get_stock_price"]
    assert s0.tools[1]["function"]["parameters"]["required"] is None  # Python None from the repr
    assert s0.messages == [
        {"role": "user", "content": "Is it warm in Lyon?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"name": "get_weather", "arguments": {"city": "Lyon", "metric": True}}],
        },
    ]
    assert s0.step_type == "tool_call" and s0.meta["category"] == "Weather"
    assert ok[1].messages[1]["tool_calls"] == [
        {"name": "get_stock_price", "arguments": {"symbol": "AAPL"}},
        {"name": "get_stock_price", "arguments": {"symbol": "MSFT"}},
    ]


def test_hermes_heldout_prefix_and_tool_turns():
    s = hermes.to_sample(records("hermes-function-calling-v1/func-calling.json")[0], 0)
    assert [m["role"] for m in s.messages] == ["user", "assistant", "tool", "assistant"]
    assert s.messages[2]["content"] == "{'name': 'get_weather', 'content': {'temp': 14}}"
    p = hermes.first_call_prefix(s)
    assert [m["role"] for m in p.messages] == ["user", "assistant"]
    with pytest.raises(Malformed, match="no_tool_call"):
        hermes.first_call_prefix(
            hermes.to_sample(records("hermes-function-calling-v1/func-calling.json")[2], 2)
        )


def test_glaive_functions_calls_and_endoftext():
    ok, bad = parse_all(
        "glaive-function-calling-v2/glaive-function-calling-v2.json", glaive.to_sample
    )
    assert bad == {"missing_field": 1, "bad_tool_call": 1}
    assert [s.row for s in ok] == [0, 1, 2, 5]
    s0 = ok[0]
    assert [t["function"]["name"] for t in s0.tools] == ["calculate_tip", "book_table"]
    assert s0.tools[0]["type"] == "function"
    assert s0.messages == [
        {"role": "user", "content": "Tip on a $50 bill at 20%?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"name": "calculate_tip", "arguments": {"bill": 50, "percent": 20}}],
        },
        {"role": "tool", "content": '{"tip": 10}'},
        {"role": "assistant", "content": "The tip is $10."},
    ]
    assert ok[1].tools == [] and ok[1].messages[1] == {
        "role": "assistant",
        "content": "Why did the chicken cross the road?",
    }
    assert ok[2].messages[1]["tool_calls"] == [
        {"name": "book_table", "arguments": {"restaurant": "Luigi's"}}
    ]
    assert not any("<|endoftext|>" in m["content"] for s in ok for m in s.messages)


def test_gsm8k_and_final_answer():
    ok, bad = parse_all("gsm8k/main/train-00000-of-00001.parquet", gsm8k.to_sample)
    assert bad == {"empty_field": 1, "missing_field": 1}
    assert ok[0].messages == [
        {"role": "user", "content": "Tom has 3 apples and buys 2 more. How many?"},
        {"role": "assistant", "content": "3 + 2 = <<3+2=5>>5\n#### 5"},
    ]
    assert ok[0].step_type == "planning" and ok[0].meta["final_answer"] == "5"
    assert ok[2].meta["final_answer"] == "1000"
    test_ok, test_bad = parse_all(
        "gsm8k/main/test-00000-of-00001.parquet",
        lambda r, i: gsm8k.to_sample(r, i, need_final=True),
    )
    assert test_bad == {"no_final_answer": 1} and len(test_ok) == 3


def test_turing_json_lines_with_bad_lines():
    ok, bad = parse_all(
        "Turing-Open-Reasoning/Computational_STEM_QA_Dataset.json", turing.to_sample
    )
    assert bad == {"not_json": 1, "invalid_utf8": 1, "missing_field": 1}
    assert [s.meta["sub_domain"] for s in ok] == ["Calculus", "Optics"]
    assert ok[0].messages == [
        {"role": "user", "content": "Differentiate $x^3$."},
        {"role": "assistant", "content": "$3x^2$"},
    ]


def test_never_eval(monkeypatch):
    import builtins

    monkeypatch.setattr(builtins, "eval", lambda *a, **k: pytest.fail("eval() was called"))
    parse_all("hermes-function-calling-v1/func-calling-singleturn.json", hermes.to_sample)
    parse_all("glaive-function-calling-v2/glaive-function-calling-v2.json", glaive.to_sample)


@pytest.fixture(scope="module")
def tiny_tok(tiny_dir):
    from minroute import load_tokenizer

    return load_tokenizer(tiny_dir).tokenizer


def test_build_accounts_for_every_record(tmp_path, tiny_tok):
    m = build(
        tmp_path / "d",
        tiny_tok,
        "tiny",
        source_dir=FIX,
        counts={**ALL, "glaive": 2},
        eval_counts={"tool": 2, "planning": 2},
        matched_pairs=5,
        log=lambda *a: None,
    )
    src = m["sources"]
    assert set(src) == {"hermes", "glaive", "gsm8k", "turing"}
    for name, s in src.items():
        assert s["read"] == s["used"] + s["malformed"] + s["excluded"] + s["unused"], name
        assert s["malformed"] == sum(s["malformed_by_reason"].values())
        assert s["excluded"] == sum(s["excluded_by_reason"].values())
    assert (src["hermes"]["read"], src["hermes"]["used"], src["hermes"]["malformed"]) == (7, 3, 4)
    assert (src["glaive"]["used"], src["glaive"]["malformed"], src["glaive"]["unused"]) == (2, 0, 4)
    assert src["turing"]["malformed_by_reason"] == {
        "not_json": 1,
        "invalid_utf8": 1,
        "missing_field": 1,
    }
    assert src["glaive"]["no_tool_call"] == 1
    held = m["eval_sources"]["hermes_heldout"]
    assert held["overlap_with_training"] == 1 and held["malformed_by_reason"] == {"no_tool_call": 1}
    assert sorted(held["chosen_rows"]) == [0, 3]
    assert m["eval_sources"]["gsm8k_test"]["chosen_rows"] == [0, 2]
    assert m["splits"]["train"]["n"] + m["splits"]["val"]["n"] == 3 + 2 + 3 + 2
    assert json.loads((tmp_path / "d" / "manifest.json").read_text()) == m


def split_hashes(d, name):
    return [json.loads(line)["hash"] for line in open(d / name / "samples.jsonl")]


def test_splits_deterministic_disjoint_and_eval_held_out(tmp_path, tiny_tok):
    kw = dict(
        source_dir=FIX, counts=ALL, eval_counts={"tool": 2, "planning": 2}, log=lambda *a: None
    )
    a = build(tmp_path / "a", tiny_tok, "tiny", seed=1, **kw)
    b = build(tmp_path / "b", tiny_tok, "tiny", seed=1, **kw)
    c = build(tmp_path / "c", tiny_tok, "tiny", seed=2, **kw)
    for f in ("ids.npy", "offsets.npy", "loss_mask.npy", "step_type.npy"):
        assert np.array_equal(
            np.load(tmp_path / "a" / "train" / f), np.load(tmp_path / "b" / "train" / f)
        )
    assert split_hashes(tmp_path / "a", "train") != split_hashes(tmp_path / "c", "train")
    assert a["splits"] == b["splits"] and a["splits"]["train"]["n"] == c["splits"]["train"]["n"]
    d = tmp_path / "a"
    train, val = set(split_hashes(d, "train")), set(split_hashes(d, "val"))
    ev = set(split_hashes(d, "eval")) | set(split_hashes(d, "eval_matched"))
    assert not train & val and not (train | val) & ev
    assert len(train) + len(val) == a["splits"]["train"]["n"] + a["splits"]["val"]["n"]


def test_arrays_are_consistent_and_mask_follows_loss_on(tmp_path, tiny_tok):
    build(
        tmp_path / "d",
        tiny_tok,
        "tiny",
        source_dir=FIX,
        counts=ALL,
        eval_counts={"tool": 2, "planning": 2},
        loss_on="assistant",
        log=lambda *a: None,
    )
    d = tmp_path / "d" / "eval"
    ids, mask = np.load(d / "ids.npy", mmap_mode="r"), np.load(d / "loss_mask.npy", mmap_mode="r")
    off = np.load(d / "offsets.npy")
    rows = [json.loads(line) for line in open(d / "samples.jsonl")]
    assert off[-1] == len(ids) == len(mask) and len(off) == len(rows) + 1
    for k, r in enumerate(rows):
        text = tiny_tok.decode(
            ids[off[k] : off[k + 1]][mask[off[k] : off[k + 1]].astype(bool)].tolist(),
            skip_special_tokens=False,
        )
        last = r["messages"][-1]
        if last.get("tool_calls"):
            head = (last["content"] + "\n") if last["content"] else ""
            assert text.startswith(head + "<tool_call>\n") and text.endswith(
                "</tool_call><|im_end|>"
            )
        else:
            assert text == last["content"] + "<|im_end|>"


def test_required_count_cannot_be_met(tmp_path, tiny_tok):
    with pytest.raises(
        ValueError,
        match=(
            r"glaive: only 4 usable rows .*\(6 read, 2 malformed.*10 requested.*--counts glaive=4"
        ),
    ):
        build(
            tmp_path / "d",
            tiny_tok,
            "tiny",
            source_dir=FIX,
            counts={**ALL, "glaive": 10},
            eval_counts={"tool": 2, "planning": 2},
            log=lambda *a: None,
        )
    with pytest.raises(ValueError, match=r"hermes_heldout: only 2 held-out rows .* 5 requested"):
        build(
            tmp_path / "d",
            tiny_tok,
            "tiny",
            source_dir=FIX,
            counts=ALL,
            eval_counts={"tool": 5, "planning": 2},
            log=lambda *a: None,
        )


def test_unreadable_or_missing_source(tmp_path, tiny_tok):
    raw = tmp_path / "raw"
    shutil.copytree(FIX, raw)
    (raw / "glaive-function-calling-v2" / "glaive-function-calling-v2.json").write_text(
        "[{not json"
    )
    with pytest.raises(
        ValueError, match=r"glaive: .*glaive-function-calling-v2.json starts like a JSON array"
    ):
        build(tmp_path / "d", tiny_tok, "tiny", source_dir=raw, counts=ALL, log=lambda *a: None)
    (raw / "glaive-function-calling-v2" / "glaive-function-calling-v2.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"glaive: .* not found; --source-dir must hold"):
        build(tmp_path / "d", tiny_tok, "tiny", source_dir=raw, counts=ALL, log=lambda *a: None)


def test_cli_on_fixtures(tmp_path, tiny_dir, capsys):
    rc = cli(
        [
            "--source-dir",
            str(FIX),
            "--out",
            str(tmp_path / "o"),
            "--tokenizer",
            str(tiny_dir),
            "--counts",
            "hermes=all,glaive=3,gsm8k=all,turing=all",
            "--eval-counts",
            "tool=1,planning=1",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    for name in ("hermes", "glaive", "gsm8k", "turing"):
        assert f"[data_prep] {name}" in out
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["sources"]["glaive"]["used"] == 3 and m["tokenizer_sha256"]
    with pytest.raises(SystemExit) as e:
        cli(
            [
                "--source-dir",
                str(FIX),
                "--out",
                str(tmp_path / "q"),
                "--tokenizer",
                str(tiny_dir),
                "--max-len",
                "0",
            ]
        )
    assert (
        e.value.code == 2
        and "--max-len" in capsys.readouterr().err
        and not (tmp_path / "q").exists()
    )
    rc = run_cli(
        cli,
        [
            "--source-dir",
            str(tmp_path / "nowhere"),
            "--out",
            str(tmp_path / "p"),
            "--tokenizer",
            str(tiny_dir),
        ],
    )
    assert rc == 2 and "no such folder" in capsys.readouterr().err and not (tmp_path / "p").exists()


def test_demo_corpus_builds(tmp_path, tiny_tok):
    demo = Path(__file__).parent.parent / "data_prep" / "demo"
    m = build(
        tmp_path / "d",
        tiny_tok,
        "tiny",
        source_dir=demo,
        counts={"hermes": 40, "glaive": 40, "gsm8k": 40},
        eval_counts={"tool": 10, "planning": 10},
        matched_pairs=10,
        log=lambda *a: None,
    )
    assert m["splits"]["eval"]["n"] == 20 and m["splits"]["train"]["n"] > 100
    assert all(s["malformed"] == 0 for s in m["sources"].values())


def test_download_path_uses_pinned_revisions(tmp_path, tiny_tok, monkeypatch):
    """Without --source-dir every raw file comes from hf_hub_download(repo_type='dataset',
    revision=<pinned>)."""
    import huggingface_hub

    calls = []

    def fake_download(repo_id, filename, repo_type=None, revision=None, **kw):
        calls.append((repo_id, filename, repo_type, revision))
        # the layout of the HF cache
        snap = tmp_path / "cache" / "snapshots" / (revision or "f" * 40)
        dst = snap / filename
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            shutil.copy(FIX / repo_id.split("/")[1] / filename, dst)
        return str(dst)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    m = build(
        tmp_path / "d",
        tiny_tok,
        "tiny",
        counts=ALL,
        eval_counts={"tool": 2, "planning": 2},
        log=lambda *a: None,
    )
    assert {c[2] for c in calls} == {"dataset"}
    assert (
        "NousResearch/hermes-function-calling-v1",
        "func-calling-singleturn.json",
        "dataset",
        hermes.REVISION,
    ) in calls
    assert ("openai/gsm8k", "main/test-00000-of-00001.parquet", "dataset", gsm8k.REVISION) in calls
    assert m["sources"]["glaive"]["revision"] == glaive.REVISION
    assert m["sources"]["turing"]["revision"] == "f" * 40, (
        "unpinned: the manifest records the commit downloaded"
    )


def test_model_download_asks_for_the_needed_files_at_the_pinned_revision(
    tmp_path, tiny_dir, monkeypatch
):
    import huggingface_hub

    from minroute.run.load import MODEL_FILES, PINNED_REVISIONS, load_model

    seen = {}

    def fake_snapshot(repo_id, revision=None, allow_patterns=None, **kw):
        seen.update(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns)
        return str(tiny_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    load_model("Qwen/Qwen2.5-0.5B-Instruct")
    assert seen == {
        "repo_id": "Qwen/Qwen2.5-0.5B-Instruct",
        "revision": PINNED_REVISIONS["Qwen/Qwen2.5-0.5B-Instruct"],
        "allow_patterns": MODEL_FILES,
    }


def test_unpinned_model_is_fetched_at_main_and_its_commit_recorded(tmp_path, tiny_dir, monkeypatch):
    """--model HuggingFaceTB/SmolLM2-135M-Instruct: no verified pin, so main; the snapshot's commit
    is recorded."""
    import shutil

    import huggingface_hub

    from minroute.run.load import MODEL_FILES, hub_revision, load_model, load_tokenizer

    snap = (
        tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots" / ("c" * 40)
    )
    shutil.copytree(tiny_dir, snap)
    seen = []

    def fake_snapshot(repo_id, revision=None, allow_patterns=None, **kw):
        seen.append((repo_id, revision, allow_patterns))
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    load_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert seen == [("HuggingFaceTB/SmolLM2-135M-Instruct", None, MODEL_FILES)] * 2
    assert hub_revision(snap) == "c" * 40 and hub_revision(tiny_dir) is None


def test_held_out_rows_are_never_truncated(tmp_path, tiny_tok):
    """A held-out row longer than --max-len is left out and counted; nothing evaluated is cut."""
    lengths = []
    for max_len in (
        4096,
        335,
    ):  # 335: one of the two eligible Hermes held-out rows is longer (tiny tokenizer)
        m = build(
            tmp_path / f"d{max_len}",
            tiny_tok,
            "tiny",
            source_dir=FIX,
            counts=ALL,
            max_len=max_len,
            eval_counts={"tool": 1, "planning": 1},
            matched_pairs=5,
            log=lambda *a: None,
        )
        for name, s in m["eval_sources"].items():
            assert (
                s["read"]
                == s["eligible"]
                + s["malformed"]
                + s["excluded"]
                + s["overlap_with_training"]
                + s["truncated"]
            ), name
        lengths.append(sum(s["truncated"] for s in m["eval_sources"].values()))
        for split in ("eval", "eval_matched"):
            rows = [json.loads(x) for x in open(tmp_path / f"d{max_len}" / split / "samples.jsonl")]
            assert not any(r["truncated"] for r in rows), (
                f"{split} holds a truncated row at max_len {max_len}"
            )
    assert lengths[0] == 0 and lengths[1] > 0, f"the short build should leave rows out: {lengths}"


def test_build_is_atomic_and_never_replaces_silently(tmp_path, tiny_tok, monkeypatch):
    import data_prep.build as b
    from minroute.run.data import read_manifest
    from minroute.run.safety import UserError

    kw = dict(
        source_dir=FIX, counts=ALL, eval_counts={"tool": 1, "planning": 1}, log=lambda *a: None
    )
    out = tmp_path / "d"
    build(out, tiny_tok, "tiny", seed=1, **kw)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match=r"already holds a data folder; pass --overwrite"):
        build(out, tiny_tok, "tiny", seed=2, **kw)
    real = b.write_split

    def crash(out_, name, *a, **k):
        if name == "eval":
            raise OSError("disk full (simulated)")
        return real(out_, name, *a, **k)

    monkeypatch.setattr(b, "write_split", crash)
    with pytest.raises(
        UserError, match=r"writing the data failed \(disk full \(simulated\)\); the previous folder"
    ):
        build(out, tiny_tok, "tiny", seed=2, overwrite=True, **kw)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before, (
        "an interrupted rebuild changed data"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"], "no temporary folder is left behind"
    monkeypatch.setattr(b, "write_split", real)
    m = build(out, tiny_tok, "tiny", seed=2, overwrite=True, **kw)
    assert read_manifest(out, verify=True) == m and m["seed"] == 2
    assert {"train/ids.npy", "eval/assistant_mask.npy", "val/samples.jsonl"} <= set(m["files"])
    ids = out / "train" / "ids.npy"
    ids.write_bytes(ids.read_bytes()[:-4])
    with pytest.raises(UserError, match=rf"{ids}: size or sha256 does not match"):
        read_manifest(out, verify=True)


# ----------------------------------------------------------------------------- GSM8K's own release,
# BFCL v4, mixtures

from data_prep import bfcl  # noqa: E402

BFCL_FIX = FIX / "bfcl-v4"
REAL_DATA = os.environ.get("MINROUTE_DATA")


def release_dir(tmp_path, with_bfcl=True):
    """A --source-dir as the original releases lay it out: gsm8k/{train,test}.jsonl (the fixture
    parquet's rows, with a BOM on one file and U+2028 inside a string), bfcl-v4/ (BFCL's own
    layout)."""
    raw = tmp_path / "release"
    (raw / "gsm8k").mkdir(parents=True)
    for split in ("train", "test"):
        rows = gsm8k.read_parquet(FIX / "gsm8k" / "main" / f"{split}-00000-of-00001.parquet", "t")
        if split == "train":
            rows[0] = {
                **rows[0],
                "answer": rows[0]["answer"].replace("\n", "\u2028\n", 1),
            }  # U+2028 inside a string
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (raw / "gsm8k" / f"{split}.jsonl").write_text(
            ("\ufeff" if split == "test" else "") + text, encoding="utf-8"
        )
    if with_bfcl:
        shutil.copytree(BFCL_FIX, raw / "bfcl-v4")
    return raw


def test_gsm8k_release_jsonl_equals_hub_parquet(tmp_path, tiny_tok):
    raw = release_dir(tmp_path)
    for split in ("train", "test"):
        pq = gsm8k.read_parquet(FIX / "gsm8k" / "main" / f"{split}-00000-of-00001.parquet", "t")
        js = read_json_records(raw / "gsm8k" / f"{split}.jsonl", "t")
        assert len(js) == len(pq) and [r["answer"] for r in js][1:] == [r["answer"] for r in pq][1:]

        def parsed(rows):
            out = []
            for i, r in enumerate(rows):
                try:
                    out.append(gsm8k.to_sample(r, i).messages)
                except Malformed as e:
                    out.append(e.reason)
            return out

        a, b = parsed(pq), parsed(js)
        assert a[1:] == b[1:] and [type(x) for x in a] == [type(x) for x in b]
        if split == "train":
            assert b[0][1]["content"] == a[0][1]["content"].replace("\n", "\u2028\n", 1)
    m = build(
        tmp_path / "d",
        tiny_tok,
        "tiny",
        source_dir=raw,
        sources={"bfcl": 6, "gsm8k": 3},
        eval_counts={"tool": 2, "planning": 2},
        max_len=4096,
        log=lambda *a: None,
    )
    assert (
        m["sources"]["gsm8k"]["file"] == "gsm8k/train.jsonl"
        and m["sources"]["gsm8k"]["repo"] is None
    )
    assert m["sources"]["gsm8k"]["sha256"] == sha256_file(raw / "gsm8k" / "train.jsonl")
    assert m["eval_sources"]["gsm8k_test"]["file"] == "gsm8k/test.jsonl"
    hub = build(
        tmp_path / "h",
        tiny_tok,
        "tiny",
        source_dir=FIX,
        counts=ALL,
        eval_counts={"tool": 1, "planning": 1},
        log=lambda *a: None,
    )
    assert hub["sources"]["gsm8k"]["file"] == "main/train-00000-of-00001.parquet"


def test_bfcl_rows_become_chats_with_json_schema_tools():
    records, facts = bfcl.read(FIX)
    assert facts["files_not_read"] == {
        "BFCL_v4_irrelevance.json": (
            "no possible_answer/BFCL_v4_irrelevance.json (no ground truth: not read)"
        )
    }
    assert sorted(facts["categories"]) == ["live_multiple", "parallel", "simple_python"]
    by_id = {r["id"]: r for r in records if isinstance(r, dict) and not isinstance(r, Malformed)}
    s = bfcl.to_sample(by_id["simple_python_0"], 0)
    assert (
        s.tools[0]["type"] == "function"
        and s.tools[0]["function"]["parameters"]["type"] == "object"
    )
    assert s.meta["functions"][0]["parameters"]["type"] == "dict", (
        "the original docs are kept for scoring"
    )
    # ground truth {"base": [10], "height": [5], "unit": ["units", ""]}: first accepted values
    assert s.messages == [
        {"role": "user", "content": by_id["simple_python_0"]["question"][0][0]["content"]},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "name": "calculate_triangle_area",
                    "arguments": {"base": 10, "height": 5, "unit": "units"},
                }
            ],
        },
    ]
    # {"x": [4], "y": [5], "z": ["", 0]}: z's first accepted value is "", so it is left out (not
    # required)
    assert bfcl.to_sample(by_id["simple_python_2"], 2).messages[-1]["tool_calls"][0][
        "arguments"
    ] == {"x": 4, "y": 5}
    assert bfcl.reference_call("f", {"a": ["", 7]}, {"parameters": {"required": ["a"]}}) == {
        "name": "f",
        "arguments": {"a": 7},
    }
    assert len(bfcl.to_sample(by_id["parallel_0"], 0).messages[-1]["tool_calls"]) >= 2
    for rid, reason in (
        ("simple_python_no_answer", "no_ground_truth"),
        ("simple_python_bad_truth", "bad_ground_truth"),
        ("simple_python_two_turns", "multi_turn"),
    ):
        with pytest.raises(Malformed, match=reason):
            bfcl.to_sample(by_id[rid], 0)
    assert sum(isinstance(r, Malformed) for r in records) == 1  # the line that is not JSON


def test_bfcl_reference_answers_pass_bfcl_scoring():
    """Every usable fixture row's rendered reference call is correct by minroute's BFCL scorer."""
    from minroute.evaluation.bfcl import bfcl_correct
    from minroute.run.chat import render

    records, _ = bfcl.read(FIX)
    n = 0
    for i, r in enumerate(records):
        try:
            s = bfcl.to_sample(r, i)
        except Malformed:
            continue
        text = render(s.messages, s.tools).split("<|im_start|>assistant\n")[-1]
        assert bfcl_correct(text, s.meta["ground_truth"], s.meta["functions"]), s.meta["id"]
        n += 1
    assert n == 16


def test_mixture_of_exactly_the_named_sources(tmp_path, tiny_tok):
    raw = release_dir(tmp_path)  # no Hermes, Glaive or Turing file anywhere
    m = build(
        tmp_path / "d",
        tiny_tok,
        "tiny",
        source_dir=raw,
        sources={"bfcl": 8, "gsm8k": None},
        eval_counts={"tool": 3, "planning": 2},
        matched_pairs=5,
        max_len=4096,
        log=lambda *a: None,
    )
    assert set(m["sources"]) == {"bfcl", "gsm8k"} and m["counts"] == {"bfcl": 8, "gsm8k": None}
    b = m["sources"]["bfcl"]
    assert b["read"] == 20 and b["read"] == b["used"] + b["malformed"] + b["excluded"] + b["unused"]
    assert b["used"] == 8 and sum(b["used_by_category"].values()) == 8
    assert b["malformed"] + b["excluded"] <= 4 and set(b["malformed_by_reason"]) | set(
        b["excluded_by_reason"]
    ) <= {"not_json", "no_ground_truth", "bad_ground_truth", "multi_turn"}
    held = m["eval_sources"]["bfcl_heldout"]
    assert "hermes_heldout" not in m["eval_sources"]
    assert held["read"] == b["unused"] + 0 and len(held["chosen_rows"]) == 3
    d = tmp_path / "d"
    rows = {
        s: [json.loads(x) for x in open(d / s / "samples.jsonl")] for s in ("train", "val", "eval")
    }
    trained = {r["row"] for s in ("train", "val") for r in rows[s] if r["source"] == "bfcl"}
    assert trained.isdisjoint(held["chosen_rows"]), (
        "held-out BFCL rows come from rows training did not take"
    )
    prompts = {r["prompt_hash"] for s in ("train", "val") for r in rows[s]}
    assert not prompts & {r["prompt_hash"] for r in rows["eval"]}, (
        "no held-out prompt equal to a training prompt"
    )
    assert all(r["meta"]["ground_truth"] for r in rows["eval"] if r["source"] == "bfcl_heldout")
    with pytest.raises(FileNotFoundError, match="hermes"):  # a source that is named needs its file
        build(
            tmp_path / "e",
            tiny_tok,
            "tiny",
            source_dir=raw,
            sources={"hermes": 2, "gsm8k": 2},
            log=lambda *a: None,
        )
    with pytest.raises(
        UserError, match=r"19 requested. Lower it with --sources / --counts bfcl=16"
    ):
        build(
            tmp_path / "f",
            tiny_tok,
            "tiny",
            source_dir=raw,
            sources={"bfcl": 19, "gsm8k": 2},
            log=lambda *a: None,
        )


def test_cut_rows_are_counted_and_dropped_on_request(tmp_path, tiny_tok):
    from minroute.run.chat import encode_chat

    raw = release_dir(tmp_path)
    records, _ = bfcl.read(raw)
    lengths = []
    for i, r in enumerate(records):
        try:
            s = bfcl.to_sample(r, i)
        except Malformed:
            continue
        lengths.append(len(encode_chat(tiny_tok, s.messages, s.tools, max_len=10**6).ids))
    max_len = int(np.percentile(lengths, 60))  # 40% of the tool rows do not fit
    kw = dict(
        source_dir=raw,
        sources={"bfcl": 9, "gsm8k": 3},
        eval_counts={"tool": 1, "planning": 1},
        max_len=max_len,
        log=lambda *a: None,
    )
    keep = build(tmp_path / "k", tiny_tok, "tiny", cut_rows="keep", **kw)
    drop = build(tmp_path / "d", tiny_tok, "tiny", cut_rows="drop", **kw)
    assert keep["cut_rows"] == "keep" and drop["cut_rows"] == "drop"
    assert keep["sources"]["bfcl"]["response_cut"] > 0, (
        f"the fixture's tool rows all fit {max_len} tokens"
    )
    train = [
        json.loads(x) for s in ("train", "val") for x in open(tmp_path / "d" / s / "samples.jsonl")
    ]
    assert not any(r["response_cut"] for r in train), (
        "--cut-rows drop trained on a row whose response was cut"
    )
    assert (
        drop["sources"]["bfcl"]["excluded_by_reason"]["response_cut"]
        == drop["sources"]["bfcl"]["response_cut"]
    )
    kept = [
        json.loads(x) for s in ("train", "val") for x in open(tmp_path / "k" / s / "samples.jsonl")
    ]
    assert (
        sum(r["response_cut"] for r in kept)
        == keep["sources"]["bfcl"]["response_cut"] + keep["sources"]["gsm8k"]["response_cut"]
    )


def test_multi_turn_rows_end_at_their_routed_response(tmp_path, tiny_tok):
    """Glaive rows go on past their call (function response, final answer): cut, each is routed on
    the prompt before its call, as deployment routes; 'whole' keeps the authors' conversations."""
    kw = dict(
        source_dir=FIX, counts=ALL, eval_counts={"tool": 1, "planning": 1}, log=lambda *a: None
    )
    cut = build(tmp_path / "c", tiny_tok, "tiny", **kw)
    whole = build(tmp_path / "w", tiny_tok, "tiny", multi_turn="whole", **kw)
    assert (
        cut["sources"]["glaive"]["cut_at_first_response"] > 0
        and whole["sources"]["glaive"]["cut_at_first_response"] == 0
    )
    from minroute.run.data import TokenSplit

    for d in ("c", "w"):
        tr = TokenSplit(tmp_path / d, "train")
        for i, r in enumerate(tr.rows):
            if r["source"] != "glaive":
                continue
            ids = tr.get(i)[0]
            text = tiny_tok.decode(ids[tr.prompt_len[i] :].tolist(), skip_special_tokens=False)
            if d == "c":
                assert text.count("<|im_end|>") == 1, (
                    f"row {r['row']} still holds turns after its routed response"
                )
    assert cut["multi_turn"] == "cut" and whole["multi_turn"] == "whole"


def test_length_matched_sets_match_on_what_the_routers_see(tmp_path, tiny_tok):
    demo = Path(__file__).parent.parent / "data_prep" / "demo"
    build(
        tmp_path / "d",
        tiny_tok,
        "tiny",
        source_dir=demo,
        counts={"hermes": 40, "glaive": 40, "gsm8k": 40},
        eval_counts={"tool": 10, "planning": 10},
        matched_pairs=10,
        log=lambda *a: None,
    )
    from minroute.run.data import TokenSplit

    for split, length in (("eval_matched", "prompt"), ("eval_matched_sequence", "row")):
        s = TokenSplit(tmp_path / "d", split)
        n = len(s) // 2
        got = s.prompt_len if length == "prompt" else s.lengths()
        assert n > 0
        for a, b in zip(got[:n], got[n:]):  # tool i is paired with planning i
            assert abs(int(a) - int(b)) <= max(4, 0.05 * max(a, b)), (
                f"{split}: {a} vs {b} {length} tokens"
            )
        for r in s.rows[:n]:
            assert r["messages"][-1].get("tool_calls"), (
                f"{split}: a tool candidate whose routed response is no call"
            )


def test_overwrite_replaces_only_a_data_folder(tmp_path, tiny_tok):
    from minroute.run.safety import UserError

    kw = dict(
        counts=ALL, eval_counts={"tool": 1, "planning": 1}, log=lambda *a: None, overwrite=True
    )
    raw = tmp_path / "raw"
    shutil.copytree(FIX, raw)
    run = tmp_path / "run"
    run.mkdir()
    (run / "latest.json").write_text('{"dir": "ckpt-000004", "step": 4}')
    other = tmp_path / "notes"
    other.mkdir()
    (other / "a.txt").write_text("mine")
    for out, words in (
        (raw, "holds the raw files"),
        (tmp_path, "holds the raw files"),
        (run, "not built by data_prep"),
        (other, "not built by data_prep"),
    ):
        before = sorted(p for p in out.rglob("*"))
        with pytest.raises(UserError, match=words):
            build(out, tiny_tok, "tiny", source_dir=raw, **kw)
        assert sorted(p for p in out.rglob("*")) == before, f"{out} changed"
    d = tmp_path / "data"
    build(d, tiny_tok, "tiny", source_dir=raw, **kw)
    # a run written into a data folder is not replaced either
    shutil.copy(run / "latest.json", d / "latest.json")
    with pytest.raises(UserError, match="holds a train.py run"):
        build(d, tiny_tok, "tiny", source_dir=raw, **kw)


def test_identical_rebuild_keeps_the_data_identity(tmp_path, tiny_tok):
    from minroute.run.data import data_identity, read_manifest

    kw = dict(
        source_dir=FIX, counts=ALL, eval_counts={"tool": 1, "planning": 1}, log=lambda *a: None
    )
    a = build(tmp_path / "a", tiny_tok, "tiny", **kw)
    b = build(tmp_path / "b", tiny_tok, "./tiny", **kw)  # the same tokenizer, spelled differently
    assert data_identity(a) == data_identity(b) == data_identity(read_manifest(tmp_path / "a"))
    c = build(tmp_path / "c", tiny_tok, "tiny", seed=7, **kw)
    assert data_identity(c) != data_identity(a)


def test_a_second_build_into_the_same_out_is_refused(tmp_path, tiny_tok):
    from minroute.run.safety import FileLock, UserError

    with (
        FileLock(tmp_path / ".d.lock", "--out d"),
        pytest.raises(UserError, match="is being written by pid"),
    ):
        build(tmp_path / "d", tiny_tok, "tiny", source_dir=FIX, counts=ALL, log=lambda *a: None)
    assert not (tmp_path / "d").exists()


def test_real_bfcl_and_gsm8k_build(tmp_path, real_tokenizer_path):
    """The real files (MINROUTE_DATA): every record accounted for, GSM8K's release rows, hashes."""
    if not REAL_DATA or not (Path(REAL_DATA) / "bfcl-v4").is_dir():
        pytest.skip("real data not available (set MINROUTE_DATA=path/to/shared/data)")
    from minroute import load_tokenizer

    tok = load_tokenizer(real_tokenizer_path)
    m = build(
        tmp_path / "d",
        tok.tokenizer,
        "qwen",
        source_dir=REAL_DATA,
        sources={"bfcl": 1200, "gsm8k": 1200},
        max_len=1024,
        chat_format=tok.chat,
        log=print,
    )
    b, g = m["sources"]["bfcl"], m["sources"]["gsm8k"]
    assert (
        b["read"] == 2311 and b["read"] == b["used"] + b["malformed"] + b["excluded"] + b["unused"]
    )
    assert set(b["files_not_read"]) == {"BFCL_v4_irrelevance.json", "BFCL_v4_live_irrelevance.json"}
    assert set(b["categories"]) == {
        "simple_python",
        "multiple",
        "parallel",
        "parallel_multiple",
        "live_simple",
        "live_multiple",
    }
    assert g["read"] == 7473 and g["malformed"] == 0 and g["file"] == "gsm8k/train.jsonl"
    assert g["sha256"] == "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"
    t = m["eval_sources"]["gsm8k_test"]
    assert (
        t["read"] == 1319
        and t["sha256"] == "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14"
    )
    assert m["splits"]["eval"]["n"] == 100 and m["splits"]["eval_matched_sequence"]["pairs"] == 50
