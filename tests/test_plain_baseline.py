"""bench/plain_baseline.py trains the plain timm loop on tiny data, scores the held-out images and says which
input is missing when one is (no timings asserted)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from tiny import ROOT, make_data, make_test_images, write_yaml

sys.path.insert(0, str(ROOT / "bench"))

import plain_baseline

FINAL = re.compile(
    r"^plain loop: 32 px, 1 epochs: held-out accuracy (?P<acc>[0-9.]+), macro-F1 (?P<f1>[0-9.]+) "
    r"\((?P<n>\d+) images\); [0-9.]+ s \(train [0-9.]+, predict [0-9.]+\)$"
)


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, int]:
    """A config over tiny training data (test_efficientnet, no pretrained weights) and a held-out set."""
    n = make_test_images(tmp_path, per_class=2)
    cfg = make_data(
        tmp_path, per_class=4, test_images=str(tmp_path / "test_images"),
        test_labels=str(tmp_path / "test_labels.csv"),
    )  # fmt: skip
    return write_yaml(cfg, tmp_path / "tiny.yaml"), n


def run(config: Path, *extra: str) -> None:
    """The script at 32 px, one epoch, batch 4, loading in the main process."""
    sizes = ["--img-size", "32", "--epochs", "1", "--batch-size", "4", "--workers", "0"]
    assert plain_baseline.main(["--config", str(config), *sizes, *extra]) == 0


@pytest.mark.parametrize("budget", [[], ["--seconds", "0.001"]], ids=["epochs", "seconds"])
def test_trains_predicts_and_scores_every_held_out_image(
    tiny: tuple[Path, int], budget: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    config, n = tiny
    run(config, *budget)  # a budget spent by the warm-up still trains one epoch
    captured = capsys.readouterr()
    match = FINAL.match(captured.out.strip().splitlines()[-1])
    assert match, captured.out
    assert 0 <= float(match["acc"]) <= 1 and 0 <= float(match["f1"]) <= 1
    assert int(match["n"]) == n


def test_missing_test_labels_name_the_file_and_the_fix(tiny: tuple[Path, int], tmp_path: Path) -> None:
    config, _ = tiny
    (tmp_path / "test_labels.csv").unlink()
    with pytest.raises(SystemExit) as exit_info:
        run(config)
    message = str(exit_info.value.code)
    assert f"test labels {tmp_path / 'test_labels.csv'} not found" in message
    assert "--test-labels" in message


def test_the_budget_sets_whole_epochs_at_least_one() -> None:
    assert plain_baseline.budget_epochs(100.0, 10.0, 20.0) == 4
    assert plain_baseline.budget_epochs(100.0, 10.0, 200.0) == 1
    assert plain_baseline.budget_epochs(5.0, 10.0, 1.0) == 1
