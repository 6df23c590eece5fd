#!/usr/bin/env bash
# The whole pipeline, stage by stage, on the embedded demo data by default.
#   bash scripts/run_all.sh [--config configs/X.yaml] [--from STAGE | --only STAGE] [--force]
# Stages: prepare_demo (only when train_csv is missing), resize, folds, train, distill, train_distill,
# finetune, stack, package, predict, score (when the config's test_labels exists), report.
# A stage is skipped when its stamp (output_dir/.stamps/<stage>) holds this config's hash and command and is
# newer than the previous stage's stamp and than its input files. --from STAGE reruns STAGE and everything
# after it; --only STAGE reruns just that one; --force reruns all. A killed run continues where it stopped
# (training resumes mid-fold). Each stage's log is output_dir/logs/<stage>.log; a failure names both.
# With distill_alpha: auto the distillation round must earn its minutes: train_distill trains the student's
# first fold, distill.py --verdict compares it with the teacher on that fold (output_dir/<exp>_distill/
# distill_verdict.json), and only when it pays trains the other folds; otherwise finetune and stack build on
# the teacher (<exp>_ft; stack members <exp> and <exp>_ft). With a number, every fold as always; with none,
# no round at all (distill and train_distill are skipped; finetune and stack build on the teacher).
set -euo pipefail
cd "$(dirname "$0")/.."

STAGES=(prepare_demo resize folds train distill train_distill finetune stack package predict score report)
config=configs/demo.yaml
from="" only="" force=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) config="$2"; shift 2 ;;
    --from) from="$2"; shift 2 ;;
    --only) only="$2"; shift 2 ;;
    --force) force=1; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "run_all.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[[ -f "$config" ]] || { echo "run_all.sh: config file '$config' not found" >&2; exit 2; }
for s in "$from" "$only"; do
  if [[ -n "$s" && ! " ${STAGES[*]} " =~ " $s " ]]; then
    echo "run_all.sh: unknown stage '$s'; stages: ${STAGES[*]}" >&2
    exit 2
  fi
done

PY=${PYTHON:-python3}
# OpenMP threads (torch, XGBoost) that spin while waiting made XGBoost 5-6x slower on 2 shared cores here.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
# Every setting the stages share, read once from the resolved config (defaults < YAML).
eval "$($PY - "$config" <<'EOF'
import shlex, sys
sys.path.insert(0, "src")
from lib.config import load_config
cfg = load_config(sys.argv[1])
values = {
    "exp": cfg.exp, "output_dir": cfg.output_dir, "train_csv": cfg.train_csv, "train_images": cfg.train_images,
    "resized": str(cfg.resized_images), "folds_csv": cfg.folds_csv, "test_images": cfg.test_images,
    "bundle_dir": cfg.bundle_dir, "stack_exp": cfg.stack_exp, "test_labels": cfg.test_labels,
    "submission": cfg.submission, "sample_submission": cfg.sample_submission, "distill_alpha": cfg.distill_alpha,
}
for key, value in values.items():
    print(f"{key}={shlex.quote(str(value))}")
EOF
)"
stamps="$output_dir/.stamps"
logs="$output_dir/logs"
report_dir="$output_dir/report"
mkdir -p "$stamps" "$logs"
config_hash=$(sha256sum "$config" | cut -c1-16)

# --from/--only/--force: which stages are forced (rerun even when up to date) or left out.
forced() {
  local name=$1
  ((force)) && return 0
  [[ -n "$only" && "$only" == "$name" ]] && return 0
  if [[ -n "$from" ]]; then
    local s
    for s in "${STAGES[@]}"; do
      [[ "$s" == "$from" ]] && return 0
      [[ "$s" == "$name" ]] && return 1
    done
  fi
  return 1
}
selected() {
  local name=$1
  [[ -z "$only" || "$only" == "$name" ]]
}

previous=""  # the stamp of the last stage that ran or was up to date
up_to_date() {  # stage inputs...
  local name=$1; shift
  local stamp="$stamps/$name"
  [[ -f "$stamp" ]] || return 1
  [[ "$(cat "$stamp")" == "$config_hash $current_cmd" ]] || return 1
  # Not older than the previous stage's stamp (two quick stages can share one timestamp tick).
  [[ -z "$previous" || ! "$previous" -nt "$stamp" ]] || return 1
  local input
  for input in "$config" "$@"; do
    [[ -e "$input" ]] || continue
    [[ -z "$(find "$input" -newer "$stamp" -print -quit 2>/dev/null)" ]] || return 1
  done
}

# stage NAME [--inputs PATH... --] COMMAND...: run COMMAND unless up to date; stamp it on success.
stage() {
  local name=$1; shift
  local inputs=()
  if [[ "${1:-}" == "--inputs" ]]; then
    shift
    while [[ "$1" != "--" ]]; do inputs+=("$1"); shift; done
    shift
  fi
  # The stamp records the command without --resume/--force, which say how to run it, not what it makes.
  current_cmd=""
  local arg
  for arg in "$@"; do
    [[ "$arg" == --resume || "$arg" == --force ]] || current_cmd+="$arg "
  done
  local stamp="$stamps/$name" log="$logs/$name.log" start=$SECONDS
  if ! selected "$name"; then
    [[ -f "$stamp" ]] && previous="$stamp"
    return 0
  fi
  if ! forced "$name" && up_to_date "$name" "${inputs[@]}"; then
    echo "== $name: up to date (stamp $stamp)"
    previous="$stamp"
    return 0
  fi
  echo "== $name: $*"
  rm -f "$stamp"  # a rerun stopped half-way must not leave the previous run's stamp saying it is done
  if ! "$@" 2>&1 | tee "$log"; then
    echo "run_all.sh: stage '$name' failed; its log: $log (rerun the same command to continue)" >&2
    exit 1
  fi
  echo "$config_hash $current_cmd" > "$stamp"
  previous="$stamp"
  echo "== $name done in $((SECONDS - start)) s"
  timings+=("$name $((SECONDS - start))")
}
timings=()
# Training continues killed folds (--resume) unless the stage is forced to start afresh.
resume() { forced "$1" && echo "" || echo "--resume"; }

