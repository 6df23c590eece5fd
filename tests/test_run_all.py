"""scripts/run_all.sh end to end on a tiny config: a run killed during training continues and finishes with
every stage's output; a rerun skips every stage; --only/--from force what they name; a failure names its stage."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from tiny import CLASSES, ROOT, base_cfg, make_data, write_yaml

STAGES = ["resize", "folds", "train", "distill", "train_distill", "finetune", "stack", "package", "predict", "score", "report"]  # fmt: skip


def make_test_images(root: Path, per_class: int = 3) -> None:
    """Held-out images drawn like the training ones, with their labels (the demo's layout)."""
    rng = np.random.default_rng(7)
    rows = []
    for c, name in enumerate(CLASSES):
        for k in range(per_class):
            img = rng.integers(0, 90, (44, 36, 3), dtype=np.uint8)
            img[..., 2 - c] += 150
            path = root / "test_images" / f"t{c}_{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), img)
            rows.append({"image": path.name, "label": name})
    pd.DataFrame(rows).to_csv(root / "test_labels.csv", index=False)


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
