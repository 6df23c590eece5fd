"""Soft labels for self-distillation from an experiment's out-of-fold logits.

``python src/distill.py --config configs/X.yaml [--out FILE]`` reads ``<output_dir>/<exp>/oof.npz`` (the
teacher: the experiment named by ``exp``) and writes ``<output_dir>/<exp>/soft_labels.npz``, one row per
row of folds.csv::

    soft = distill_alpha * one_hot(label) + (1 - distill_alpha) * softmax(OOF logits / distill_temperature)

Each image's soft label comes from the fold model that validated it, never from one trained on it: the
teacher's fold ids are checked against folds.csv. Train the student on them with
``python src/train.py --config configs/X.yaml --exp <student> --soft-labels <that file> --fold all``; a
second round is the same two commands with the student as the teacher.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from lib.common import PipelineError, get_logger
from lib.config import Config, parse_config
from lib.layout import class_names, experiment, read_folds, targets
from lib.metrics import softmax
from lib.oof import SOFT_KEY, OOFError, aligned_logits, write_oof

log = get_logger("distill")


def soft_targets(logits: np.ndarray, labels: np.ndarray, alpha: float, temperature: float) -> np.ndarray:
    """alpha x one-hot(labels) + (1 - alpha) x softmax(logits / T): float32 [N, C], rows summing to 1.

    ``logits`` float [N, C] out-of-fold; ``labels`` int [N] class indices (Hinton et al. 2015's soft
    targets, taken from OOF predictions as Kaggle's self-distillation write-ups do).
    """
    one_hot = np.eye(logits.shape[1])[labels]
    return (alpha * one_hot + (1 - alpha) * softmax(logits.astype(np.float64) / temperature)).astype(np.float32)


def make_soft_labels(cfg: Config, out: Path | None = None) -> Path:
    """Write the soft labels of every folds.csv image from the ``cfg.exp`` teacher's OOF logits.

    Raises:
        LayoutError: folds.csv is missing. OOFError: the teacher's OOF is missing or does not match folds.csv.
    """
    folds = read_folds(cfg.folds_csv)
    classes = class_names(folds)
    teacher = experiment(cfg.output_dir, cfg.exp)
    try:
        logits = aligned_logits(teacher.oof, folds, classes)
    except OOFError as e:
        raise OOFError(f"teacher {cfg.exp!r}: {e} (retrain the teacher on the current folds.csv)") from None
    labels = targets(folds, classes)
    soft = soft_targets(logits, labels, cfg.distill_alpha, cfg.distill_temperature)
    out = Path(out) if out else teacher.soft_labels
    write_oof(out, folds, soft, classes, key=SOFT_KEY)
    agree = float((logits.argmax(1) == labels).mean())
    log.info(
        f"{len(soft)} soft labels from {teacher.oof} (teacher OOF accuracy {agree:.4f}; alpha "
        f"{cfg.distill_alpha}, T {cfg.distill_temperature}; mean weight on the true class "
        f"{soft[np.arange(len(soft)), labels].mean():.3f}) -> {out}"
    )
    return out


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, help="soft-label file to write (default: <output_dir>/<exp>/soft_labels.npz)")


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(argv, __doc__.splitlines()[0], _add_arguments, stage="distill")
    try:
        make_soft_labels(cfg, args.out)
    except PipelineError as e:
        log.error(str(e))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
