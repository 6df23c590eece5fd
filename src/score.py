"""Score a submission against true labels: accuracy, macro-F1 and per-class recall.

``python src/score.py SUBMISSION LABELS`` where both are CSVs with columns ``image,label``. Row-level
problems (missing, extra or duplicated images, unknown labels) are all listed in one error, since a
submission with any of them would be rejected or mis-scored by a competition.
This module is also the one home of the classification metrics the other stages report.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, f1_score, log_loss, recall_score

REQUIRED = ("image", "label")


class SubmissionError(ValueError):
    """The submission or label file cannot be scored; the message lists every problem."""


def classification_scores(y_true: Sequence[str], y_pred: Sequence[str], classes: Sequence[str]) -> dict:
    """Accuracy, macro-F1 over ``classes`` and each class's recall (None for classes absent from y_true)."""
    classes = list(classes)
    recalls = recall_score(y_true, y_pred, labels=classes, average=None, zero_division=np.nan)
    return {
        "n": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=classes, average="macro", zero_division=0)),
        "recall": {c: (None if np.isnan(r) else float(r)) for c, r in zip(classes, recalls, strict=True)},
    }


def logit_scores(logits: np.ndarray, y_true: Sequence[str], classes: Sequence[str]) -> dict:
    """Accuracy, macro-F1 and log-loss of logits [N, C] (column j is ``classes[j]``) against class names.

    Log-loss is sklearn's on the softmax (the cross-entropy train.py logs as val_loss); the softmax is
    taken in float64 after subtracting each row's maximum so large logits neither overflow nor give NaN.
    sklearn clips probabilities at float64's eps, so one confidently wrong image costs at most ~36.
    """
    classes = list(classes)
    logits = np.asarray(logits, dtype=np.float64)
    y_true = [str(y) for y in y_true]
    if logits.ndim != 2 or logits.shape != (len(y_true), len(classes)):
        raise ValueError(
            f"logits of shape {logits.shape} do not fit {len(y_true)} labels x {len(classes)} classes"
        )
    if not np.isfinite(logits).all():
        raise ValueError(f"{(~np.isfinite(logits)).any(axis=1).sum()} row(s) of logits hold NaN or inf")
    index = {c: i for i, c in enumerate(classes)}
    if unknown := sorted(set(y_true) - index.keys()):
        raise ValueError(f"{len(unknown)} label(s) not among the classes: {_examples(unknown)}")
    z = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=1, keepdims=True)
    s = classification_scores(y_true, [classes[i] for i in logits.argmax(axis=1)], classes)
    loss = log_loss([index[y] for y in y_true], probs, labels=list(range(len(classes))))
    return {"n": s["n"], "accuracy": s["accuracy"], "macro_f1": s["macro_f1"], "log_loss": float(loss)}


def read_table(path: Path, what: str) -> pd.DataFrame:
    """A CSV with string columns image,label, or any two columns read as id,label (a competition's own
    submission header, such as ``id,species``); labels like "1" or "NA" stay strings."""
    if not Path(path).is_file():
        raise SubmissionError(f"{what} file {path} not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise SubmissionError(f"{what} file {path} is not a readable CSV: {e}") from e
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing and len(df.columns) == 2:
        return df.set_axis(list(REQUIRED), axis=1)
    if missing:
        raise SubmissionError(
            f"{what} file {path} lacks column(s) {missing}; it has {list(df.columns)} (expected image,label, or two columns: id,label)"
        )
    return df


def _examples(values: Sequence[str], k: int = 5) -> str:
    shown = ", ".join(repr(v) for v in list(values)[:k])
    return shown + (f", ... ({len(values)} in all)" if len(values) > k else "")


def check_submission(sub: pd.DataFrame, truth: pd.DataFrame) -> list[str]:
    """Every reason the submission cannot be scored against ``truth`` (empty when it can)."""
    problems = []
    for name, df in (("submission", sub), ("labels", truth)):
        dup = df["image"][df["image"].duplicated()].unique().tolist()
        if dup:
            problems.append(f"{name}: {len(dup)} duplicated image row(s): {_examples(dup)}")
    want, got = set(truth["image"]), set(sub["image"])
    if missing := sorted(want - got):
        problems.append(f"submission: {len(missing)} image(s) missing: {_examples(missing)}")
    if extra := sorted(got - want):
        problems.append(f"submission: {len(extra)} image(s) not in the labels: {_examples(extra)}")
    if unknown := sorted(set(sub["label"]) - set(truth["label"])):
        problems.append(f"submission: {len(unknown)} unknown label(s): {_examples(unknown)}")
    return problems


def score(submission: Path, labels: Path) -> dict:
    """Scores of a submission file against a label file; raises SubmissionError listing all problems."""
    sub, truth = read_table(submission, "submission"), read_table(labels, "labels")
    if problems := check_submission(sub, truth):
        raise SubmissionError(f"cannot score {submission}:\n  " + "\n  ".join(problems))
    merged = truth[["image", "label"]].merge(sub[["image", "label"]], on="image", suffixes=("", "_pred"))
    return classification_scores(merged["label"], merged["label_pred"], sorted(truth["label"].unique()))


def format_scores(scores: dict) -> str:
    lines = [
        f"images    {scores['n']}",
        f"accuracy  {scores['accuracy']:.4f}",
        f"macro-F1  {scores['macro_f1']:.4f}",
    ]
    lines.append("recall per class:")
    width = max(len(c) for c in scores["recall"])
    for c, r in scores["recall"].items():
        lines.append(f"  {c:<{width}}  {'n/a' if r is None else f'{r:.4f}'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("submission", type=Path, help="submission CSV (image,label)")
    parser.add_argument("labels", type=Path, help="true labels CSV (image,label)")
    parser.add_argument("--json", action="store_true", help="print the scores as JSON")
    args = parser.parse_args(argv)
    try:
        scores = score(args.submission, args.labels)
    except SubmissionError as e:
        print(f"score: {e}", file=sys.stderr)
        return 2
    print(json.dumps(scores, indent=2) if args.json else format_scores(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
