#!/usr/bin/env bash
# The whole LayerRoute study in one command: data -> every (seed, variant) run -> each run's evaluation ->
# the across-seed report (REPORT.md, tables/, figures/).
#
#   bash reproduce.sh --out studies/full                       # 10 seeds x 5 variants on the real model and data
#   bash reproduce.sh --demo --out studies/demo                # offline CPU demo: tiny model, 3 seeds, short runs
#   bash reproduce.sh --out studies/s3 --seeds "42 7 999" --variants "paper author" --device cuda
#
# Options: --out DIR (required), --demo, --seeds "S ...", --variants "V ..." (paper author noreg uniform-init bce),
# --device cpu|cuda, --data DIR (default: DIR/data, built by data_prep; the demo uses its bundled corpus),
# --model PATH_OR_ID, --steps N (per run; the presets' 3000 by default), --tasks (also score generations).
# Resumable: a finished run is skipped, an interrupted one resumes from its latest checkpoint, an evaluation
# newer than its checkpoint is kept. A run that fails is reported and left out, the others go on (exit code 1
# at the end). Every command is appended to DIR/commands.log.
set -euo pipefail
cd "$(dirname "$0")"

out="" demo=0 seeds="" variants="paper author noreg uniform-init bce" device="" data="" model="" steps="" tasks=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --demo) demo=1; shift ;;
    --seeds) seeds="$2"; shift 2 ;;
    --variants) variants="$2"; shift 2 ;;
    --device) device="$2"; shift 2 ;;
    --data) data="$2"; shift 2 ;;
    --model) model="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --tasks) tasks=1; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "error: unknown option $1 (see bash reproduce.sh --help)" >&2; exit 2 ;;
  esac
done
[ -n "$out" ] || { echo "error: --out DIR is required (the study folder)" >&2; exit 2; }
for v in $variants; do
  case "$v" in paper|author|noreg|uniform-init|bce) ;;
    *) echo "error: --variants: unknown variant '$v' (paper author noreg uniform-init bce)" >&2; exit 2 ;; esac
done
if [ "$demo" = 1 ]; then
  seeds="${seeds:-1 2 3}"; steps="${steps:-40}"; device="${device:-cpu}"
else
  seeds="${seeds:-2024 42 123 7 100 256 1234 31415 8675309 999}"  # the authors' 10 seeds
fi
for s in $seeds; do
  [[ "$s" =~ ^[0-9]+$ ]] || { echo "error: --seeds: '$s' is not a whole number" >&2; exit 2; }
done
[ -z "$steps" ] || [[ "$steps" =~ ^[1-9][0-9]*$ ]] || { echo "error: --steps: '$steps' is not a number > 0" >&2; exit 2; }
py="${PYTHON:-python}"
mkdir -p "$out/runs"
log="$out/commands.log"

run() {  # run and record a command; stop the study if it fails
  echo "$*" >> "$log"
  "$@"
}

# ---- data
common=()
[ -n "$device" ] && common+=(--device "$device")
if [ "$demo" = 1 ]; then
  common+=(--demo --demo-assets "$out/demo" --log-every 2 --eval-every 10)
else
  data="${data:-$out/data}"
  if [ ! -f "$data/manifest.json" ]; then
    run "$py" -m data_prep --out "$data" ${model:+--tokenizer "$model"}
  fi
  common+=(--data "$data")
  [ -n "$model" ] && common+=(--model "$model")
fi
[ -n "$steps" ] && common+=(--steps "$steps")

variant_args() {
  case "$1" in
    paper) ;;
    author) echo "--preset author" ;;
    noreg) echo "--ablation noreg" ;;
    uniform-init) echo "--ablation uniform-init" ;;
    bce) echo "--ablation bce" ;;
  esac
}

# ---- train and evaluate every (variant, seed)
total=0; for v in $variants; do for s in $seeds; do total=$((total + 1)); done; done
k=0 t0=$(date +%s) timed=0 failed=()
for v in $variants; do
  for s in $seeds; do
    k=$((k + 1))
    dir="$out/runs/$v-s$s"
    t_run=$(date +%s)
    status=done
    # shellcheck disable=SC2046
    if [ -f "$dir/latest.json" ]; then
      run "$py" train.py --resume "$dir" > "$dir.train.log" 2>&1 || status="FAILED in training (see $dir.train.log)"
    else
      restart=(); [ -d "$dir" ] && restart=(--restart)  # killed before its first checkpoint: moved aside, not lost
      run "$py" train.py --out "$dir" --seed "$s" $(variant_args "$v") "${common[@]}" "${restart[@]}" \
        > "$dir.train.log" 2>&1 || status="FAILED in training (see $dir.train.log)"
    fi
    if [ "$status" = done ]; then
      ckpt="$dir/$("$py" -c 'import json,sys; print(json.load(open(sys.argv[1]))["dir"])' "$dir/latest.json")"
      if [ ! -f "$dir/eval.json" ] || [ "$ckpt/meta.json" -nt "$dir/eval.json" ]; then
        ev=(--ckpt "$dir" --json "$dir/eval.json" --csv "$dir/eval")
        [ -n "$device" ] && ev+=(--device "$device")
        [ "$tasks" = 1 ] && ev+=(--tasks)
        [ "$demo" = 1 ] && ev+=(--time-prompts 4 --repeats 2 --max-new-tokens 32)
        [ "$timed" = 1 ] && ev+=(--no-timing)  # the wall-clock table comes from the first run evaluated
        run "$py" eval.py "${ev[@]}" > "$dir.eval.log" 2>&1 || status="FAILED in evaluation (see $dir.eval.log)"
      fi
      timed=1
    fi
    [ "$status" = done ] || failed+=("$v-s$s")
    now=$(date +%s)
    eta=$(( (now - t0) * (total - k) / k ))
    printf '[%d/%d] %-13s seed %-8s %s in %4ds | elapsed %dm%02ds | eta %dm%02ds\n' "$k" "$total" "$v" "$s" \
      "$status" $((now - t_run)) $(((now - t0) / 60)) $(((now - t0) % 60)) $((eta / 60)) $((eta % 60))
  done
done

# ---- the report
run "$py" eval.py --report "$out"
echo "report: $out/REPORT.md"
if [ ${#failed[@]} -gt 0 ]; then  # the report names them as left out; a rerun resumes them
  echo "error: ${#failed[@]} of $total runs failed: ${failed[*]}; the report leaves them out" >&2
  exit 1
fi
