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
import pandas as pd

from folds import read_folds
from lib.common import get_logger
from lib.config import Config, parse_config
from lib.oof import OOFError, aligned, write_oof

log = get_logger("distill")

SOFT_KEY = "targets"


def soft_targets(logits: np.ndarray, labels: np.ndarray, alpha: float, temperature: float) -> np.ndarray:
    """alpha x one-hot(labels) + (1 - alpha) x softmax(logits / T), rows summing to 1 (float32)."""
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    one_hot = np.eye(logits.shape[1])[labels]
    return (alpha * one_hot + (1 - alpha) * p).astype(np.float32)


def _classes_of(folds: pd.DataFrame) -> list[str]:
    """The class list every stage derives from folds.csv (train.load_fold uses the same order)."""
    return sorted(folds["label"].unique().tolist())


def make_soft_labels(cfg: Config, out: Path | None = None) -> Path:
    """Write the soft labels of every folds.csv image from the ``cfg.exp`` teacher's OOF logits."""
    folds_path = Path(cfg.folds_csv)
    if not folds_path.is_file():
        raise OOFError(f"{folds_path} not found: run python src/folds.py --config <your config> first")
    folds = read_folds(folds_path)
    teacher = cfg.exp_dir / "oof.npz"
    logits, classes = aligned(teacher, folds)
    if classes != _classes_of(folds):
        raise OOFError(
            f"{teacher} was trained on classes {classes} but {folds_path} has {_classes_of(folds)}: "
            "retrain the teacher on the current folds.csv"
        )
    labels = folds["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    soft = soft_targets(logits, labels, cfg.distill_alpha, cfg.distill_temperature)
    out = Path(out) if out else cfg.exp_dir / "soft_labels.npz"
    write_oof(out, folds, soft, classes, key=SOFT_KEY)
    agree = float((logits.argmax(1) == labels).mean())
    log.info(
        f"{len(soft)} soft labels from {teacher} (teacher OOF accuracy {agree:.4f}; alpha "
        f"{cfg.distill_alpha}, T {cfg.distill_temperature}; mean weight on the true class "
        f"{soft[np.arange(len(soft)), labels].mean():.3f}) -> {out}"
    )
    return out


def load_soft_labels(path: Path, folds: pd.DataFrame) -> np.ndarray:
    """Soft-label rows aligned with ``folds`` (all of folds.csv), refusing leaked or mismatched files."""
    soft, classes = aligned(Path(path), folds, key=SOFT_KEY)
    if classes != _classes_of(folds):
        raise OOFError(
            f"{path} has classes {classes} but folds.csv has {_classes_of(folds)}: rebuild it with "
            "python src/distill.py from a teacher trained on the current folds.csv"
        )
    if not np.all(np.isfinite(soft)) or np.any(soft < 0) or not np.allclose(soft.sum(1), 1, atol=1e-3):
        raise OOFError(f"{path}: soft labels must be finite, non-negative rows summing to 1: rebuild it")
    return soft


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, help="soft-label file to write (default: <output_dir>/<exp>/soft_labels.npz)")


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(argv, __doc__.splitlines()[0], _add_arguments, stage="distill")
    try:
        make_soft_labels(cfg, args.out)
    except OOFError as e:
        log.error(str(e))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
