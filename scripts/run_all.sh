#!/usr/bin/env bash
# The whole pipeline, stage by stage, on the embedded demo data by default.
#   bash scripts/run_all.sh [--config configs/X.yaml]
# Stages that exist so far: demo data -> resize -> clean + folds -> train every fold. Each stage's log goes to
# output/logs/<stage>.log; a failure names the stage and its log. Later stages (training, distillation,
# fine-tune, stacking, packaging, prediction) join this script as they land.
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

train_csv=$($PY -c "import sys; sys.path.insert(0, 'src'); from config import load_config; print(load_config('$config').train_csv)")
if [[ ! -f "$train_csv" ]]; then
  stage prepare_demo "$PY" scripts/prepare_demo.py --config "$config"
fi
stage resize "$PY" src/resize.py --config "$config"
stage folds "$PY" src/folds.py --config "$config"
# Every fold (one per GPU in parallel where there are several); --resume continues killed folds.
stage train "$PY" src/train.py --config "$config" --fold all --resume
echo "== all stages done in $SECONDS s"
