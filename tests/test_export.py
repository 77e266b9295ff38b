"""python -m minroute.export: a run's LoRA as a PEFT adapter that transformers + PEFT load onto the
run's own base model with minroute's logits (every gate open), its routers as safetensors + JSON;
bad input is one error line.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minroute.export import main
from minroute.run.checkpoint import load_layerroute

ROOT = Path(__file__).resolve().parent.parent


def test_export_round_trip_through_peft(tmp_path, demo_run):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "export"
    assert main([str(demo_run), "--out", str(out)]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    route, meta = load_layerroute(demo_run)
    assert cfg["base_model_name_or_path"] == meta["args"]["model"] == str(demo_run / "demo-model")
    note = json.loads((out / "routers.json").read_text())
    routers = load_file(str(out / "routers.safetensors"))
    L = route.config.num_hidden_layers
    assert note["layers"] == L and sorted(routers) == sorted(
        f"routers.{i}.{k}" for i in range(L) for k in ("weight", "bias")
    )
    assert all(
        torch.equal(routers[f"routers.{i}.bias"], route.routers[i].bias.detach()) for i in range(L)
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        cfg["base_model_name_or_path"], dtype=torch.float32, attn_implementation="sdpa"
    )
    peft_model = peft.PeftModel.from_pretrained(hf, out).eval()
    ids = torch.randint(
        0, route.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad(), route.forcing(torch.ones(L, dtype=torch.bool)):
        ours = route(ids)
        theirs = peft_model(input_ids=ids).logits.float()
    diff = (ours - theirs).abs().max().item()
    print(
        "export round trip: max |dlogit| minroute (all gates open) vs transformers + PEFT ="
        f" {diff:.3g}"
    )
    assert diff <= 1e-5, f"exported adapter: max |dlogit| = {diff:.3g}"
    lora_b = [
        k for k in load_file(str(out / "adapter_model.safetensors")) if k.endswith("lora_B.weight")
    ]
    assert lora_b, "the adapter holds the LoRA B matrices"


def test_export_refuses_bad_input_in_one_line(tmp_path, demo_run):
    cases = [
        ([str(tmp_path / "nowhere"), "--out", str(tmp_path / "e1")], "no such folder"),
        ([str(demo_run), "--out", str(demo_run)], "not an empty folder"),
        ([str(demo_run), "--out", str(demo_run / "train_log.csv")], "not an empty folder"),
    ]
    for argv, expect in cases:
        r = subprocess.run(
            [sys.executable, "-m", "minroute.export", *argv],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], r.stderr
    assert not (tmp_path / "e1").exists()
