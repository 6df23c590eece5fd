"""Per-class logit bias: additive offsets on the final log-probabilities, fitted on OOF predictions so that
minority classes a skewed model never predicts get predicted, where that pays.

A classifier trained on skewed labels estimates p(y|x); its argmax is accuracy-optimal but leaves rare
classes under-predicted, and macro-F1 (or balanced accuracy) is maximised by other decision thresholds. The
post-hoc remedy is threshold moving: predict ``argmax_c log p(c|x) + b[c]``. Menon et al., "Long-tail
learning via logit adjustment" (ICLR 2021), take ``b = -tau log prior`` (lib/metrics.adjust_logits);
Lipton, Elkan and Naryanaswamy, "Thresholding Classifiers to Maximize F1 Score" (ECML PKDD 2014), show that
the F1-optimal threshold is not the calibrated one and must be fitted. Here every ``b[c]`` is fitted directly
for the objective (:func:`fit_offsets`, coordinate ascent over a grid), under an accuracy constraint, and the
gain is checked nested on the OOF folds before the offsets ship (:func:`fit_class_bias`).

**Many classes.** Each row is reduced to its ``candidates`` most probable classes (all of them when
C <= candidates, so exact for the demo's 4 classes): its adjusted argmax is taken among those (at predict
time over all C, which differs only where an offset lifts a class from outside a row's top ``candidates``
past its leader). A class in no row's frame keeps offset 0, and above ``max_classes`` such classes only the
``max_classes`` whose predicted count differs most from their count of labels are fitted. One sweep costs
O(N x candidates x grid) time (each class scans only the rows whose frame holds it), at most ``max_sweeps``
of them; memory O(N x candidates) plus bounded chunks. Measured here (2 busy cores): 200k images x 5,000
classes stored top-50, the nested check and the final fit together, 33 s and 0.45 GB peak.

This module needs numpy only (no scikit-learn, pandas or xgboost): predict.py applies the offsets
(:func:`apply_class_bias`) without training code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from lib.metrics import softmax
from lib.oof import Predictions, TopK

Objective = Literal["macro_f1", "balanced_accuracy"]
PROB_FLOOR = 1e-15  # lib.stacker.PROB_FLOOR (not imported: lib.stacker loads xgboost, predict.py must not)
CHUNK_CELLS = 1 << 22  # grid values x rows evaluated at once (~4M cells, ~100 MB of transient arrays)
TIE = 1e-12  # objective differences below this are ties (sums of ratios of counts)


@dataclass
class ClassBias:
    """What :func:`fit_class_bias` found. ``offsets`` float64 [C]: what ships (all zeros unless
    ``applied``); ``fitted``: the offsets fitted on all OOF rows, shipped or not; ``before`` / ``after``: the
    nested scores (accuracy, macro_f1, balanced_accuracy, never_predicted: classes with OOF rows that are
    never predicted) without and with the offsets; ``reason``: why they ship or not."""

    offsets: np.ndarray
    fitted: np.ndarray
    applied: bool
    reason: str
    before: dict[str, float]
    after: dict[str, float]
    objective: str
    max_accuracy_drop: float
    candidates: int

    def record(self) -> dict[str, Any]:
        """The manifest's ``class_bias`` entry (JSON): predict.py reads ``offsets`` when ``applied``."""
        return {
            "applied": self.applied, "reason": self.reason, "objective": self.objective,
            "max_accuracy_drop": self.max_accuracy_drop, "candidates": self.candidates,
            "offsets": self.offsets.tolist(), "nested": {"before": self.before, "after": self.after},
        }  # fmt: skip


@dataclass
class _Frame:
    """Each row's candidate classes (int64 [N, K]) and their log-probabilities (float64 [N, K])."""

    index: np.ndarray
    values: np.ndarray
    n_classes: int

    def rows(self, which: np.ndarray) -> _Frame:
        return _Frame(self.index[which], self.values[which], self.n_classes)

    def predict(self, offsets: np.ndarray) -> np.ndarray:
        """int64 [N]: each row's argmax of log-probability + offset among its candidates."""
        best = (self.values + offsets[self.index]).argmax(axis=1)
        return self.index[np.arange(len(best)), best]


def _frame(log_probs: Predictions, candidates: int) -> _Frame:
    """The candidate frame of dense log-probabilities [N, C] or a TopK of them."""
    if isinstance(log_probs, TopK):
        top = log_probs.truncate(candidates)
        return _Frame(np.asarray(top.index, np.int64), np.asarray(top.values, np.float64), top.n_classes)
    lp = np.asarray(log_probs)
    n, c = lp.shape
    if c > candidates:
        top = TopK.from_logits(lp, candidates)
        return _Frame(np.asarray(top.index, np.int64), np.asarray(top.values, np.float64), c)
    return _Frame(np.tile(np.arange(c, dtype=np.int64), (n, 1)), lp.astype(np.float64), c)


