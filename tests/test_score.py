"""score.py: the metrics and the refusal of submissions that a competition would reject."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib.metrics import classification_scores, logit_scores
from score import SubmissionError, main, score


def write(path: Path, rows: list[tuple[str, str]]) -> Path:
    pd.DataFrame(rows, columns=["image", "label"]).to_csv(path, index=False)
    return path


@pytest.fixture
def labels(tmp_path: Path) -> Path:
    return write(
        tmp_path / "labels.csv", [("a.png", "1"), ("b.png", "1"), ("c.png", "NA"), ("d.png", "x y/z")]
    )


def test_scores(tmp_path: Path, labels: Path) -> None:
    sub = write(tmp_path / "sub.csv", [("d.png", "x y/z"), ("c.png", "1"), ("b.png", "1"), ("a.png", "1")])
    s = score(sub, labels)
    assert s["n"] == 4
    assert s["accuracy"] == pytest.approx(0.75)
    assert s["recall"] == {"1": 1.0, "NA": 0.0, "x y/z": 1.0}  # labels stay strings
    assert s["macro_f1"] == pytest.approx((0.8 + 0.0 + 1.0) / 3)


def test_absent_class_recall_is_none() -> None:
    s = classification_scores(["a", "a"], ["a", "b"], ["a", "b"])
    assert s["recall"] == {"a": 0.5, "b": None}


def test_every_row_problem_is_listed_at_once(tmp_path: Path, labels: Path) -> None:
    sub = write(tmp_path / "sub.csv", [("a.png", "1"), ("a.png", "1"), ("e.png", "1"), ("b.png", "cat")])
    with pytest.raises(SubmissionError) as err:
        score(sub, labels)
    msg = str(err.value)
    assert "duplicated image" in msg and "'a.png'" in msg
    assert "2 image(s) missing" in msg and "'c.png'" in msg and "'d.png'" in msg
    assert "not in the labels" in msg and "'e.png'" in msg
    assert "unknown label" in msg and "'cat'" in msg


def test_missing_column_and_file(tmp_path: Path, labels: Path) -> None:
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"id": ["a.png"], "label": ["1"], "note": ["x"]}).to_csv(bad, index=False)
    with pytest.raises(SubmissionError, match="lacks column"):
        score(bad, labels)
    with pytest.raises(SubmissionError, match="not found"):
        score(tmp_path / "none.csv", labels)


def test_cli_exit_codes(tmp_path: Path, labels: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(labels), str(labels)]) == 0
    assert "accuracy  1.0000" in capsys.readouterr().out
    assert main([str(tmp_path / "none.csv"), str(labels)]) == 2


def test_logit_scores_known_case() -> None:
    # softmax rows: (0.5, 0.5) ties -> argmax picks "a"; (3/4, 1/4); (1/4, 3/4) for a true "a" is wrong.
    logits = np.array([[0.0, 0.0], [np.log(3), 0.0], [0.0, np.log(3)]], dtype=np.float32)
    s = logit_scores(logits, ["a", "a", "a"], ["a", "b"])
    assert s["n"] == 3
    assert s["accuracy"] == pytest.approx(2 / 3)
    assert s["macro_f1"] == pytest.approx((0.8 + 0.0) / 2)  # "a": P=1, R=2/3; "b": never right
    assert s["log_loss"] == pytest.approx(-(np.log(0.5) + np.log(0.75) + np.log(0.25)) / 3, rel=1e-6)


def test_logit_scores_is_stable_and_strict() -> None:
    huge = np.array([[1000.0, -1000.0, 0.0], [0.0, 2000.0, 0.0]])
    s = logit_scores(huge, ["1", "NA"], ["1", "NA", "x y"])  # classes absent from y_true still count
    assert s["accuracy"] == 1.0 and s["log_loss"] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="not among the classes"):
        logit_scores(huge, ["1", "cat"], ["1", "NA", "x y"])
    with pytest.raises(ValueError, match="do not fit"):
        logit_scores(huge, ["1"], ["1", "NA", "x y"])
    with pytest.raises(ValueError, match="NaN or inf"):
        logit_scores(np.array([[np.nan, 0.0]]), ["a"], ["a", "b"])


def test_a_two_column_submission_with_the_competitions_own_header(tmp_path: Path, labels: Path) -> None:
    sub = tmp_path / "sub.csv"
    pd.DataFrame({"id": ["d.png", "c.png", "b.png", "a.png"], "species": ["x y/z", "NA", "1", "NA"]}).to_csv(
        sub, index=False
    )
    s = score(sub, labels)
    assert s["accuracy"] == pytest.approx(0.75) and s["recall"]["NA"] == 1.0
