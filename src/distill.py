"""Soft labels for self-distillation from an experiment's out-of-fold logits.

``python src/distill.py --config configs/X.yaml [--out FILE]`` reads ``<output_dir>/<exp>/oof.npz`` (the
teacher: the experiment named by ``exp``) and writes ``<output_dir>/<exp>/soft_labels.npz``, one row per
row of folds.csv::

    soft = distill_alpha * one_hot(label) + (1 - distill_alpha) * softmax(OOF logits / distill_temperature)

Each image's soft label comes from the fold model that validated it, never from one trained on it: the
teacher's fold ids are checked against folds.csv. The file is lib/oof.py's (key ``log_targets``: the soft
labels' logarithms, floored at ``LOG_FLOOR``), dense when small; above ``store_dense_max_cells`` each row keeps
the ``store_topk`` largest soft probabilities, its true class always among them, and the residual mass, which
train.py spreads evenly over the other classes. The teacher is streamed a chunk of rows at a time, so neither
side is ever held as [N, C] float32 (a top-k teacher's rows are its TopK.dense(): with a temperature other
than 1 the classes outside its top k share its residual evenly). Train the student on them with
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
from lib.oof import (
    LOG_FLOOR,
    SOFT_KEY,
    Aligned,
    Collector,
    OOFError,
    Predictions,
    TopK,
    open_aligned,
    rows_per_chunk,
    write_oof,
)

log = get_logger("distill")


def _soft64(logits: np.ndarray, labels: np.ndarray, alpha: float, temperature: float) -> np.ndarray:
    one_hot = np.zeros(logits.shape)
    one_hot[np.arange(len(labels)), labels] = 1.0
    return alpha * one_hot + (1 - alpha) * softmax(np.asarray(logits, np.float64) / temperature)


def soft_targets(logits: np.ndarray, labels: np.ndarray, alpha: float, temperature: float) -> np.ndarray:
    """alpha x one-hot(labels) + (1 - alpha) x softmax(logits / T): float32 [N, C], rows summing to 1.

    ``logits`` float [N, C] out-of-fold; ``labels`` int [N] class indices (Hinton et al. 2015's soft
    targets, taken from OOF predictions as Kaggle's self-distillation write-ups do).
    """
    return _soft64(logits, labels, alpha, temperature).astype(np.float32)


def log_soft_targets(logits: np.ndarray, labels: np.ndarray, alpha: float, temperature: float) -> np.ndarray:
    """log of :func:`soft_targets`, computed in float64 and floored at LOG_FLOOR (a zero probability, e.g.
    alpha 1): float64 [N, C], what a soft-label file stores."""
    return np.log(np.maximum(_soft64(logits, labels, alpha, temperature), np.exp(LOG_FLOOR)))


def distill_rows(
    teacher: Aligned, labels: np.ndarray, *, alpha: float, temperature: float, dense_max_cells: int, topk: int
) -> tuple[Predictions, float, float]:
    """The soft labels of every row of ``teacher`` (OOF logits in folds.csv order; ``labels`` int [N] their
    classes) in the store's format, a chunk of rows at a time: float16 [N, C] log-probabilities, or their
    TopK with each row's true class kept. Also the teacher's accuracy and the mean soft weight on the true
    class.

    Raises:
        OOFError: a teacher row holds NaN or inf.
    """
    c = teacher.stored.n_classes
    out = Collector(len(teacher), c, dense_max_cells=dense_max_cells, topk=topk)
    correct, weight = 0, 0.0
    for where, part in teacher.chunks(rows=rows_per_chunk(c)):
        y = labels[where]
        logits = part.dense() if isinstance(part, TopK) else part
        log_soft = log_soft_targets(logits, y, alpha, temperature)
        correct += int((logits.argmax(axis=1) == y).sum())
        weight += float(np.exp(log_soft[np.arange(len(y)), y]).sum())
        out.put(where, TopK.from_logits(log_soft, out.k, keep=y) if out.is_topk else log_soft)
    n = max(1, len(teacher))
    return out.result(), correct / n, weight / n


def make_soft_labels(cfg: Config, out: Path | None = None) -> Path:
    """Write the soft labels of every folds.csv image from the ``cfg.exp`` teacher's OOF logits.

    Raises:
        LayoutError: folds.csv is missing. OOFError: the teacher's OOF is missing or does not match folds.csv.
    """
    folds = read_folds(cfg.folds_csv)
    classes = class_names(folds)
    teacher = experiment(cfg.output_dir, cfg.exp)
    labels = targets(folds, classes)
    try:
        soft, agree, weight = distill_rows(
            open_aligned(teacher.oof, folds, classes), labels, alpha=cfg.distill_alpha,
            temperature=cfg.distill_temperature, **cfg.store_options(),
        )  # fmt: skip
    except OOFError as e:
        raise OOFError(f"teacher {cfg.exp!r}: {e} (retrain the teacher on the current folds.csv)") from None
    out = Path(out) if out else teacher.soft_labels
    write_oof(out, folds, soft, classes, key=SOFT_KEY, **cfg.store_options())
    log.info(
        f"{len(folds)} soft labels from {teacher.oof} (teacher OOF accuracy {agree:.4f}; alpha "
        f"{cfg.distill_alpha}, T {cfg.distill_temperature}; mean weight on the true class {weight:.3f}; "
        f"{'top-' + str(soft.k) if isinstance(soft, TopK) else 'dense'}) -> {out}"
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
