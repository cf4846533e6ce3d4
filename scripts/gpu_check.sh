#!/usr/bin/env bash
# One prepared check for a machine with one CUDA GPU (issue 17); prints one table, exits non-zero
# when a step fails. Four steps:
#   norm       rescalelab-bench --rows norm on cuda (fp32 and bf16 rows: small_cnn, resnet20,
#              AlexNet 64 and 224 px; none / bn / whitening with statistics every step)
#   train_gpu  a 2-epoch CLI run, trainer=gpu, data=synthetic (CIFAR-shaped)
#   train_ddp  the same with trainer=ddp trainer.devices=1
#   framework  rescalelab-bench --rows framework on cuda (framework vs bare loop, MLflow cost)
# About 3-4 minutes on an H200 (each step is cut at RESCALELAB_GPU_CHECK_STEP_TIMEOUT s: 200 on
# the GPU, 600 in the dry run, where a loaded CPU runs a 2-process CLI start in minutes).
#
#   scripts/gpu_check.sh             # on the GPU machine
#   scripts/gpu_check.sh --dry-run   # the same steps on the CPU at --quick sizes, trainer=cpu and
#                                    # ddp_cpu devices=1 (also RESCALELAB_GPU_CHECK_DRY_RUN=1)
# RESCALELAB_GPU_CHECK_STEPS="norm train_gpu" runs a subset; RESCALELAB_GPU_CHECK_TRAIN_ARGS adds
# overrides to both CLI runs; PYTHON picks the interpreter (default: python).
set -u
dry=${RESCALELAB_GPU_CHECK_DRY_RUN:-0}
[[ "${1:-}" == "--dry-run" ]] && dry=1
py=${PYTHON:-python}
steps=${RESCALELAB_GPU_CHECK_STEPS:-norm train_gpu train_ddp framework}
read -r -a extra <<< "${RESCALELAB_GPU_CHECK_TRAIN_ARGS:-}"
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$work"' EXIT

limit=${RESCALELAB_GPU_CHECK_STEP_TIMEOUT:-$([[ "$dry" == 1 ]] && echo 600 || echo 200)}
if [[ "$dry" == 1 ]]; then
  device=cpu; quick=(--quick); gpu=trainer=cpu; ddp=(trainer=ddp_cpu trainer.devices=1)
  sizes=(data.num_train=512 data.num_val=128 data.batch_size=64)
else
  device=cuda; quick=(); gpu=trainer=gpu; ddp=(trainer=ddp trainer.devices=1)
  sizes=()
  if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device (use --dry-run on a CPU)" >&2
    exit 2
  fi
fi
train=(-m rescalelab.train data=synthetic trainer.max_epochs=2 trainer.enable_progress_bar=false
       "${sizes[@]}")

declare -a rows=()
failed=0

# run_step NAME JSON|- COMMAND...: runs COMMAND under the step limit, logs to $work/NAME.log and
# adds table lines (one per benchmark row when JSON names the report it writes).
run_step() {
  local name=$1 json=$2; shift 2
  local t0 rc detail
  t0=$(date +%s.%N)
  timeout "$limit" "$@" > "$work/$name.log" 2>&1
  rc=$?
  local secs
  secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }')
  if [[ $rc -ne 0 ]]; then
    failed=1
    detail="rc $rc: $(tail -n 3 "$work/$name.log" | tr '\n|' '  ' | cut -c1-160)"
    rows+=("| $name | FAIL | $secs | $detail |")
    return
  fi
  if [[ "$json" == - ]]; then
    rows+=("| $name | ok | $secs | $(grep -E -o 'rescalelab-[a-z0-9-]*|run [0-9a-f]{32}' \
      "$work/$name.log" | tail -n 1) |")
    return
  fi
  rows+=("| $name | ok | $secs | |")
  while IFS= read -r line; do rows+=("$line"); done < <("$py" - "$json" <<'EOF'
import json, sys

for r in json.load(open(sys.argv[1]))["rows"]:
    ratios = ", ".join(f"{k}/{r['base']} {q[1]:.3f}" for k, q in r["ratios"].items())
    notes = "; ".join(r["notes"])
    holds = {None: "", True: "target holds", False: "target MISSED"}[r["holds"]]
    print(f"| | | | {r['row']}: {ratios}{'; ' + notes if notes else ''} {holds} |")
EOF
  )
}

for step in $steps; do
  case $step in
    norm) run_step norm "$work/norm.json" "$py" -m rescalelab.bench --device "$device" \
            "${quick[@]}" --rows norm --json "$work/norm.json" ;;
    train_gpu) run_step train_gpu - "$py" "${train[@]}" "$gpu" "${extra[@]}" \
                 "paths.root=$work/train_gpu" ;;
    train_ddp) run_step train_ddp - "$py" "${train[@]}" "${ddp[@]}" "${extra[@]}" \
                 "paths.root=$work/train_ddp" ;;
    framework) run_step framework "$work/framework.json" "$py" -m rescalelab.bench \
                 --device "$device" "${quick[@]}" --rows framework --json "$work/framework.json" ;;
    *) rows+=("| $step | FAIL | 0 | unknown step (expected: norm train_gpu train_ddp framework) |")
       failed=1 ;;
  esac
done

echo "gpu_check on $device$([[ "$dry" == 1 ]] && echo ' (dry run)'), $(date -u +%Y-%m-%dT%H:%MZ)"
echo "| step | status | s | result |"
echo "|---|---|---|---|"
printf '%s\n' "${rows[@]}"
exit $failed