def _per_class(tp: np.ndarray, npred: np.ndarray, support: np.ndarray, objective: Objective) -> np.ndarray:
    """Each class's share of the objective: F1 (0 when neither predicted nor present) or recall."""
    if objective == "macro_f1":
        denom = npred + support
        return np.divide(2.0 * tp, denom, out=np.zeros(np.shape(tp)), where=denom > 0)
    return np.divide(tp, support, out=np.zeros(np.shape(tp)), where=support > 0)


def summary(pred: np.ndarray, labels: np.ndarray, *, n_classes: int) -> dict[str, float]:
    """Accuracy, macro-F1 (over all ``n_classes``, as lib.oof.scores_from), balanced accuracy (mean recall
    of the classes present) and the number of present classes never predicted, of int [N] predictions."""
    hit = pred == labels
    tp = np.bincount(labels[hit], minlength=n_classes).astype(np.float64)
    npred = np.bincount(pred, minlength=n_classes).astype(np.float64)
    support = np.bincount(labels, minlength=n_classes).astype(np.float64)
    present = support > 0
    return {
        "accuracy": float(hit.mean()),
        "macro_f1": float(_per_class(tp, npred, support, "macro_f1").mean()),
        "balanced_accuracy": float(_per_class(tp, npred, support, "balanced_accuracy")[present].mean()),
        "never_predicted": int((present & (npred == 0)).sum()),
    }


