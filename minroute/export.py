"""Export a run for the ecosystem: its LoRA as a PEFT adapter, its routers as safetensors with a
JSON note.

    python -m minroute.export RUN_DIR --out DIR [--which latest|best]
    python -m minroute.export RUN_DIR/ckpt-000120 --out DIR

DIR gets:
- adapter_config.json + adapter_model.safetensors: the run's LoRA, which
  `peft.PeftModel.from_pretrained(base, DIR)` loads onto the model the run trained on
  (`base_model_name_or_path`: the --model it was given, a Hub id or a local folder). PEFT has no
  routers, so that model runs every block: it equals minroute's LayerRoute with every gate open
  (tests/test_export.py).
- routers.safetensors + routers.json: the routers, `routers.{i}.weight` (1, d) and
  `routers.{i}.bias` (1,) for block i, and how they are used (what they pool, the gate rule), which
  no other library implements.

A folder DIR that exists is refused unless it is empty; the export is written beside it and renamed
into place.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from minroute.run.checkpoint import load_layerroute, publish_folder, resolve_checkpoint
from minroute.run.peft import save_peft_adapter
from minroute.run.safety import ArgumentParser, UserError, os_cause, run_cli


def router_note(route, meta: dict, ckpt: Path) -> dict:
    args = meta["args"]
    cfg = route.config
    return {
        "format": "minroute LayerRoute routers",
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "tensors": (
            "routers.{i}.weight (1, hidden_size) and routers.{i}.bias (1,), fp32, for block i ="
            " 0..L-1"
        ),
        "gate": (
            "p_i = sigmoid(w_i . m_i + b_i); block i runs for a sequence iff p_i > 0.5 (else h"
            " passes through)"
        ),
        "pooled": (
            "m_i = mean of the hidden state entering block i over "
            + (
                "the prompt's real tokens (the context before the response), decided once at"
                " prefill"
                if args.get("route_on", "sequence") == "prompt" and args.get("pool") != "all"
                else "every position of the sequence"
                + (", padding included" if args.get("pool") == "all" else "")
            )
        ),
        "pool": args.get("pool"),
        "route_on": args.get("route_on", "sequence"),
        "base_model": args["model"],
        "model_revision": meta.get("model_revision"),
        "checkpoint_step": meta.get("step"),
        "checkpoint": ckpt.name,
        "peft_note": (
            "the PEFT adapter alone is the LoRA model with every block open: PEFT has no routers"
        ),
    }


def export(run, out, which: str = "latest") -> Path:
    """Write the export of a run folder (its `which` checkpoint) or of a ckpt-* folder to `out`.
    Returns out."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(
            f"--out {out}: exists and is not an empty folder; give a new folder for the export"
        )
    ckpt = resolve_checkpoint(run, which)
    route, meta = load_layerroute(ckpt, which)
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=parent))
    except OSError as e:
        raise UserError(
            f"--out {out}: cannot write beside it in {parent} ({os_cause(e)}); give another --out"
        ) from None
    try:
        save_peft_adapter(route.base, tmp, base_model=meta["args"]["model"])
        routers = {
            k: v.detach().cpu().contiguous()
            for k, v in route.state_dict().items()
            if k.startswith("routers.")
        }
        save_file(routers, str(tmp / "routers.safetensors"), metadata={"format": "pt"})
        (tmp / "routers.json").write_text(json.dumps(router_note(route, meta, ckpt), indent=2))
        if out.exists():
            out.rmdir()  # empty, checked above
        publish_folder(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(
            f"--out {out}: cannot write the export ({os_cause(e)}); free space or give another"
            " --out"
        ) from None
    return out


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m minroute.export", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "run",
        help="a train.py run folder (its latest checkpoint, or --which best) or a ckpt-* folder",
    )
    ap.add_argument("--out", required=True, help="the export folder (new, or empty)")
    ap.add_argument(
        "--which",
        choices=["latest", "best"],
        default="latest",
        help="which checkpoint of a run folder",
    )
    a = ap.parse_args(argv)
    out = export(a.run, a.out, a.which)
    print(
        f"wrote {out}: adapter_config.json, adapter_model.safetensors (PEFT: every block open),"
        " routers.safetensors, routers.json"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
