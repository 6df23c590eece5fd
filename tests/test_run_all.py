"""scripts/run_all.sh end to end on a tiny config: a run killed during training continues and finishes with
every stage's output; a rerun skips every stage; --only/--from force what they name; a failure names its stage.
distill_alpha auto: the distillation round's pilot fold and verdict decide what the later stages build on
(its branches with a stand-in python that records the commands, and once for real)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from tiny import CLASSES, ROOT, base_cfg, make_data, make_test_images, write_yaml

from lib.layout import class_names, read_folds
from lib.oof import write_oof

STAGES = ["resize", "folds", "train", "distill", "train_distill", "finetune", "stack", "package", "predict", "score", "report"]  # fmt: skip


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    make_data(tmp_path, per_class=8)
    make_test_images(tmp_path)
    cfg = base_cfg(
        tmp_path, n_folds=2, epochs=2, ft_img_size=48, ft_epochs=1, tta_views=["hflip"],
        test_images=str(tmp_path / "test_images"), test_labels=str(tmp_path / "test_labels.csv"),
        submission=str(tmp_path / "submission.csv"), bundle_dir=str(tmp_path / "bundle"), xgb_rounds=20,
        sample_submission=str(tmp_path / "sample_submission.csv"),
    )  # fmt: skip
    return write_yaml(cfg, tmp_path / "tiny.yaml")


def run_all(config: Path, *args: str, wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1"}
    cmd = ["bash", str(ROOT / "scripts" / "run_all.sh"), "--config", str(config), *args]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def ran(output: str) -> list[str]:
    return [s for s in STAGES if f"== {s} done" in output]


def skipped(output: str) -> list[str]:
    return [s for s in STAGES if f"== {s}: up to date" in output]


def check_outputs(root: Path) -> None:
    out = root / "output"
    for exp in ("t", "t_distill", "t_distill_ft", "stack"):
        assert (out / exp / "oof.npz").is_file(), exp
    assert (root / "bundle" / "manifest.json").is_file()
    sub = pd.read_csv(root / "submission.csv", dtype=str, keep_default_na=False)
    labels = pd.read_csv(root / "test_labels.csv", dtype=str)
    assert sorted(sub["image"]) == sorted(labels["image"])
    assert set(sub["label"]) <= set(CLASSES)
    assert (out / "report" / "report.md").is_file() and (out / "report" / "test_scores.json").is_file()
    assert "Held-out test" in (out / "report" / "report.md").read_text()


def test_killed_in_training_the_rerun_finishes_then_every_stage_is_skipped(tiny_config: Path) -> None:
    root = tiny_config.parent
    proc = run_all(tiny_config, wait=False)
    last = root / "output" / "t" / "fold0" / "last.pt"
    deadline = time.monotonic() + 600
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "run_all.sh ended before training wrote a checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole stage: bash, tee and train.py
    proc.wait()
    assert not (root / "output" / ".stamps" / "train").exists()

    rerun = run_all(tiny_config)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert skipped(rerun.stdout) == ["resize", "folds"]  # finished before the kill
    assert ran(rerun.stdout) == STAGES[2:]
    assert "resumed from" in (root / "output" / "logs" / "train.log").read_text()
    check_outputs(root)

    again = run_all(tiny_config)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert skipped(again.stdout) == STAGES and ran(again.stdout) == []

    # A competition's sample submission (its own header and row order) shapes the submission.
    ids = sorted(pd.read_csv(root / "test_labels.csv", dtype=str)["image"], reverse=True)
    pd.DataFrame({"id": ids, "species": CLASSES[0]}).to_csv(root / "sample_submission.csv", index=False)
    only = run_all(tiny_config, "--only", "predict")
    assert ran(only.stdout) == ["predict"], only.stdout[-2000:]
    sub = pd.read_csv(root / "submission.csv", dtype=str, keep_default_na=False)
    assert list(sub.columns) == ["id", "species"] and sub["id"].tolist() == ids
    # predict is newer now: what follows it is out of date, what precedes it is not.
    after = run_all(tiny_config)
    assert ran(after.stdout) == ["score", "report"], after.stdout[-2000:]

    changed = run_all(tiny_config, "--from", "stack")
    assert ran(changed.stdout) == STAGES[STAGES.index("stack") :]

    bad = run_all(tiny_config, "--only", "nonsense")
    assert bad.returncode == 2 and "unknown stage 'nonsense'" in bad.stderr


def test_a_failing_stage_names_itself_and_its_log(tiny_config: Path) -> None:
    root = tiny_config.parent
    text = tiny_config.read_text().replace("model: test_efficientnet", "model: no_such_model_xyz")
    tiny_config.write_text(text)
    result = run_all(tiny_config)
    assert result.returncode == 1
    assert (
        "stage 'train' failed" in result.stderr
        and str(root / "output" / "logs" / "train.log") in result.stderr
    )


# ---------------------------------------------------------------------------------------------------------
# distill_alpha: auto.

# python's stand-in: records each stage's command line (and fails the one naming $FAIL_ON), writes the
# verdict distill.py --verdict would ($PAYS); the real python runs everything else (the config, -c).
FAKE_PYTHON = """#!/usr/bin/env bash
case "$1" in
  src/*.py|scripts/*.py)
    echo "$*" >> "$CALLS"
    if [[ -n "${FAIL_ON:-}" && " $* " == *" $FAIL_ON "* ]]; then exit 3; fi
    if [[ " $* " == *" --verdict "* ]]; then
      mkdir -p "$(dirname "$VERDICT")" && echo "{\\"pays\\": $PAYS}" > "$VERDICT"
    fi
    exit 0 ;;
esac
exec "$REAL_PYTHON" "$@"
"""


class Recorded:
    """run_all.sh with the stand-in python over ``root``: each run returns (process, the stage commands it
    ran, with the config and output paths shortened to CFG and OUT)."""

    def __init__(self, root: Path, alpha: float | str) -> None:
        self.root, self.out = root, root / "output"
        (root / "train.csv").write_text("image,label\n")  # present: no prepare_demo
        rows = [f"{i}.png,{CLASSES[i % 3]},{i},{1 + i % 2}" for i in range(12)]  # folds 1 and 2
        (root / "folds.csv").write_text("image,label,group,fold\n" + "\n".join(rows) + "\n")
        cfg = base_cfg(root, distill_alpha=alpha, test_images=str(root / "no_test_images"))
        self.config = write_yaml(cfg, root / "c.yaml")
        self.fake = root / "fake_python"
        self.fake.write_text(FAKE_PYTHON)
        self.fake.chmod(0o755)
        self.calls = root / "calls.txt"
        self.verdict = self.out / "t_distill" / "distill_verdict.json"

    def __call__(self, *args: str, pays: bool = False, fail_on: str = "") -> tuple:
        self.calls.write_text("")
        env = {
            **os.environ, "PYTHON": str(self.fake), "REAL_PYTHON": sys.executable, "CALLS": str(self.calls),
            "VERDICT": str(self.verdict), "PAYS": "true" if pays else "false", "FAIL_ON": fail_on,
        }  # fmt: skip
        cmd = ["bash", str(ROOT / "scripts" / "run_all.sh"), "--config", str(self.config), *args]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        short = self.calls.read_text().replace(str(self.config), "CFG").replace(str(self.out), "OUT")
        return proc, short.splitlines()


PILOT = [
    "src/train.py --config CFG --exp t_distill --soft-labels OUT/t/soft_labels.npz --fold 1 --resume",
    "src/distill.py --config CFG --verdict --student t_distill --fold 1",
]
REST = ["src/package.py --config CFG", "src/report.py --config CFG"]


def test_auto_pilot_builds_on_the_teacher_unless_the_round_pays(tmp_path: Path) -> None:
    run = Recorded(tmp_path, "auto")
    stale = run.out / "t_distill" / "fold2" / "last.pt"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"x")

    proc, calls = run(pays=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert calls == [
        "src/resize.py --config CFG", "src/folds.py --config CFG", "src/train.py --config CFG --fold all --resume",
        "src/distill.py --config CFG", *PILOT,  # the pilot: the first fold of folds.csv, then the verdict
        "src/finetune.py --config CFG --exp t --ft-exp t_ft", "src/stack.py --config CFG --stack-members t t_ft",
        *REST,
    ]  # fmt: skip
    assert "distillation does not pay on fold 1" in proc.stdout and stale.exists()  # resumable, kept
    assert "== distillation skipped" in proc.stdout

    proc, calls = run(pays=False)  # nothing new
    assert proc.returncode == 0 and calls == [] and ran(proc.stdout) == []

    # The pilot again (forced: every fold afresh), and this time the round pays: the student's other folds,
    # then the fine-tune and the stack build on it.
    proc, calls = run("--from", "train_distill", pays=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert calls == [
        *PILOT, "src/train.py --config CFG --exp t_distill --soft-labels OUT/t/soft_labels.npz --fold all --resume",
        "src/finetune.py --config CFG --exp t_distill --ft-exp t_distill_ft --force",
        "src/stack.py --config CFG --stack-members t t_distill t_distill_ft", *REST,
    ]  # fmt: skip
    assert not stale.exists()

    # A pilot that fails stops the run, leaves no stamp and no verdict; the next run does the pilot again.
    proc, calls = run("--only", "train_distill", pays=True, fail_on="--verdict")
    assert proc.returncode == 1 and "stage 'train_distill' failed" in proc.stderr
    assert (
        calls == PILOT and not (run.out / ".stamps" / "train_distill").exists() and not run.verdict.exists()
    )
    proc, calls = run(pays=True)
    assert proc.returncode == 0 and calls[:2] == PILOT
    assert ran(proc.stdout) == ["train_distill", "finetune", "stack", "package", "report"]


def test_a_number_for_distill_alpha_trains_every_fold_without_a_pilot(tmp_path: Path) -> None:
    run = Recorded(tmp_path, 0.65)
    proc, calls = run(pays=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert calls[3:7] == [
        "src/distill.py --config CFG",
        "src/train.py --config CFG --exp t_distill --soft-labels OUT/t/soft_labels.npz --fold all --resume",
        "src/finetune.py --config CFG --exp t_distill --ft-exp t_distill_ft",
        "src/stack.py --config CFG --stack-members t t_distill t_distill_ft",
    ]
    assert "distillation" not in proc.stdout.replace("t_distill", "")


def test_auto_distillation_that_does_not_pay_is_skipped_after_its_pilot(tmp_path: Path) -> None:
    make_data(tmp_path, per_class=6)
    cfg = base_cfg(
        tmp_path, n_folds=2, epochs=1, ft_img_size=48, ft_epochs=1, tta_views=[], distill_alpha="auto",
        distill_temperature="auto", test_images=str(tmp_path / "no_test_images"), bundle_dir=str(tmp_path / "bundle"),
        xgb_rounds=20,
    )  # fmt: skip
    config = write_yaml(cfg, tmp_path / "tiny.yaml")
    for s in ("resize", "folds", "train"):
        done = run_all(config, "--only", s)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # A perfect teacher, planted in place of the trained one's OOF: no one-epoch student beats it on its pilot.
    folds = read_folds(cfg.folds_csv)
    classes = class_names(folds)
    write_oof(cfg.exp_dir / "oof.npz", folds, 8.0 * (folds["label"].to_numpy()[:, None] == classes), classes)

    result = run_all(config)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert ran(result.stdout) == ["distill", "train_distill", "finetune", "stack", "package", "report"]
    out = tmp_path / "output"
    verdict = json.loads((out / "t_distill" / "distill_verdict.json").read_text())
    assert verdict["pays"] is False and verdict["fold"] == 0 and verdict["alpha"] == 0.3
    assert (out / "t_distill" / "fold0" / "oof.npz").is_file() and not (out / "t_distill" / "fold1").exists()
    assert not (out / "t_distill" / "oof.npz").exists()  # a student with one fold is no experiment
    assert (out / "t_ft" / "oof.npz").is_file() and not (out / "t_distill_ft").exists()
    assert json.loads((out / "stack" / "stack.json").read_text())["members"] == ["t", "t_ft"]
    text = (out / "report" / "report.md").read_text()
    assert "- Distillation `t_distill` (soft labels of `t`, alpha 0.3 (auto)" in text
    assert "**skipped** after the fold-0 pilot" in text and "| t_distill |" not in text

    again = run_all(config)
    assert again.returncode == 0 and ran(again.stdout) == []


def test_distill_alpha_none_skips_the_round_and_builds_on_the_teacher(tmp_path: Path) -> None:
    run = Recorded(tmp_path, "none")
    proc, calls = run(pays=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert calls == [
        "src/resize.py --config CFG", "src/folds.py --config CFG", "src/train.py --config CFG --fold all --resume",
        "src/finetune.py --config CFG --exp t --ft-exp t_ft", "src/stack.py --config CFG --stack-members t t_ft",
        *REST,
    ]  # fmt: skip
    assert "distill_alpha none" in proc.stdout and "distill" not in ran(proc.stdout)