def _grid_scores(
    d: np.ndarray, alt: np.ndarray, yr: np.ndarray, plain: np.ndarray, c: int, grid: np.ndarray,
    base: dict[str, np.ndarray], objective: Objective,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """For each offset of ``grid``, of the rows whose frame holds class ``c``: the objective summed over the
    classes touched, the correct predictions, and the predictions that differ from the unadjusted ``plain``.
    A row predicts ``c`` when ``d + offset > 0`` (``d``: its log-probability of c less the best other
    adjusted one), else ``alt``; ``base``: the other rows' counts of the touched classes (``touched``,
    ``tp``, ``npred``, ``support``)."""
    touched = base["touched"]
    t = len(touched)
    col_c, col_alt = int(np.searchsorted(touched, c)), np.searchsorted(touched, alt)
    hit_c, hit_alt, moved_c, moved_alt = yr == c, alt == yr, plain != c, plain != alt
    obj, correct, changed = np.zeros(len(grid)), np.zeros(len(grid)), np.zeros(len(grid))
    step = max(1, CHUNK_CELLS // max(1, len(d)))
    for i in range(0, len(grid), step):
        g = grid[i : i + step]
        to_c = d[None, :] + g[:, None] > 0
        key = np.where(to_c, col_c, col_alt[None, :]) + t * np.arange(len(g))[:, None]
        hit = np.where(to_c, hit_c[None, :], hit_alt[None, :])
        npred = np.bincount(key.ravel(), minlength=len(g) * t).reshape(len(g), t) + base["npred"]
        tp = np.bincount(key.ravel(), weights=hit.ravel(), minlength=len(g) * t).reshape(len(g), t)
        tp += base["tp"]
        obj[i : i + step] = _per_class(tp, npred, base["support"], objective).sum(axis=1)
        correct[i : i + step] = hit.sum(axis=1)
        changed[i : i + step] = np.where(to_c, moved_c[None, :], moved_alt[None, :]).sum(axis=1)
    return obj, correct, changed


def _pick(obj: np.ndarray, feasible: np.ndarray, current: int) -> int:
    """The grid index to move to: the middle of the run of best feasible values nearest ``current`` (the
    widest margin on either side), or ``current`` when nothing feasible beats it."""
    best = obj[feasible].max()
    if best <= obj[current] + TIE:
        return current
    hits = np.flatnonzero(feasible & (obj >= best - TIE))
    near = hits[np.argmin(np.abs(hits - current))]
    lo = hi = near
    while lo - 1 in hits:
        lo -= 1
    while hi + 1 in hits:
        hi += 1
    return int((lo + hi) // 2)


class _Ascent:
    """Coordinate ascent over the offsets of one frame of rows: the state of the predictions and the
    per-class counts they give, updated one class at a time."""

    def __init__(self, fr: _Frame, labels: np.ndarray, *, grid: np.ndarray, objective: Objective,
                 max_accuracy_drop: float, margin: float) -> None:  # fmt: skip
        c = fr.n_classes
        self.fr, self.y, self.grid, self.objective = fr, labels, grid, objective
        self.offsets = np.zeros(c)
        self.at = np.full(c, int(np.argmin(np.abs(grid))))  # each offset's index in the grid
        self.plain = fr.predict(self.offsets)
        self.pred = self.plain.copy()
        hit = self.pred == labels
        self.tp = np.bincount(labels[hit], minlength=c).astype(np.float64)
        self.npred = np.bincount(self.pred, minlength=c).astype(np.float64)
        self.support = np.bincount(labels, minlength=c).astype(np.float64)
        self.correct, self.changed = int(hit.sum()), 0
        self.min_correct = self.correct - max_accuracy_drop * len(labels) - 1e-9
        self.margin = margin
        flat = fr.index.ravel()  # inverted index: the frame cells holding each class
        self.order = np.argsort(flat, kind="stable")
        self.bounds = np.searchsorted(flat[self.order], np.arange(c + 1))

    def classes(self, limit: int) -> list[int]:
        """The classes in some row's frame, rarest first (the ones a skewed model neglects); above ``limit``
        of them, the ``limit`` whose predicted count differs most from their count of labels."""
        held = np.flatnonzero(np.diff(self.bounds) > 0)
        if len(held) > limit:
            gap = np.abs(self.npred[held] - self.support[held])
            held = held[np.argsort(-gap, kind="stable")[:limit]]
        return held[np.argsort(self.support[held], kind="stable")].tolist()

    def step(self, c: int) -> bool:
        """Move class ``c``'s offset to its best feasible grid value; whether it moved."""
        pos = self.order[self.bounds[c] : self.bounds[c + 1]]
        rows, col = pos // self.fr.index.shape[1], pos % self.fr.index.shape[1]
        s = self.fr.values[rows] + self.offsets[self.fr.index[rows]]
        ar = np.arange(len(rows))
        s[ar, col] = -np.inf
        other = s.argmax(axis=1)
        alt, d = self.fr.index[rows, other], self.fr.values[rows, col] - s[ar, other]
        yr, old = self.y[rows], self.pred[rows]
        touched = np.union1d(np.union1d(alt, old), [c])  # the classes these rows may take: the others stay
        slot = np.searchsorted(touched, old)
        base = {
            "touched": touched, "support": self.support[touched],
            "tp": self.tp[touched] - np.bincount(slot[old == yr], minlength=len(touched)),
            "npred": self.npred[touched] - np.bincount(slot, minlength=len(touched)),
        }  # fmt: skip
        plain = self.plain[rows]
        obj, correct, changed = _grid_scores(d, alt, yr, plain, c, self.grid, base, self.objective)
        correct += self.correct - int((old == yr).sum())
        changed += self.changed - int((old != plain).sum())
        feasible = correct - self.min_correct >= self.margin * np.sqrt(changed)
        feasible[self.at[c]] = True  # where it stands was feasible when it got there
        new = _pick(obj, feasible, int(self.at[c]))
        if new == self.at[c]:
            return False
        self.at[c], self.offsets[c] = new, self.grid[new]
        pred = np.where(d + self.grid[new] > 0, c, alt)
        np.add.at(self.npred, old, -1.0)
        np.add.at(self.npred, pred, 1.0)
        np.add.at(self.tp, old[old == yr], -1.0)
        np.add.at(self.tp, pred[pred == yr], 1.0)
        self.correct += int((pred == yr).sum() - (old == yr).sum())
        self.changed += int((pred != plain).sum() - (old != plain).sum())
        self.pred[rows] = pred
        return True


def _fit(fr: _Frame, labels: np.ndarray, *, grid: np.ndarray, objective: Objective, max_accuracy_drop: float,
         max_sweeps: int, se_margin: float, max_classes: int) -> np.ndarray:  # fmt: skip
    """:func:`fit_offsets` on a frame: sweeps until none moves an offset, at most ``max_sweeps``."""
    ascent = _Ascent(
        fr, labels, grid=grid, objective=objective, max_accuracy_drop=max_accuracy_drop, margin=se_margin
    )
    classes = ascent.classes(max_classes)
    for _ in range(max_sweeps):
        if not sum(ascent.step(c) for c in classes):
            break
    return ascent.offsets


def _prepare(
    log_probs: Predictions, labels: np.ndarray, *, objective: str, max_accuracy_drop: float, se_margin: float,
    max_offset: float, step: float, max_sweeps: int, candidates: int, max_classes: int,
) -> tuple[_Frame, np.ndarray, dict[str, Any]]:  # fmt: skip
    """The frame, the labels (int64) and :func:`_fit`'s options, the grid among them (multiples of ``step``
    within +-max_offset, 0 included); ValueError naming a bad argument."""
    n, c = (len(log_probs), log_probs.n_classes) if isinstance(log_probs, TopK) else np.shape(log_probs)
    y = np.asarray(labels, dtype=np.int64)
    problems = []
    if y.shape != (n,) or (n and (y.min() < 0 or y.max() >= c)):
        problems.append(f"labels must be int [N] = [{n}] within 0..{c - 1}")
    if objective not in ("macro_f1", "balanced_accuracy"):
        problems.append(f"objective must be macro_f1 or balanced_accuracy, got {objective!r}")
    if not 0.0 <= max_accuracy_drop <= 1.0:
        problems.append(f"max_accuracy_drop must be within 0..1, got {max_accuracy_drop}")
    if se_margin < 0 or max_offset <= 0 or step <= 0 or min(max_sweeps, max_classes) < 1 or candidates < 2:
        problems.append(
            "needed: se_margin >= 0, max_offset and step > 0, max_sweeps and max_classes >= 1, "
            "candidates >= 2"
        )
    if problems:
        raise ValueError("class bias: " + "; ".join(problems))
    half = max(1, round(max_offset / step))
    options = {
        "grid": np.arange(-half, half + 1) * step, "objective": objective,
        "max_accuracy_drop": max_accuracy_drop, "max_sweeps": max_sweeps, "se_margin": se_margin,
        "max_classes": max_classes,
    }  # fmt: skip
    return _frame(log_probs, candidates), y, options


def fit_offsets(
    log_probs: Predictions, labels: np.ndarray, *, objective: Objective = "macro_f1",
    max_accuracy_drop: float = 0.0, se_margin: float = 1.0, max_offset: float = 4.0, step: float = 0.125,
    max_sweeps: int = 3, candidates: int = 20, max_classes: int = 500,
) -> np.ndarray:  # fmt: skip
    """Per-class offsets b float64 [C] maximising ``objective`` of ``argmax_c log_probs[:, c] + b[c]`` on
    these rows (no held-out check: :func:`fit_class_bias` adds it), keeping the accuracy above the
    unadjusted accuracy less ``max_accuracy_drop``.

    Coordinate ascent (threshold moving, Lipton et al. 2014): from zeros, each class in turn, rarest first,
    moves to its best grid value (multiples of ``step`` within +-``max_offset``) given the others, to the
    middle of the best run of values (the widest margin), only when the objective strictly rises; sweeps
    over the classes repeat until none moves, at most ``max_sweeps``. Each row's argmax is taken among its
    ``candidates`` most probable classes (module docstring). **Accuracy margin**: an offset pinned to the
    edge of the accuracy constraint on the rows it was fitted on loses accuracy on new rows (measured: about
    0.3% on 2,000 synthetic ELPV-like rows); so the correct predictions must exceed the limit by
    ``se_margin`` standard errors of the change, sqrt(rows whose prediction changed) (each changed row counts
    +1, -1 or 0): a one-standard-error rule (Breiman et al., "Classification and Regression Trees", 1984).

    Args:
        log_probs: log-probabilities (or logits: the offsets shift either alike), float [N, C], or a
            lib.oof.TopK of them; labels: true classes, int [N].

    Raises:
        ValueError: labels out of range or of another length, or a setting out of range.
    """
    fr, y, options = _prepare(
        log_probs, labels, objective=objective, max_accuracy_drop=max_accuracy_drop, se_margin=se_margin,
        max_offset=max_offset, step=step, max_sweeps=max_sweeps, candidates=candidates,
        max_classes=max_classes,
    )  # fmt: skip
    return _fit(fr, y, **options)


def fit_class_bias(
    log_probs: Predictions, labels: np.ndarray, *, folds: np.ndarray, objective: Objective = "macro_f1",
    max_accuracy_drop: float = 0.0, se_margin: float = 1.0, max_offset: float = 4.0, step: float = 0.125,
    max_sweeps: int = 3, candidates: int = 20, max_classes: int = 500,
) -> ClassBias:  # fmt: skip
    """Per-class offsets for the final log-probabilities, with a nested check that they pay.

    Post-hoc threshold moving (Menon et al. 2021, "Long-tail learning via logit adjustment"; Lipton et al.
    2014, "Thresholding Classifiers to Maximize F1 Score"), fitted by :func:`fit_offsets`. **Nested**: for
    each fold the offsets are fitted on the other folds' rows and applied to that fold's, so ``after``
    scores offsets on rows they never saw; the offsets that ship are fitted on all rows. They ship
    (``applied``) only when the nested ``objective`` rises and the nested accuracy falls by at most
    ``max_accuracy_drop``; otherwise the offsets are zeros and ``reason`` says why (also with one fold).

    ``log_probs`` must be out-of-fold for every row (a stacker's nested OOF, never predictions of a model that
    saw the row): float [N, C] log-probabilities (or logits) or a lib.oof.TopK of them; ``labels``: int [N];
    ``folds``: each row's fold id, int [N]. The other settings: :func:`fit_offsets`. (With a stacker's nested
    OOF, the other folds' rows were predicted by stackers whose training included fold k: its labels reach
    fold k's offsets only through them. On ~2,000 rows the check cannot see accuracy changes below ~0.3%.)

    Raises:
        ValueError: ``folds`` or ``labels`` of another length, labels out of range, a setting out of range.
    """
    fr, y, options = _prepare(
        log_probs, labels, objective=objective, max_accuracy_drop=max_accuracy_drop, se_margin=se_margin,
        max_offset=max_offset, step=step, max_sweeps=max_sweeps, candidates=candidates,
        max_classes=max_classes,
    )  # fmt: skip
    folds = np.asarray(folds)
    if folds.shape != y.shape:
        raise ValueError(f"class bias: folds of shape {folds.shape} for {len(y)} rows")
    plain = fr.predict(np.zeros(fr.n_classes))
    nested = plain.copy()
    for k in np.unique(folds):  # a single fold fits on no rows: zeros, nested = plain
        held = folds == k
        nested[held] = fr.rows(held).predict(_fit(fr.rows(~held), y[~held], **options))
    before, after = summary(plain, y, n_classes=fr.n_classes), summary(nested, y, n_classes=fr.n_classes)
    fitted = _fit(fr, y, **options)
    reason, pays = _decide(before, after, objective, max_accuracy_drop, folds=len(np.unique(folds)))
    if pays and not fitted.any():  # the fit on all rows, with its larger accuracy margin, moved nothing
        reason, pays = f"{reason}, but the fit on all rows keeps every offset at 0: nothing to ship", False
    return ClassBias(
        fitted if pays else np.zeros(fr.n_classes), fitted, pays, reason, before, after, objective,
        max_accuracy_drop, fr.index.shape[1],
    )  # fmt: skip


def _decide(before: dict[str, float], after: dict[str, float], objective: str, max_accuracy_drop: float, *,
            folds: int) -> tuple[str, bool]:  # fmt: skip
    """(why, whether the offsets ship) from the nested scores without and with them."""
    change = (
        f"nested {objective} {before[objective]:.4f} -> {after[objective]:.4f}, accuracy "
        f"{before['accuracy']:.4f} -> {after['accuracy']:.4f}"
    )
    if folds < 2:
        return "a single fold: the gain cannot be checked on rows the offsets never saw", False
    if after[objective] <= before[objective] + TIE:
        return f"does not pay: {change}", False
    if after["accuracy"] < before["accuracy"] - max_accuracy_drop - TIE:
        return f"costs accuracy beyond max_accuracy_drop {max_accuracy_drop}: {change}", False
    return f"pays: {change}", True


def apply_class_bias(probs: np.ndarray, *, offsets: np.ndarray) -> np.ndarray:
    """softmax(log probs + offsets): the class probabilities float64 [N, C] after the per-class offsets
    float [C] (probabilities floored at PROB_FLOOR before the log, as lib.stacker.log_probs does)."""
    return softmax(np.log(np.clip(probs, PROB_FLOOR, 1.0)) + np.asarray(offsets, np.float64))


def stored_offsets(record: dict[str, Any] | None, *, n_classes: int) -> np.ndarray | None:
    """The offsets float64 [C] a manifest's ``class_bias`` entry ships; None when it has none (a bundle from
    before this key), ships none, or all are zero: prediction is then unchanged.

    Raises:
        ValueError: the entry's offsets are not ``n_classes`` finite numbers.
    """
    if not record or not record.get("applied"):
        return None
    offsets = np.asarray(record.get("offsets"), dtype=np.float64)
    if offsets.shape != (n_classes,) or not np.isfinite(offsets).all():
        raise ValueError(f"class_bias offsets of shape {offsets.shape} for {n_classes} classes")
    return offsets if offsets.any() else None