if [[ ! -f "$train_csv" ]]; then
  stage prepare_demo "$PY" scripts/prepare_demo.py --config "$config"
fi
stage resize --inputs "$train_csv" "$train_images" -- "$PY" src/resize.py --config "$config"
stage folds --inputs "$train_csv" "$resized/_index.csv" -- "$PY" src/folds.py --config "$config"
# Every fold (one per GPU in parallel where there are several).
stage train "$PY" src/train.py --config "$config" --fold all $(resume train)
student="${exp}_distill"
soft_labels="$output_dir/$exp/soft_labels.npz"
verdict="$output_dir/$student/distill_verdict.json"
paid() {  # whether the pilot's verdict says the round pays (no verdict: no)
  [[ -f "$verdict" ]] && "$PY" -c 'import json, sys; sys.exit(not json.load(open(sys.argv[1]))["pays"])' "$verdict"
}
# distill_alpha auto: a pilot. The student's first fold, then distill.py's verdict on it; the other folds only
# when the round pays. Forced: every fold afresh (their last.pt removed). Rerun, the verdict is made again.
# (Called as an if-condition, where bash ignores set -e: every step returns its failure itself.)
pilot_round() {  # [--resume]
  local first
  first=$("$PY" -c 'import sys; sys.path.insert(0, "src"); from lib.layout import select_folds
print(select_folds("all", sys.argv[1])[0])' "$folds_csv") || return
  [[ "${1:-}" == --resume ]] || rm -f "$output_dir/$student"/{fold*,full}/last.pt
  rm -f "$verdict"  # a pilot killed before its verdict must not leave the previous one standing
  "$PY" src/train.py --config "$config" --exp "$student" --soft-labels "$soft_labels" --fold "$first" --resume \
    || return
  "$PY" src/distill.py --config "$config" --verdict --student "$student" --fold "$first" || return
  if paid; then
    "$PY" src/train.py --config "$config" --exp "$student" --soft-labels "$soft_labels" --fold all --resume
  else
    # train.py assembles a whole OOF whenever every fold has a file, older rounds' included: none may stand.
    rm -f "$output_dir/$student/oof.npz"
    echo "distillation does not pay on fold $first: its other folds are skipped; later stages use $exp"
  fi
}
# Self-distillation: the teacher's OOF logits become soft labels; the student retrains every fold on them.
if [[ "$distill_alpha" == none ]]; then
  echo "== distill, train_distill: distill_alpha none in $config: no distillation round"
else
  stage distill "$PY" src/distill.py --config "$config"
  if [[ "$distill_alpha" == auto ]]; then
    stage train_distill pilot_round $(resume train_distill)
  else
    stage train_distill "$PY" src/train.py --config "$config" --exp "$student" --soft-labels "$soft_labels" \
      --fold all $(resume train_distill)
  fi
fi
# What follows builds on the student, or on the teacher where the pilot said the round does not pay or there
# is no round (a student with only some folds is never a member).
base=$student
if [[ "$distill_alpha" == none ]]; then
  base=$exp
elif [[ "$distill_alpha" == auto ]] && ! paid; then
  base=$exp
  echo "== distillation skipped (no paying verdict at $verdict): finetune and stack build on $exp"
fi
members=("$exp")
[[ "$base" == "$exp" ]] || members+=("$base")
members+=("${base}_ft")
# FixRes: the head retrained at ft_img_size on a frozen backbone, as a new experiment.
stage finetune "$PY" src/finetune.py --config "$config" --exp "$base" --ft-exp "${base}_ft" \
  $(forced finetune && echo --force)
stage stack "$PY" src/stack.py --config "$config" --stack-members "${members[@]}"
stage package "$PY" src/package.py --config "$config"
scores=()
if [[ ! -d "$test_images" ]]; then
  echo "== predict: no test images at $test_images (set test_images in $config): skipped"
else
  # A competition's sample submission, where there is one, fixes the submission's rows and columns.
  sample=()
  [[ -f "$sample_submission" ]] && sample=(--sample-submission "$sample_submission")
  stage predict --inputs "$test_images" "$sample_submission" -- \
    "$PY" src/predict.py "$test_images" --bundle "$bundle_dir" --out "$submission" "${sample[@]}"
fi
if [[ -d "$test_images" && -f "$test_labels" ]]; then
  mkdir -p "$report_dir"
  stage score --inputs "$test_labels" "$submission" -- \
    bash -c "$PY src/score.py '$submission' '$test_labels' --json > '$report_dir/test_scores.json.tmp' \
      && mv '$report_dir/test_scores.json.tmp' '$report_dir/test_scores.json' && cat '$report_dir/test_scores.json'"
  scores=(--test-scores "$report_dir/test_scores.json")
fi
stage report "$PY" src/report.py --config "$config" "${scores[@]}"

echo "== stage times (s):"
for t in "${timings[@]}"; do echo "   $t"; done
echo "== all stages done in $SECONDS s; submission: $submission; report: $report_dir/report.md"
