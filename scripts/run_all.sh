#!/usr/bin/env bash
# The whole pipeline, stage by stage, on the embedded demo data by default.
#   bash scripts/run_all.sh [--config configs/X.yaml]
# Stages that exist so far: demo data -> resize -> clean + folds -> train every fold -> soft labels from the
# OOF logits -> retrain every fold on them -> higher-resolution head fine-tune -> report. Each stage's log goes
# to output/logs/<stage>.log; a failure names the stage and its log. Stacking, packaging and prediction join
# this script as they land.
set -euo pipefail
cd "$(dirname "$0")/.."

config=configs/demo.yaml
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) config="$2"; shift 2 ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "run_all.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[[ -f "$config" ]] || { echo "run_all.sh: config file '$config' not found" >&2; exit 2; }

PY=${PYTHON:-python3}
logs=output/logs
mkdir -p "$logs"

stage() {
  local name=$1; shift
  local log="$logs/$name.log" start=$SECONDS
  echo "== $name: $*"
  if ! "$@" 2>&1 | tee "$log"; then
    echo "run_all.sh: stage '$name' failed; its log: $log" >&2
    exit 1
  fi
  echo "== $name done in $((SECONDS - start)) s"
}

setting() { $PY -c "import sys; sys.path.insert(0, 'src'); from config import load_config; print(load_config('$config').$1)"; }
train_csv=$(setting train_csv)
exp=$(setting exp)
output_dir=$(setting output_dir)
if [[ ! -f "$train_csv" ]]; then
  stage prepare_demo "$PY" scripts/prepare_demo.py --config "$config"
fi
stage resize "$PY" src/resize.py --config "$config"
stage folds "$PY" src/folds.py --config "$config"
# Every fold (one per GPU in parallel where there are several); --resume continues killed folds.
stage train "$PY" src/train.py --config "$config" --fold all --resume
# Self-distillation: the teacher's OOF logits become soft labels; the student retrains every fold on them.
stage distill "$PY" src/distill.py --config "$config"
stage train_distill "$PY" src/train.py --config "$config" --exp "${exp}_distill" \
  --soft-labels "$output_dir/$exp/soft_labels.npz" --fold all --resume
# FixRes: the student's head retrained at ft_img_size on a frozen backbone (a new experiment).
stage finetune "$PY" src/finetune.py --config "$config" --exp "${exp}_distill"
stage report "$PY" src/report.py --config "$config"
echo "== all stages done in $SECONDS s"
