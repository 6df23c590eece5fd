"""Score a submission against true labels: accuracy, macro-F1 and per-class recall.

``python src/score.py SUBMISSION LABELS`` where both are CSVs with columns ``image,label``. Row-level
problems (missing, extra or duplicated images, unknown labels) are all listed in one error, since a
submission with any of them would be rejected or mis-scored by a competition.
The metrics themselves live in lib/metrics.py, shared with every stage that scores predictions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from lib.common import preview
from lib.metrics import classification_scores

REQUIRED = ("image", "label")


class SubmissionError(ValueError):
    """The submission or label file cannot be scored; the message lists every problem."""


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


def check_submission(sub: pd.DataFrame, truth: pd.DataFrame) -> list[str]:
    """Every reason the submission cannot be scored against ``truth`` (empty when it can)."""
    problems = []
    for name, df in (("submission", sub), ("labels", truth)):
        dup = df["image"][df["image"].duplicated()].unique().tolist()
        if dup:
            problems.append(f"{name}: {len(dup)} duplicated image row(s): {preview(dup, quote=True)}")
    want, got = set(truth["image"]), set(sub["image"])
    if missing := sorted(want - got):
        problems.append(f"submission: {len(missing)} image(s) missing: {preview(missing, quote=True)}")
    if extra := sorted(got - want):
        problems.append(f"submission: {len(extra)} image(s) not in the labels: {preview(extra, quote=True)}")
    if unknown := sorted(set(sub["label"]) - set(truth["label"])):
        problems.append(f"submission: {len(unknown)} unknown label(s): {preview(unknown, quote=True)}")
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
