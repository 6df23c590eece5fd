"""Classification metrics: the one home of softmax, log-loss, accuracy, macro-F1 and per-class recall,
temperature scaling, and the post-hoc logit adjustment for long-tailed labels.

Every stage that scores predictions (train's validation, finetune, stack, package, report, score) calls
these, so a number means the same thing wherever it is printed. Probabilities are computed in float64
after subtracting each row's maximum, so large logits neither overflow nor give NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from lib.common import preview


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of [N, C] logits, float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of [N, C] logits, float64, rows summing to 1."""
    return np.exp(log_softmax(logits))


def nll(log_probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes ``y`` (int [N]) under ``log_probs`` [N, C]: the
    log-loss when the rows are normalised log-probabilities."""
    return float(-log_probs[np.arange(len(y)), y].mean())


def fit_temperature(
    logits: np.ndarray, labels: np.ndarray, *, t_range: tuple[float, float] = (0.05, 20.0)
) -> float:
    """Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017): the T within
    ``t_range`` minimising the mean log-loss of softmax(``logits`` / T) (float [N, C]) at the classes
    ``labels`` (int [N]). A row may hold -inf where it scores fewer classes than the widest (a re-ranker's
    padded candidate sets). The log-loss is convex in 1/T, so a bounded Brent search over log(1/T) finds its
    minimum; perfectly separated rows give the lower end of ``t_range``.

    Raises:
        ValueError: no rows.
    """
    from scipy.optimize import minimize_scalar  # fit time only: predict.py imports this module too

    if not len(labels):
        raise ValueError("temperature scaling needs at least one row")
    z = np.asarray(logits, np.float64)

    def loss(log_beta: float) -> float:
        return nll(log_softmax(np.exp(log_beta) * z), labels)

    lo, hi = t_range
    best = minimize_scalar(loss, bounds=(-np.log(hi), -np.log(lo)), method="bounded", options={"xatol": 1e-5})
    return float(np.exp(-best.x))


def adjust_logits(logits: np.ndarray, *, prior: np.ndarray, tau: float = 1.0) -> np.ndarray:
    """Post-hoc logit adjustment: ``logits - tau * log(prior)``, float64 [N, C].

    Menon et al., "Long-tail learning via logit adjustment" (ICLR 2021): a model trained on
    long-tailed labels estimates p(y|x), whose argmax favours frequent classes; subtracting tau x log of
    the training class prior (``prior`` [C], e.g. lib/data.class_prior of the training labels) moves the
    argmax towards the balanced error's optimum (tau 1 in theory, tuned on held-out data in practice).
    Not for a model trained with a logit-adjusted loss (train.py's ``logit_adjust_tau``): that one already
    predicts the adjusted logits.

    Raises:
        ValueError: ``prior`` does not have one positive entry per column of ``logits``.
    """
    logits = np.asarray(logits, dtype=np.float64)
    prior = np.asarray(prior, dtype=np.float64)
    if logits.ndim != 2 or prior.shape != (logits.shape[1],):
        raise ValueError(f"a prior of shape {prior.shape} does not fit logits of shape {logits.shape}")
    if not (prior > 0).all():
        raise ValueError("every class prior must be > 0 (its logarithm is subtracted)")
    return logits - tau * np.log(prior)


def classification_scores(y_true: Sequence[str], y_pred: Sequence[str], classes: Sequence[str]) -> dict:
    """Accuracy, macro-F1 over ``classes`` and each class's recall (None for classes absent from y_true)."""
    from sklearn.metrics import accuracy_score, f1_score, recall_score

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

    Log-loss is scikit-learn's on the softmax (the cross-entropy train.py logs as val_loss); it clips
    probabilities at float64's eps, so one confidently wrong image costs at most ~36.

    Raises:
        ValueError: the shapes disagree, a logit is NaN or inf, or a label is not among ``classes``.
    """
    from sklearn.metrics import log_loss

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
        raise ValueError(f"{len(unknown)} label(s) not among the classes: {preview(unknown, quote=True)}")
    s = classification_scores(y_true, [classes[i] for i in logits.argmax(axis=1)], classes)
    loss = log_loss([index[y] for y in y_true], softmax(logits), labels=list(range(len(classes))))
    return {"n": s["n"], "accuracy": s["accuracy"], "macro_f1": s["macro_f1"], "log_loss": float(loss)}


def index_scores(logits: np.ndarray, y: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """Accuracy, macro-F1 and log-loss of logits [N, C] against class indices ``y`` (int [N])."""
    s = logit_scores(logits, np.asarray(classes)[np.asarray(y)], classes)
    return {k: float(s[k]) for k in ("accuracy", "macro_f1", "log_loss")}


def val_scores(logits: np.ndarray, targets: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """A validation row as train.py and finetune.py log it: val_loss, accuracy, macro_f1."""
    s = index_scores(logits, targets, classes)
    return {"val_loss": s["log_loss"], "accuracy": s["accuracy"], "macro_f1": s["macro_f1"]}


def is_better(metric: Literal["accuracy", "macro_f1", "loss"], value: float, best: float | None) -> bool:
    """Whether ``value`` of ``metric`` beats ``best`` (lower for loss, higher otherwise; None: no best yet)."""
    if best is None:
        return True
    return value < best if metric == "loss" else value > best
