"""The stacker: combines several members' out-of-fold logits into class probabilities.

The one home of fitting, saving, loading and applying a combiner; src/stack.py (the comparison report) and
src/package.py (the stacker that ships in the bundle) both fit through :func:`fit_stacker`, and
src/predict.py loads what package.py saved with :meth:`Stacker.load`, which needs numpy and xgboost only.

Members are dense logits, float [N, C], or :class:`lib.oof.TopK` (each row's k largest logits and the
log-sum-exp of the other C - k: the prediction store's form at thousands of classes). Five kinds, simplest
first (``auto`` ties go to the simpler one):

- ``single``: the member with the lowest log-loss on the fitting rows, alone;
- ``mean``: softmax of the mean of the members' log-probabilities (``features="logits"``) or the mean of
  their probabilities (``"probs"``);
- ``blend``: non-negative weights summing to 1 over the members' log-probabilities plus one global
  temperature, fitted by minimising log-loss (scipy's L-BFGS-B, analytic gradient);
- ``xgboost``: XGBoost ``multi:softprob`` over the concatenated members' logits (or probabilities),
  [N, M*C] (Wolpert's stacked generalisation, as Kaggle winners apply it to fold-model logits). Its rounds
  are chosen by early stopping on an inner fold *of the fitting rows*; the final stacker, refitted on all
  OOF, takes the median of the nested fits' rounds;
- ``rerank``: a candidate re-ranker, XGBoost at any class count (below).

Every comparison is **nested**: the prediction for fold k comes from a combiner fitted on the other folds
only, so the table never rewards a combiner for memorising its own training rows. **Class threshold**:
above ``max_classes`` (default 50) multi-class XGBoost is not fitted: it sees M*C features and grows C trees
per round, each scanning histograms of all M*C features, so a round costs ~ N*M*C^2 (measured here, 2,000
images x 3 members, one thread: 0.04 s per round at 10 classes, 0.6 s at 50, 7 s at 200).

**Top-k members.** With TopK members, mean and blend work on each image's *candidate frame*: the union of
the members' kept classes (at most W = min(C, sum of the k's) columns, padded to W with classes outside it),
where a member's logit for a class it did not keep is its even spread ``rest - log(C - k)``
(:meth:`TopK.dense`'s convention), and the C - W classes outside the frame share one value per member. That
is exact for what the members kept, costs O(N*M*W) whatever C, and gives a TopK of log-probabilities.

**The re-ranker**: learning to rank's two stages, candidate generation then a gradient-boosted re-ranker
over per-candidate features (LambdaMART: Burges, "From RankNet to LambdaRank to LambdaMART: An Overview",
Microsoft Research MSR-TR-2010-82; XGBoost's ``rank:*`` objectives implement it), the members being the
candidate generators:

- *Candidates*: per image, the union of the members' top ``candidates`` classes (all classes when
  C <= candidates). One row per (image, candidate), 5M + 5 features: per member its logit, its probability
  (softmax over all C, exact through TopK's ``rest``), its rank among that member's classes (1..k; k + 1
  outside its top k), its margin to the member's own top-1 logit, and the member's entropy; then the mean
  and the maximum of the members' probabilities, how many members rank it first, how many keep it in their
  top k, and the class's frequency among the fitting rows' labels. For the fitting rows themselves that
  frequency comes from the *other* folds of the fitting rows (out-of-fold counts): a row's own label never
  enters its feature (a leave-one-out count would: positives would always show count - 1, which trees
  decode), and a class seen in one fold only looks as rare in training as it will on unseen images; scoring
  uses the counts over all fitting rows. The entropy is computed from the top k exactly plus the rest's
  mass spread evenly over its C - k classes: the largest entropy the rest can have, so an upper bound of
  the member's true entropy.
- *Learning*: XGBoost, ``binary:logistic`` (is this candidate the truth?) or ``rank:pairwise`` /
  ``rank:ndcg`` with the image as query (``rerank_objective``). Measured nested: on tests/test_stacker.py's
  class-dependent case binary:logistic scored log-loss 0.62, rank:pairwise 0.65, rank:ndcg 0.67 (ndcg
  early-stopped after 2 rounds in one fold); on 200k synthetic images x 5,000 classes x 3 members, binary
  1.293 and ndcg 1.284 in about the same time, ndcg's rounds and temperature unstable across folds (53 to
  194 rounds, T 0.70 to 0.99). Default: binary:logistic, the steadier. Rounds by early stopping on an inner
  fold of the fitting rows (on its log-loss, or NDCG), as the multi-class kind. Above ``rerank_rows``
  candidate rows, training keeps every positive row and a seeded uniform share of the negatives: for the
  binary objective that shifts every margin by the same log(sampling rate), which the per-image softmax
  below cancels.
- *Probabilities*: within an image, softmax(score / T) over its candidates, T fitted (1-D, bounded) on the
  inner held-out fold's full candidate sets with the early-stopping booster, so T is an out-of-sample
  calibration; times (1 - q_i). The q_i is the *none of the candidates* mass, shared evenly by the C - |U_i|
  classes outside image i's candidate set: q_i = sigmoid(b0 + b1 * x_i), x_i = log of the members' mean
  probability outside the candidate set, fitted by logistic regression (Newton) on the fitting rows'
  indicator "truth outside the candidates", with one pseudo-miss and one pseudo-hit at the mean x (Laplace),
  so q_i > 0 whenever a class is outside: the log-loss stays finite, and q follows the OOF rate at which the
  truth escapes the candidates. The final stacker takes the nested fits' median rounds and median T.
- *Cost*: time linear in the candidate rows (N x about M*k), whatever C; memory bounded whatever N: frames
  are built FRAME_CELLS at a time (fitting keeps only the sampled rows, at most ``rerank_rows``, and the
  temperature images' rows; predicting keeps the output, a TopK of N x W). Nothing in this path allocates
  N x C except a dense :meth:`Stacker.predict_proba` output; :meth:`Stacker.predict_topk` returns a TopK.
  Every kind predicts a chunk of images at a time, and the blend fits its M + 1 parameters on a seeded
  subsample of at most BLEND_CELLS member x image x column cells.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import xgboost as xgb

from lib.common import PipelineError, atomic_path, atomic_write, get_logger
from lib.metrics import fit_temperature, log_softmax, softmax
from lib.oof import Predictions, TopK, prediction_scores

if TYPE_CHECKING:
    import pandas as pd

log = get_logger("stacker")

KINDS = ("single", "mean", "blend", "xgboost", "rerank")  # simplest first: ties in auto go to the simpler one
OBJECTIVES = ("binary:logistic", "rank:pairwise", "rank:ndcg")  # the re-ranker's XGBoost objectives
STACKER_FILE = "stacker.json"
XGB_FILE = "xgb_model.ubj"
FORMAT = 1
PROB_FLOOR = 1e-15  # log(0) would make an OOF file unscorable; exp(-34.5) is "impossible" enough
BLEND_LOG_T = 3.0  # the blend's temperature stays within e^-3..e^3 (0.05..20): beyond is degenerate
BLEND_LOGIT_W = 30.0  # weight logits bounded: e^-60 is zero for every purpose, and L-BFGS-B stays finite
INNER_FRACTION = 0.2  # held-out share for early stopping when the rows given span a single fold
RERANK_LOG_T = 5.0  # the re-ranker's temperature within e^-5..e^5: room for any objective's score scale
NONE_LOGIT = 30.0  # the none-of-the-candidates mass within sigmoid(-30..30): never exactly 0 or 1
TEMPERATURE_IMAGES = 20_000  # held-out images the re-ranker's temperature is fitted on (one parameter)
FRAME_CELLS = 1 << 21  # member x image x column cells of frames built at once: ~150 MB of transient arrays
BLEND_CELLS = 1 << 23  # the blend fits on a seeded subsample of at most this many such cells (M + 1 parameters)
REBUILD = "re-run python src/package.py (it fits the stacker that ships)"


class StackError(PipelineError, ValueError):
    """The members or settings cannot be stacked; the message names the experiment and the fix."""


def log_probs(p: Predictions) -> Predictions:
    """log of probabilities [N, C], floored at PROB_FLOOR so a zero stays scorable; a TopK of
    log-probabilities (what kinds give for top-k members) is returned with its values floored alike."""
    if isinstance(p, TopK):
        return TopK(p.index, np.maximum(p.values, np.log(PROB_FLOOR)), p.rest, p.n_classes)
    return np.log(np.clip(p, PROB_FLOOR, 1.0))


def _shape(m: Predictions) -> tuple[int, int]:
    """(N, C) of dense logits or a TopK."""
    return (len(m), m.n_classes) if isinstance(m, TopK) else m.shape


def _take(m: Predictions, rows: np.ndarray | slice) -> Predictions:
    """The rows ``rows`` (indices, a mask or a slice) of dense logits or a TopK."""
    return m.rows(rows) if isinstance(m, TopK) else m[rows]


def _truth_logp(m: Predictions, y: np.ndarray) -> np.ndarray:
    """float64 [N]: each row's log-softmax of its true class (TopK: the even spread outside the top k)."""
    if isinstance(m, TopK):
        return m.log_prob(y)
    return log_softmax(m)[np.arange(len(y)), y]


def best_member(members: Sequence[Predictions], y: np.ndarray) -> int:
    """Index of the member with the lowest log-loss on these rows (the first one on ties)."""
    return int(np.argmin([-_truth_logp(m, y).mean() for m in members]))


def _lse(a: np.ndarray, axis: int = -1) -> np.ndarray:
    """log-sum-exp along ``axis`` (float64; a row of -inf gives -inf)."""
    a = np.asarray(a, np.float64)
    top = np.max(a, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(top, axis) + np.log(np.exp(a - top).sum(axis=axis))


def _segment_lse(v: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """log-sum-exp of consecutive segments of ``v`` [R] of lengths ``counts`` [n] (each >= 1), float64 [n]."""
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    top = np.maximum.reduceat(v, starts)
    return top + np.log(np.add.reduceat(np.exp(v - np.repeat(top, counts)), starts))


def _inner_split(folds: np.ndarray, seed: int) -> np.ndarray:
    """Rows held out for early stopping, all among the rows given: the last of their folds (a whole fold, so
    near-duplicate groups do not straddle the split), or a seeded share when they span one fold (2-fold CV)."""
    present = np.unique(folds)
    if len(present) >= 2:
        return folds == present[-1]
    n = len(folds)
    held = np.zeros(n, dtype=bool)
    k = min(n - 1, max(1, round(INNER_FRACTION * n)))
    held[np.random.default_rng(seed).choice(n, size=k, replace=False)] = True
    return held


def _boost(
    params: dict,
    x: np.ndarray,
    y: np.ndarray,
    rounds: int,
    x_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    early_stop: int = 0,
    *,
    qid: np.ndarray | None = None,
    qid_val: np.ndarray | None = None,
) -> xgb.Booster:
    """XGBoost for ``rounds`` rounds, or until ``early_stop`` rounds pass without a better (x_val, y_val).
    ``qid``/``qid_val``: each row's query (image) for ranking objectives, non-decreasing. The data go in as
    a QuantileDMatrix: the histogram index is built once from the arrays, with no float copy kept."""
    train = xgb.QuantileDMatrix(x, label=y, qid=qid, nthread=params["nthread"])
    if x_val is None:
        return xgb.train(params, train, num_boost_round=rounds, verbose_eval=False)
    val = xgb.QuantileDMatrix(x_val, label=y_val, qid=qid_val, ref=train, nthread=params["nthread"])
    return xgb.train(
        params, train, num_boost_round=rounds, evals=[(val, "inner")], early_stopping_rounds=early_stop,
        verbose_eval=False,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Candidate frames: the classes of each image worth computing on.


@dataclass
class Frame:
    """Per image W columns and each member's logit on them. Dense members: every class (``cand`` None,
    column j is class j, ``z`` their log-softmax). TopK members: ``cand`` int32 [N, W], first the union of the
    members' kept classes (``n_cand`` [N] of them, ascending), then padding classes outside it; ``z`` float
    [M, N, W] the members' logits there (a class outside a member's top k: its ``fill``); ``lse`` float64
    [M, N] each member's log-sum-exp over all C; ``fill`` float64 [M, N] each member's logit for a class
    outside its top k (TopK.fill); ``ks`` [M] the members' k; ``rank`` int16 [M, N, W] 1-based rank in the
    member's top k (k + 1 outside); ``top1`` [M, N] its largest logit; ``entropy`` [M, N] (module docstring).
    """

    cand: np.ndarray | None
    n_cand: np.ndarray | None
    z: np.ndarray
    lse: np.ndarray
    fill: np.ndarray
    n_classes: int
    ks: np.ndarray | None = None
    rank: np.ndarray | None = None
    top1: np.ndarray | None = None
    entropy: np.ndarray | None = None

    @property
    def width(self) -> int:
        return self.z.shape[2]

    @property
    def log_mult(self) -> float:
        """log of how many classes lie outside the frame (-inf when none)."""
        return float(np.log(self.n_classes - self.width)) if self.n_classes > self.width else -np.inf

    def logp(self) -> np.ndarray:
        """float64 [M, N, W]: the members' log-probabilities on the frame's columns."""
        return self.z - self.lse[..., None]

    def out_logp(self) -> np.ndarray:
        """float64 [M, N]: each member's log-probability of one class outside the frame (0 when none is)."""
        return self.fill - self.lse if self.n_classes > self.width else np.zeros_like(self.lse)

    def valid(self) -> np.ndarray:
        """bool [N, W]: the candidate (non-padding) columns."""
        return np.arange(self.width) < self.n_cand[:, None]

    def column_of(self, y: np.ndarray) -> np.ndarray:
        """int [N]: the column of each row's true class, -1 when it lies outside the frame."""
        if self.cand is None:
            return np.asarray(y)
        hit = self.cand == np.asarray(y)[:, None]
        return np.where(hit.any(axis=1), hit.argmax(axis=1), -1)

    def covered(self, y: np.ndarray) -> np.ndarray:
        """bool [N]: whether each row's true class is among its candidates (not padding)."""
        return ((self.cand == np.asarray(y)[:, None]) & self.valid()).any(axis=1)

    @classmethod
    def dense(cls, members: Sequence[np.ndarray]) -> Frame:
        """The frame of dense members: all C columns, ``z`` their log-softmax (so ``lse`` is 0)."""
        z = np.stack([log_softmax(m) for m in members])
        zeros = np.zeros(z.shape[:2])
        return cls(None, None, z, zeros, zeros, z.shape[2])

    @classmethod
    def union(cls, tops: Sequence[TopK]) -> Frame:
        """The candidate frame of TopK members (the union of their kept classes, padded to W columns)."""
        c = tops[0].n_classes
        w = min(c, sum(t.k for t in tops))
        s = np.sort(np.concatenate([np.asarray(t.index) for t in tops], axis=1), axis=1)
        new = np.ones(s.shape, bool)
        new[:, 1:] = s[:, 1:] != s[:, :-1]
        n_cand = new.sum(axis=1)
        uniq = np.take_along_axis(s, np.argsort(~new, axis=1, kind="stable"), axis=1)[:, :w]
        cand = np.where(np.arange(w) < n_cand[:, None], uniq, _padding(uniq, n_cand, c)).astype(np.int32)
        looked = [_lookup(t, cand) for t in tops]
        values = [np.asarray(t.values, np.float64) for t in tops]
        lse = np.stack([t.log_norm() for t in tops])
        fill = np.stack([t.fill() for t in tops])
        entropy = np.stack([_entropy(v, t, norm) for v, t, norm in zip(values, tops, lse, strict=True)])
        return cls(
            cand, n_cand, np.stack([z for z, _ in looked]), lse, fill, c, np.array([t.k for t in tops]),
            np.stack([r for _, r in looked]), np.stack([v[:, 0] for v in values]), entropy,
        )  # fmt: skip


def _padding(uniq: np.ndarray, n_cand: np.ndarray, c: int) -> np.ndarray:
    """[N, W]: from column n_cand[i] on, distinct classes outside row i's union (the smallest such ids:
    among the first min(C, 2W) classes at least W - n_cand[i] are free)."""
    n, w = uniq.shape
    p = min(c, 2 * w)
    taken = np.zeros((n, p), bool)
    r, j = np.nonzero((np.arange(w) < n_cand[:, None]) & (uniq < p))
    taken[r, uniq[r, j]] = True
    free = np.argsort(taken, axis=1, kind="stable")  # free class ids first, ascending
    return np.take_along_axis(free, np.clip(np.arange(w) - n_cand[:, None], 0, p - 1), axis=1)


def _lookup(t: TopK, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Member ``t``'s logits (float32) and 1-based ranks (int16, k + 1 when not kept) on ``cand`` [N, W]:
    one global sorted search of (row, class) keys, no per-row loop."""
    n, k, c = len(t), t.k, t.n_classes
    index = np.asarray(t.index, np.int64)
    order = np.argsort(index, axis=1)
    base = np.arange(n, dtype=np.int64)[:, None] * c
    keys = (base + np.take_along_axis(index, order, axis=1)).ravel()
    query = base + cand
    pos = np.minimum(np.searchsorted(keys, query.ravel()), n * k - 1).reshape(query.shape)
    hit = keys[pos] == query
    slot = order.ravel()[pos]  # the column of that class in the member's (descending) row
    values = np.take_along_axis(np.asarray(t.values, np.float32), slot, axis=1)
    z = np.where(hit, values, t.fill()[:, None].astype(np.float32))
    return z, np.where(hit, slot + 1, k + 1).astype(np.int16)


def _entropy(values: np.ndarray, t: TopK, lse: np.ndarray) -> np.ndarray:
    """float64 [N]: a member's entropy from its top k (exact) and its rest spread evenly (an upper bound)."""
    lp = values - lse[:, None]
    top = -(np.exp(lp) * lp).sum(axis=1)
    if t.k >= t.n_classes:
        return top
    log_rest = np.asarray(t.rest, np.float64) - lse
    with np.errstate(invalid="ignore"):  # a rest of -inf (nothing left) contributes 0
        tail = -np.exp(log_rest) * (log_rest - np.log(t.n_classes - t.k))
    return top + np.nan_to_num(tail, nan=0.0)


def _frame_cells(members: Sequence[Predictions]) -> int:
    """Member x column cells per image of the members' frame: M x W (W = min(C, sum of the k's) for TopK
    members, C for dense ones)."""
    n_classes = _shape(members[0])[1]
    widths = [m.k if isinstance(m, TopK) else n_classes for m in members]
    width = n_classes if all(isinstance(m, np.ndarray) for m in members) else min(n_classes, sum(widths))
    return len(members) * width


def _chunks(n: int, cells_per_row: int) -> list[slice]:
    """Consecutive row slices of about FRAME_CELLS cells each (at least one row)."""
    step = max(1, FRAME_CELLS // max(1, cells_per_row))
    return [slice(a, min(a + step, n)) for a in range(0, n, step)]


def _frame(members: Sequence[Predictions], k: int) -> Frame:
    """The frame of the members: dense when all are dense, else their candidate union (a dense member
    among TopK ones contributes its top ``k``)."""
    if all(isinstance(m, np.ndarray) for m in members):
        return Frame.dense(members)
    return Frame.union([m if isinstance(m, TopK) else TopK.from_logits(m, k) for m in members])


def _normalise(fr: Frame, a: np.ndarray, a_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Log-probabilities from unnormalised log-scores on the frame's columns [N, W] and of each class
    outside it [N]."""
    z = np.logaddexp(_lse(a, axis=1), a_out + fr.log_mult)
    return a - z[:, None], a_out - z


def _output(fr: Frame, values: np.ndarray, out: np.ndarray) -> Predictions:
    """Dense probabilities [N, C] (dense frame) or a TopK of log-probabilities (``rest``: the mass outside
    the frame), columns in descending order."""
    if fr.cand is None:
        return np.exp(values)
    order = np.argsort(-values, axis=1, kind="stable")
    index = np.take_along_axis(fr.cand, order, axis=1)
    return TopK(index, np.take_along_axis(values, order, axis=1), out + fr.log_mult, fr.n_classes)


def _dense_probs(t: TopK) -> np.ndarray:
    """float64 [N, C] probabilities of a TopK of log-probabilities (the rest spread evenly)."""
    n, c, k = len(t), t.n_classes, t.k
    spread = np.exp(t.fill() - t.log_norm()) if k < c else np.zeros(n)
    out = np.repeat(spread[:, None], c, axis=1)
    np.put_along_axis(out, np.asarray(t.index, np.int64), np.exp(t.values - t.log_norm()[:, None]), axis=1)
    return out


def _fit_blend(
    lp: np.ndarray, lo: np.ndarray, log_mult: float, col: np.ndarray
) -> tuple[np.ndarray, float]:
    """Weights (softmax of free parameters: non-negative, summing to 1) and one temperature T minimising the
    log-loss of softmax(sum_m w_m log p_m / T) over a frame: ``lp`` float64 [M, N, W] the members'
    log-probabilities on its columns, ``lo`` [M, N] of each class outside it (``log_mult``: log of their
    count), ``col`` [N] the truth's column (-1: outside). Analytic gradient, L-BFGS-B."""
    from scipy.optimize import minimize  # fit time only: loading a Stacker needs numpy + xgboost

    m, n = len(lp), len(col)
    inside = col >= 0
    rows = np.flatnonzero(inside)

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, s = softmax(theta[None, :m])[0], np.exp(theta[m])  # s = 1 / T
        mix, mix_out = np.tensordot(w, lp, axes=1), w @ lo  # [N, W], [N]
        a, a_out = s * mix, s * mix_out
        z = np.logaddexp(_lse(a, axis=1), a_out + log_mult)
        value = -(np.where(inside, a[np.arange(n), np.maximum(col, 0)], a_out) - z).mean()
        grad = np.exp(a - z[:, None])
        grad[rows, col[rows]] -= 1
        grad /= n  # d loss / d (s * mix)
        grad_out = (np.exp(a_out + log_mult - z) - ~inside) / n  # d loss / d (s * mix_out)
        grad_w = s * (np.einsum("mnw,nw->m", lp, grad) + lo @ grad_out)
        grad_a = w * (grad_w - w @ grad_w)
        grad_b = s * float((grad * mix).sum() + grad_out @ mix_out)
        return float(value), np.append(grad_a, grad_b)

    bounds = [(-BLEND_LOGIT_W, BLEND_LOGIT_W)] * m + [(-BLEND_LOG_T, BLEND_LOG_T)]
    res = minimize(loss, np.zeros(m + 1), jac=True, method="L-BFGS-B", bounds=bounds)
    return softmax(res.x[None, :m])[0], float(np.exp(-res.x[m]))


# ---------------------------------------------------------------------------------------------------------
# The re-ranker's pieces (module docstring).


def _none_x(fr: Frame) -> np.ndarray:
    """float64 [N]: log of the members' mean probability outside each image's candidates (-inf: none is)."""
    outside = fr.n_classes - fr.n_cand
    with np.errstate(divide="ignore"):
        return _lse(fr.fill - fr.lse, axis=0) - np.log(len(fr.lse)) + np.log(outside)


def _fit_none(x: np.ndarray, miss: np.ndarray) -> list[float]:
    """(b0, b1) of q = sigmoid(b0 + b1 x): logistic regression by Newton's method on the rows with classes
    outside their candidates, plus one pseudo-miss and one pseudo-hit at the mean x (Laplace)."""
    ok = np.isfinite(x)
    if not ok.any():
        return [0.0, 0.0]  # every class is a candidate everywhere: q is never used
    xs = np.append(x[ok], [x[ok].mean()] * 2)
    t = np.append(miss[ok].astype(np.float64), [1.0, 0.0])
    a = np.column_stack([np.ones_like(xs), xs - xs.mean()])  # centred: a well-conditioned Hessian
    beta = np.zeros(2)
    for _ in range(100):
        p = 1 / (1 + np.exp(-np.clip(a @ beta, -NONE_LOGIT, NONE_LOGIT)))
        hess = a.T @ (a * (p * (1 - p))[:, None]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, a.T @ (p - t))
        step *= min(1.0, 5.0 / max(np.abs(step).max(), 1e-300))  # damped: no overshoot from a flat start
        beta -= step
        if np.abs(step).max() < 1e-10:
            break
    return [float(beta[0] - beta[1] * xs.mean()), float(beta[1])]


def _none_mass(fr: Frame, coef: list[float]) -> np.ndarray:
    """float64 [N]: q, the none-of-the-candidates mass (0 when every class is a candidate)."""
    x = _none_x(fr)
    with np.errstate(invalid="ignore"):
        logit = np.clip(coef[0] + coef[1] * x, -NONE_LOGIT, NONE_LOGIT)
    return np.where(np.isfinite(x), 1 / (1 + np.exp(-np.nan_to_num(logit))), 0.0)


def _count_groups(folds: np.ndarray, seed: int) -> np.ndarray:
    """int [N] 0..G-1: the fitting rows' folds as the groups their class counts are taken out of (a seeded
    half/half split when they span a single fold)."""
    present, group = np.unique(folds, return_inverse=True)
    if len(present) >= 2:
        return group
    return (np.random.default_rng(seed).random(len(folds)) < 0.5).astype(np.int64)


def _subsample(n: int, limit: int, seed: int) -> np.ndarray | slice:
    """All ``n`` rows, or the sorted indices of a seeded sample of ``limit`` (at least 1,000) of them."""
    limit = max(limit, 1000)
    if n <= limit:
        return slice(None)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def _sample_rows(label: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """bool [R]: every positive row and a seeded uniform share of the negatives, about ``cap`` rows in all
    (at least as many negatives as positives when the positives alone exceed it)."""
    n_pos = int(label.sum())
    n_neg = len(label) - n_pos
    rate = min(1.0, max(cap - n_pos, n_pos) / max(n_neg, 1))
    return label | (np.random.default_rng(seed).random(len(label)) < rate)


def _candidate_matrix(scores: np.ndarray, img: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows (``img`` int [R], ``scores`` float [R], ``truth`` bool [R]) as one row per image, float64
    [n, w] padded with -inf (w: the most candidates of an image), and the column of each image's true class,
    int [n]; an image whose truth is not among its rows is left out. The layout metrics.fit_temperature
    takes."""
    order = np.argsort(img, kind="stable")
    img, scores, truth = img[order], np.asarray(scores, np.float64)[order], truth[order]
    _, start, counts = np.unique(img, return_index=True, return_counts=True)
    row = np.repeat(np.arange(len(counts)), counts)
    col = np.arange(len(img)) - start[row]
    matrix = np.full((len(counts), counts.max()), -np.inf)
    matrix[row, col] = scores
    label = np.full(len(counts), -1)
    label[row[truth]] = col[truth]
    return matrix[label >= 0], label[label >= 0]


class Stacker:
    """Combines members' logits [N, C] (or TopK) into class probabilities; kind: one of :data:`KINDS`.

    ``features`` ('logits' | 'probs') is what the mean averages and what multi-class XGBoost sees; the blend
    always mixes log-probabilities and 'single' uses its member's logits. ``max_classes``: above it
    multi-class XGBoost refuses to fit (see the module docstring); ``xgb_*``: tree depth, learning rate,
    maximum rounds, early stopping rounds (0: always ``xgb_rounds``), for both XGBoost kinds; ``nthread``:
    XGBoost's threads. The re-ranker's: ``candidates`` (each member's top k), ``rerank_objective`` (one of
    :data:`OBJECTIVES`), ``rerank_eta`` (its learning rate: it trains on far more rows than the multi-class
    kind, and 0.1 scored as 0.05 in half the rounds at 60k images x 5,000 classes), ``rerank_rows``
    (training rows per booster before negatives are subsampled).
    """

    def __init__(
        self,
        kind: str = "blend",
        *,
        features: Literal["logits", "probs"] = "logits",
        max_classes: int = 50,
        xgb_max_depth: int = 3,
        xgb_eta: float = 0.05,
        xgb_rounds: int = 1000,
        xgb_early_stop: int = 50,
        candidates: int = 20,
        rerank_objective: str = "binary:logistic",
        rerank_eta: float = 0.1,
        rerank_rows: int = 400_000,
        seed: int = 42,
        nthread: int = 1,
    ) -> None:
        if kind not in KINDS:
            raise StackError(f"unknown stacker kind {kind!r}: one of {', '.join(KINDS)}")
        if features not in ("logits", "probs"):
            raise StackError(f"unknown stack features {features!r}: logits or probs")
        if rerank_objective not in OBJECTIVES or candidates < 1 or rerank_rows < 1 or rerank_eta <= 0:
            raise StackError(
                f"re-ranker settings: stack_rerank_objective one of {', '.join(OBJECTIVES)} (got "
                f"{rerank_objective!r}), stack_candidates >= 1 (got {candidates}), stack_rerank_rows >= 1 (got "
                f"{rerank_rows}), stack_rerank_eta > 0 (got {rerank_eta})"
            )
        self.kind, self.features = kind, features
        self.max_classes, self.seed = max_classes, seed
        self.xgb_max_depth, self.xgb_eta, self.nthread = xgb_max_depth, xgb_eta, nthread
        self.max_rounds, self.early_stop = xgb_rounds, xgb_early_stop
        self.candidates, self.rerank_objective = candidates, rerank_objective
        self.rerank_eta, self.rerank_rows = rerank_eta, rerank_rows
        self.n_members = 0
        self.n_classes = 0
        self.member: int | None = None  # single: the member used
        self.weights: list[float] | None = None  # blend
        self.temperature: float | None = None  # blend; rerank: its scores are divided by it
        self.rounds: int | None = None  # xgboost, rerank: boosting rounds of the fitted model
        self.booster: xgb.Booster | None = None
        self.class_counts: np.ndarray | None = None  # rerank: int64 [C] labels of the fitting rows
        self.none_coef: list[float] | None = None  # rerank: (b0, b1) of the none-of-the-candidates mass
        self.params = {
            "objective": "multi:softprob", "tree_method": "hist", "eval_metric": "mlogloss",
            "max_depth": xgb_max_depth, "eta": xgb_eta, "nthread": nthread, "seed": seed,
        }  # fmt: skip

    def get_params(self) -> dict[str, Any]:
        """The constructor's arguments (scikit-learn's convention): ``Stacker(**s.get_params())`` is an
        unfitted copy."""
        return {
            "kind": self.kind, "features": self.features, "max_classes": self.max_classes,
            "xgb_max_depth": self.xgb_max_depth, "xgb_eta": self.xgb_eta, "xgb_rounds": self.max_rounds,
            "xgb_early_stop": self.early_stop, "candidates": self.candidates,
            "rerank_objective": self.rerank_objective, "rerank_eta": self.rerank_eta,
            "rerank_rows": self.rerank_rows, "seed": self.seed, "nthread": self.nthread,
        }  # fmt: skip

    def clone(self, kind: str | None = None) -> Stacker:
        """An unfitted stacker with these settings (and ``kind`` when given)."""
        return Stacker(**(self.get_params() | ({"kind": kind} if kind else {})))

    def _check(self, members: Sequence[Predictions]) -> list[Predictions]:
        members = [m if isinstance(m, TopK) else np.asarray(m) for m in members]
        if not members:
            raise StackError("no member predictions given")
        if any(not isinstance(m, TopK) and m.ndim != 2 for m in members):
            raise StackError("members must be [N, C] arrays (or lib.oof.TopK), one row per image")
        shapes = {_shape(m) for m in members}
        if len(shapes) != 1:
            raise StackError(f"members must share one [N, C] shape, got {sorted(shapes)}")
        n_classes = _shape(members[0])[1]
        if self.n_members and (len(members), n_classes) != (self.n_members, self.n_classes):
            raise StackError(
                f"this stacker was fitted on {self.n_members} member(s) x {self.n_classes} classes, got "
                f"{len(members)} x {n_classes}"
            )
        finite = [
            np.isfinite(m.values).all() and not np.isnan(m.rest).any() if isinstance(m, TopK)
            else np.isfinite(m).all()
            for m in members
        ]  # fmt: skip
        if bad := [i for i, ok in enumerate(finite) if not ok]:
            raise StackError(f"member(s) {bad} hold NaN or inf logits")
        return members

    def _features(self, members: list[np.ndarray]) -> np.ndarray:
        parts = members if self.features == "logits" else [softmax(m) for m in members]
        return np.concatenate(parts, axis=1).astype(np.float32)

    def fit(
        self,
        members: Sequence[Predictions],
        y: np.ndarray,
        folds: np.ndarray | None = None,
        rounds: int | None = None,
        temperature: float | None = None,
    ) -> Stacker:
        """Fit on these rows. XGBoost kinds: ``rounds`` fixes the rounds (the final refit); otherwise they are
        chosen by early stopping on an inner fold of ``folds`` (ids of these rows), never on rows outside
        them. rerank: ``temperature`` (with ``rounds``) fixes its calibration, else it is fitted on that
        inner fold."""
        members = self._check(members)
        y = np.asarray(y, dtype=np.int64)
        n, c = _shape(members[0])
        if len(y) != n or y.min() < 0 or y.max() >= c:
            raise StackError(f"y must hold {n} class indices in 0..{c - 1}")
        self.n_members, self.n_classes = len(members), c
        if self.kind == "single":
            self.member = best_member(members, y)
        elif self.kind == "blend":
            rows = _subsample(n, BLEND_CELLS // _frame_cells(members), self.seed)
            fr = _frame([_take(m, rows) for m in members], self.candidates)
            weights, self.temperature = _fit_blend(fr.logp(), fr.out_logp(), fr.log_mult, fr.column_of(y[rows]))
            self.weights = weights.tolist()
        elif self.kind == "xgboost":
            self._fit_xgboost([m.dense() if isinstance(m, TopK) else m for m in members], y, folds, rounds)
        elif self.kind == "rerank":
            self._fit_rerank(members, y, folds, rounds, temperature)
        return self

    def _fit_xgboost(
        self, members: list[np.ndarray], y: np.ndarray, folds: np.ndarray | None, rounds: int | None
    ) -> None:
        if self.n_classes > self.max_classes:
            raise StackError(
                f"XGBoost is not fitted above stack_max_classes ({self.max_classes}) classes: {self.n_classes} "
                "classes would mean C trees per round over M x C features (cost ~ M x C^2 per round). Use "
                "--stacker rerank (XGBoost on each image's candidate classes), blend or auto, or raise "
                "--stack-max-classes if you can afford it"
            )
        x = self._features(members)
        params = self.params | {"num_class": self.n_classes}
        if rounds is None and self.early_stop <= 0:
            rounds = self.max_rounds
        if rounds is None:
            if folds is None:
                raise StackError(
                    "xgboost needs the rows' folds (for its inner early-stopping split) or rounds"
                )
            held = _inner_split(np.asarray(folds), self.seed)
            probe = _boost(params, x[~held], y[~held], self.max_rounds, x[held], y[held], self.early_stop)
            rounds = probe.best_iteration + 1
        self.rounds = int(rounds)
        self.booster = _boost(params, x, y, self.rounds)  # the rounds found, the trees from every row given

    # -- the re-ranker ------------------------------------------------------------------------------------

    def _rerank_tops(self, members: Sequence[Predictions]) -> list[TopK]:
        """Each member's top ``candidates`` (a wider TopK cut exactly, a dense member's taken)."""
        return [
            m.truncate(self.candidates) if isinstance(m, TopK) else TopK.from_logits(m, self.candidates)
            for m in members
        ]  # fmt: skip

    def _rerank_params(self) -> dict[str, Any]:
        metric = "logloss" if self.rerank_objective == "binary:logistic" else "ndcg"
        return {
            "objective": self.rerank_objective, "tree_method": "hist", "eval_metric": metric,
            "max_depth": self.xgb_max_depth, "eta": self.rerank_eta, "nthread": self.nthread, "seed": self.seed,
        }  # fmt: skip

    def _rerank_x(
        self, fr: Frame, img: np.ndarray, col: np.ndarray, oof: tuple[np.ndarray, np.ndarray] | None = None
    ) -> np.ndarray:
        """float32 [R, 5M + 5]: the features of candidate rows (image ``img``, frame column ``col``), in the
        module docstring's order. ``oof`` (fitting rows): each image's count group int [N] and the groups'
        class counts int [G, C], so a row's class frequency is counted without its own group."""
        m = len(fr.z)
        x = np.empty((len(img), 5 * m + 5), np.float32)
        prob = np.empty((m, len(img)))
        for j in range(m):
            z = fr.z[j, img, col].astype(np.float64)
            prob[j] = np.exp(z - fr.lse[j, img])
            x[:, 5 * j] = z
            x[:, 5 * j + 1] = prob[j]
            x[:, 5 * j + 2] = fr.rank[j, img, col]
            x[:, 5 * j + 3] = fr.top1[j, img] - z
            x[:, 5 * j + 4] = fr.entropy[j, img]
        ranks = fr.rank[:, img, col]
        cls = fr.cand[img, col]
        count, total = self.class_counts[cls], self.class_counts.sum()
        if oof is not None:
            group, by_group = oof
            count, total = count - by_group[group[img], cls], total - by_group.sum(axis=1)[group[img]]
        x[:, 5 * m] = prob.mean(axis=0)
        x[:, 5 * m + 1] = prob.max(axis=0)
        x[:, 5 * m + 2] = (ranks == 1).sum(axis=0)
        x[:, 5 * m + 3] = (ranks <= fr.ks[:, None]).sum(axis=0)
        x[:, 5 * m + 4] = count / total
        return x

    def _fit_rerank(
        self, members: list[Predictions], y: np.ndarray, folds: np.ndarray | None, rounds: int | None,
        temperature: float | None,
    ) -> None:  # fmt: skip
        n = len(y)
        folds = np.zeros(n, np.int64) if folds is None else np.asarray(folds)
        groups = _count_groups(folds, self.seed)
        self.class_counts = np.bincount(y, minlength=self.n_classes)
        by_group = np.stack(
            [np.bincount(y[groups == g], minlength=self.n_classes) for g in range(groups.max() + 1)]
        )
        held = _inner_split(folds, self.seed)
        calibrate = np.zeros(n, bool)
        if temperature is None:  # the temperature's images: at most TEMPERATURE_IMAGES of the held-out ones
            chosen = np.flatnonzero(held)
            calibrate[np.random.default_rng(self.seed).permutation(chosen)[:TEMPERATURE_IMAGES]] = True
        (img, x, label), calib, none_x, missed = self._rerank_rows(members, y, (groups, by_group), calibrate)
        self.none_coef = _fit_none(none_x, missed)
        params = self._rerank_params()
        if rounds is None and self.early_stop <= 0:
            rounds = self.max_rounds
        if temperature is None:
            inner = held[img]
            stop = self.early_stop if rounds is None else 0
            val = (x[inner], label[inner], stop) if stop else ()
            probe = _boost(
                params, x[~inner], label[~inner], rounds or self.max_rounds, *val, qid=img[~inner],
                qid_val=img[inner] if stop else None,
            )  # fmt: skip
            rounds = rounds or probe.best_iteration + 1
            temperature = self._calibrate(probe, rounds, calib)
        self.rounds, self.temperature = int(rounds), float(temperature)
        self.booster = _boost(params, x, label, self.rounds, qid=img)

    def _rerank_rows(
        self, members: list[Predictions], y: np.ndarray, oof: tuple[np.ndarray, np.ndarray], calibrate: np.ndarray
    ) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...], np.ndarray, np.ndarray]:  # fmt: skip
        """One pass over chunks of images (bounded memory): the training rows (every true candidate, a seeded
        share of the others: about ``rerank_rows`` in all) as (image int [R], features float32 [R, F], label
        float32 [R]); every candidate row of the images ``calibrate`` (bool [N]) whose truth is a candidate,
        alike; and per image the none model's x (float64 [N]) and whether the truth escaped (bool [N])."""
        tops = self._rerank_tops(members)
        n = len(y)
        none_x, missed = np.empty(n), np.empty(n, bool)
        train, calib = [], []
        for i, rows in enumerate(_chunks(n, _frame_cells(tops))):
            fr = Frame.union([t.rows(rows) for t in tops])
            yc, oc = y[rows], (oof[0][rows], oof[1])
            none_x[rows], missed[rows] = _none_x(fr), ~fr.covered(yc)
            img, col = np.nonzero(fr.valid())
            label = fr.cand[img, col] == yc[img]
            keep = _sample_rows(label, self.rerank_rows * len(yc) / n, self.seed + i)
            train.append((img[keep] + rows.start, self._rerank_x(fr, img[keep], col[keep], oc), label[keep]))
            chosen = (calibrate[rows] & ~missed[rows])[img]
            x = self._rerank_x(fr, img[chosen], col[chosen], oc)
            calib.append((img[chosen] + rows.start, x, label[chosen]))
        joined = [tuple(np.concatenate(part) for part in zip(*parts, strict=True)) for parts in (train, calib)]
        img, x, label = joined[0]
        return (img, x, label.astype(np.float32)), joined[1], none_x, missed

    def _calibrate(self, probe: xgb.Booster, rounds: int, calib: tuple[np.ndarray, ...]) -> float:
        """T fitted on the full candidate sets of held-out images (image, features, label rows), scored by the
        probe that never trained on them (1 when there are none)."""
        img, x, label = calib
        if not len(img):
            return 1.0
        scores = probe.inplace_predict(x, iteration_range=(0, rounds), predict_type="margin").astype(np.float64)
        matrix, truth = _candidate_matrix(scores, img, label)
        if not len(truth):
            return 1.0
        return fit_temperature(matrix, truth, t_range=(np.exp(-RERANK_LOG_T), np.exp(RERANK_LOG_T)))

    def _rerank_predict(self, members: list[Predictions]) -> TopK:
        """A TopK of log-probabilities over each image's frame: (1 - q) softmax(score / T) on its candidates,
        q / (C - |candidates|) for each other class (rows: one chunk of images)."""
        fr = Frame.union(self._rerank_tops(members))
        c = self.n_classes
        img, col = np.nonzero(fr.valid())
        x = self._rerank_x(fr, img, col)
        margins = self.booster.inplace_predict(x, iteration_range=(0, self.rounds), predict_type="margin")
        s = margins.astype(np.float64) / self.temperature  # float32 margins: the softmax is taken in float64
        q = _none_mass(fr, self.none_coef)
        outside = c - fr.n_cand
        some = outside > 0
        out = np.full(len(q), -np.inf)  # each class outside the candidates: an even share of q
        out[some] = np.log(q[some]) - np.log(outside[some])
        values = np.repeat(out[:, None], fr.width, axis=1)
        values[img, col] = (np.log1p(-q) - _segment_lse(s, fr.n_cand))[img] + s
        return _output(fr, values, out)

    # -- applying -----------------------------------------------------------------------------------------

    def _predict(self, members: Sequence[Predictions]) -> Predictions:
        """Probabilities [N, C] or a TopK of log-probabilities, a chunk of images at a time."""
        if not self.n_members:
            raise StackError("predict before fit or load")
        members = self._check(members)
        chunks = _chunks(len(members[0]), _frame_cells(members))
        parts = [self._predict_rows([_take(m, rows) for m in members]) for rows in chunks]
        if isinstance(parts[0], TopK):
            return TopK.concat(parts, k=parts[0].k, n_classes=self.n_classes)
        return np.concatenate(parts)

    def _predict_rows(self, members: list[Predictions]) -> Predictions:
        """:meth:`_predict` of one chunk of images."""
        if self.kind == "single":
            m = members[self.member]
            if isinstance(m, TopK):
                norm = m.log_norm()
                return TopK(m.index, np.asarray(m.values, np.float64) - norm[:, None], m.rest - norm, m.n_classes)
            return softmax(m)
        if self.kind == "xgboost":
            x = self._features([m.dense() if isinstance(m, TopK) else m for m in members])
            p = self.booster.predict(xgb.DMatrix(x)).astype(np.float64)
            return p / p.sum(axis=1, keepdims=True)
        if self.kind == "rerank":
            return self._rerank_predict(members)
        fr = _frame(members, self.candidates)
        lp, lo = fr.logp(), fr.out_logp()
        if self.kind == "mean" and self.features == "probs":
            with np.errstate(divide="ignore"):
                a, a_out = np.log(np.exp(lp).mean(axis=0)), np.log(np.exp(lo).mean(axis=0))
            return _output(fr, *_normalise(fr, a, a_out))
        if self.kind == "mean":
            return _output(fr, *_normalise(fr, lp.mean(axis=0), lo.mean(axis=0)))
        w, s = np.asarray(self.weights), 1 / self.temperature
        return _output(fr, *_normalise(fr, s * np.tensordot(w, lp, axes=1), s * (w @ lo)))

    def predict_proba(self, members: Sequence[Predictions]) -> np.ndarray:
        """Class probabilities [N, C] (float64, rows summing to 1). At thousands of classes prefer
        :meth:`predict_topk`, which never makes [N, C]."""
        out = self._predict(members)
        return _dense_probs(out) if isinstance(out, TopK) else out

    def predict_topk(self, members: Sequence[Predictions]) -> TopK:
        """Class log-probabilities as a TopK (columns in descending order; ``rest``: the log of the mass of the
        classes left out, spread evenly over them). single, mean, blend on TopK members and rerank always
        give their frame this way, without [N, C]; kinds on dense members keep all C columns."""
        out = self._predict(members)
        return out if isinstance(out, TopK) else TopK.from_logits(log_probs(out), out.shape[1])

    def save(self, folder: Path) -> list[Path]:
        """Write stacker.json (+ xgb_model.ubj for the XGBoost kinds) into ``folder``; return the files."""
        folder = Path(folder)
        state = {
            "format": FORMAT, "kind": self.kind, "features": self.features, "n_members": self.n_members,
            "n_classes": self.n_classes, "member": self.member, "weights": self.weights,
            "temperature": self.temperature, "rounds": self.rounds,
            "model": XGB_FILE if self.booster is not None else None,
            "candidates": self.candidates, "rerank_objective": self.rerank_objective, "none_coef": self.none_coef,
            "class_counts": None if self.class_counts is None else self.class_counts.tolist(),
        }  # fmt: skip
        written = []
        if self.booster is not None:
            with atomic_path(folder / XGB_FILE) as tmp:  # keeps the .ubj suffix xgboost picks the format from
                self.booster.save_model(str(tmp))
            written.append(folder / XGB_FILE)
        atomic_write(folder / STACKER_FILE, json.dumps(state, indent=2) + "\n")
        return [folder / STACKER_FILE, *written]

    @classmethod
    def load(cls, folder: Path) -> Stacker:
        """A stacker written by :meth:`save` (numpy + xgboost only)."""
        path = Path(folder) / STACKER_FILE
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise StackError(f"{path} is missing or unreadable ({e}): {REBUILD}") from e
        if state.get("format") != FORMAT:
            raise StackError(
                f"{path} has format {state.get('format')!r}, expected {FORMAT}: {REBUILD}"
            )
        stacker = cls(
            state["kind"], features=state["features"], candidates=state.get("candidates", 20),
            rerank_objective=state.get("rerank_objective", "binary:logistic"),
        )  # fmt: skip
        stacker.n_members, stacker.n_classes = state["n_members"], state["n_classes"]
        for key in ("member", "weights", "temperature", "rounds", "none_coef"):
            setattr(stacker, key, state.get(key))
        if state.get("class_counts") is not None:
            stacker.class_counts = np.asarray(state["class_counts"], dtype=np.int64)
        if state["model"]:
            stacker.booster = xgb.Booster()
            stacker.booster.load_model(str(Path(folder) / state["model"]))
        return stacker


# ---------------------------------------------------------------------------------------------------------
# Nested comparison and the final fit.


def _assemble(parts: list[tuple[np.ndarray, Predictions]], n: int, c: int) -> Predictions:
    """The per-fold predictions (rows mask, dense probabilities or TopK) as one [N, ...] prediction; a TopK
    in float32 (the comparison holds one per kind: N x W each; the store keeps float16 anyway)."""
    first = parts[0][1]
    if isinstance(first, np.ndarray):
        out = np.zeros((n, c), dtype=np.float64)
        for rows, p in parts:
            out[rows] = p
        return out
    index, values = np.zeros((n, first.k), np.int32), np.zeros((n, first.k), np.float32)
    rest = np.zeros(n, np.float32)
    for rows, p in parts:
        index[rows], values[rows], rest[rows] = p.index, p.values, p.rest
    return TopK(index, values, rest, c)


def nested_fits(
    template: Stacker, members: Sequence[Predictions], y: np.ndarray, folds: np.ndarray
) -> tuple[Predictions, list[Stacker]]:
    """Nested OOF predictions and the per-fold stackers: fold k's rows are predicted by a copy of
    ``template`` fitted on the other folds' rows only (its early stopping included). The predictions are
    probabilities float64 [N, C] when every member is dense, else a TopK of log-probabilities
    (:meth:`Stacker.predict_topk`): no [N, C] array for top-k members."""
    folds = np.asarray(folds)
    dense = all(isinstance(m, np.ndarray) for m in members)
    parts, fitted = [], []
    for k in np.unique(folds):
        val = folds == k
        s = template.clone().fit([_take(m, ~val) for m in members], y[~val], folds[~val])
        held = [_take(m, val) for m in members]
        parts.append((val, s.predict_proba(held) if dense else s.predict_topk(held)))
        fitted.append(s)
    if template.kind in ("xgboost", "rerank"):
        log.info(
            "%s rounds per outer fold (early-stopped on an inner fold): %s", template.kind,
            [s.rounds for s in fitted],
        )  # fmt: skip
    return _assemble(parts, *_shape(members[0])), fitted


def refit(
    template: Stacker, members: Sequence[Predictions], y: np.ndarray, folds: np.ndarray, nested: list[Stacker]
) -> Stacker:
    """The final stacker on all OOF; the XGBoost kinds take the median of the nested fits' rounds (no row is
    left to early-stop on without scoring on training rows), the re-ranker also their median temperature."""
    rounds = temperature = None
    if template.kind in ("xgboost", "rerank"):
        rounds = max(1, round(float(np.median([s.rounds for s in nested]))))
    if template.kind == "rerank":
        temperature = float(np.median([s.temperature for s in nested]))
    return template.clone().fit(members, y, folds, rounds=rounds, temperature=temperature)


def _kind(method: str) -> str:
    return method.split(" ", 1)[0]


def scores(pred: Predictions, y: np.ndarray, n_classes: int) -> dict[str, float]:
    """Accuracy, macro-F1 and log-loss of a stacker's probabilities (dense [N, C], or a TopK of
    log-probabilities), floored at PROB_FLOOR, against ``y`` (int [N]); a chunk of rows at a time."""
    return prediction_scores(log_probs(pred), y, n_classes)


def compare(
    members: Sequence[Predictions], y: np.ndarray, folds: np.ndarray, classes: list[str], names: list[str],
    *, template: Stacker,
) -> tuple[pd.DataFrame, dict[str, tuple[Predictions, list[Stacker]]]]:  # fmt: skip
    """The nested comparison: a table (method, accuracy, macro_f1, log_loss; one row per kind, ``single``
    naming its member; xgboost only up to ``template.max_classes`` classes) and, per kind, its nested OOF
    predictions (:func:`nested_fits`) and per-fold stackers."""
    import pandas as pd

    kinds = [k for k in KINDS if k != "xgboost" or len(classes) <= template.max_classes]
    if "xgboost" not in kinds:
        log.info(
            "%d classes > stack_max_classes (%d): no multi-class XGBoost (cost ~ members x classes^2 per round); "
            "the re-ranker scores each image's candidates instead", len(classes), template.max_classes,
        )  # fmt: skip
    rows, fits = [], {}
    for kind in kinds:
        probs, fitted = nested_fits(template.clone(kind), members, y, folds)
        fits[kind] = (probs, fitted)
        method = f"single ({names[best_member(members, y)]})" if kind == "single" else kind
        rows.append({"method": method, **scores(probs, y, len(classes))})
    return pd.DataFrame(rows, columns=["method", "accuracy", "macro_f1", "log_loss"]), fits


def choose(table: pd.DataFrame, *, stacker: str = "auto", max_classes: int = 50) -> str:
    """``stacker``, or for 'auto' the kind with the lowest nested log-loss (the simpler one on ties)."""
    kinds = [_kind(m) for m in table["method"]]
    if stacker == "auto":
        return kinds[int(np.argmin(table["log_loss"].to_numpy()))]
    if stacker not in kinds:
        raise StackError(
            f"stacker {stacker!r} was not evaluated (rows: {', '.join(kinds)}): above stack_max_classes "
            f"({max_classes}) classes there is no multi-class XGBoost stacker; use --stacker auto, rerank or blend"
        )
    return stacker


def candidate_coverage(members: Sequence[Predictions], y: np.ndarray, *, candidates: int) -> tuple[float, float]:
    """(share of rows whose truth is among the union of the members' top ``candidates``, mean number of
    candidates per row): the re-ranker's ceiling and its rows per image."""
    tops = Stacker(candidates=candidates)._rerank_tops(members)
    y = np.asarray(y)
    covered = n_cand = 0
    for rows in _chunks(len(y), _frame_cells(tops)):
        fr = Frame.union([t.rows(rows) for t in tops])
        covered, n_cand = covered + fr.covered(y[rows]).sum(), n_cand + fr.n_cand.sum()
    return float(covered / len(y)), float(n_cand / len(y))


@dataclass
class StackResult:
    """What :func:`fit_stacker` found: the comparison, the kind chosen, its nested OOF and the final fit."""

    table: pd.DataFrame
    kind: str
    nested: Predictions  # the chosen kind's nested OOF: float64 [N, C] probabilities, or a TopK (log-probs)
    final: Stacker


def fit_stacker(
    members: Sequence[Predictions], y: np.ndarray, folds: np.ndarray, classes: list[str], names: list[str],
    *, template: Stacker, choice: str = "auto",
) -> StackResult:  # fmt: skip
    """Compare every kind nested on ``folds``, choose (``choice``: a kind or auto), refit it on all rows.

    Args:
        members: per member its OOF logits, float [N, C] or a lib.oof.TopK, rows aligned with ``y``, ``folds``.
        y: true class indices, int [N]; folds: fold id of each row, int [N].
        classes: the C class names; names: the members' names (for the table's single row).
        template: the settings every fitted stacker copies (its kind is ignored).

    Raises:
        StackError: ``choice`` is xgboost above ``template.max_classes`` classes, or a member is malformed.
    """
    if choice == "xgboost" and len(classes) > template.max_classes:
        raise StackError(
            f"stacker xgboost asked for but {len(classes)} classes > stack_max_classes ({template.max_classes}): "
            "multi-class XGBoost's cost grows as members x classes^2 per round; use --stacker auto, rerank or blend"
        )
    table, fits = compare(members, y, folds, classes, names, template=template)
    kind = choose(table, stacker=choice, max_classes=template.max_classes)
    probs, nested = fits[kind]
    final = refit(template.clone(kind), members, y, folds, nested)
    return StackResult(table, kind, probs, final)
