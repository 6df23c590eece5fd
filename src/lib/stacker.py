"""The stacker: combines several members' out-of-fold logits into class probabilities.

The one home of fitting, saving, loading and applying a combiner; src/stack.py (the comparison report) and
src/package.py (the stacker that ships in the bundle) both fit through :func:`fit_stacker`, and
src/predict.py loads what package.py saved with :meth:`Stacker.load`, which needs numpy and xgboost only.

Four kinds, simplest first (``auto`` ties go to the simpler one):

- ``single``: the member with the lowest log-loss on the fitting rows, alone;
- ``mean``: softmax of the mean of the members' log-probabilities (``features="logits"``) or the mean of
  their probabilities (``"probs"``);
- ``blend``: non-negative weights summing to 1 over the members' log-probabilities plus one global
  temperature, fitted by minimising log-loss (scipy's L-BFGS-B, analytic gradient);
- ``xgboost``: XGBoost ``multi:softprob`` over the concatenated members' logits (or probabilities),
  [N, M*C] (Wolpert's stacked generalisation, as Kaggle winners apply it to fold-model logits). Its rounds
  are chosen by early stopping on an inner fold *of the fitting rows*; the final stacker, refitted on all
  OOF, takes the median of the nested fits' rounds.

Every comparison is **nested**: the prediction for fold k comes from a combiner fitted on the other folds
only, so the table never rewards a combiner for memorising its own training rows. **Class threshold**:
above ``max_classes`` (default 50) XGBoost is not fitted: it sees M*C features and grows C trees per round,
each scanning histograms of all M*C features, so a round costs ~ N*M*C^2 (measured here, 2,000 images x 3
members, one thread: 0.04 s per round at 10 classes, 0.6 s at 50, 7 s at 200). The blend's cost is linear
in C with M+1 parameters whatever C is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import xgboost as xgb

from lib.common import PipelineError, atomic_path, atomic_write, get_logger
from lib.metrics import index_scores, log_softmax, nll, softmax

if TYPE_CHECKING:
    import pandas as pd

log = get_logger("stacker")

KINDS = ("single", "mean", "blend", "xgboost")  # simplest first: ties in auto go to the simpler one
STACKER_FILE = "stacker.json"
XGB_FILE = "xgb_model.ubj"
FORMAT = 1
PROB_FLOOR = 1e-15  # log(0) would make an OOF file unscorable; exp(-34.5) is "impossible" enough
BLEND_LOG_T = 3.0  # the blend's temperature stays within e^-3..e^3 (0.05..20): beyond is degenerate
BLEND_LOGIT_W = 30.0  # weight logits bounded: e^-60 is zero for every purpose, and L-BFGS-B stays finite
INNER_FRACTION = 0.2  # held-out share for early stopping when the rows given span a single fold
REBUILD = "re-run python src/package.py (it fits the stacker that ships)"


class StackError(PipelineError, ValueError):
    """The members or settings cannot be stacked; the message names the experiment and the fix."""


def log_probs(p: np.ndarray) -> np.ndarray:
    """log of probabilities [N, C], floored at PROB_FLOOR so a zero stays scorable."""
    return np.log(np.clip(p, PROB_FLOOR, 1.0))


def best_member(members: list[np.ndarray], y: np.ndarray) -> int:
    """Index of the member with the lowest log-loss on these rows (the first one on ties)."""
    return int(np.argmin([nll(log_softmax(m), y) for m in members]))


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
) -> xgb.Booster:
    """XGBoost for ``rounds`` rounds, or until ``early_stop`` rounds pass without a better (x_val, y_val)."""
    train = xgb.DMatrix(x, label=y, nthread=params["nthread"])
    if x_val is None:
        return xgb.train(params, train, num_boost_round=rounds, verbose_eval=False)
    val = xgb.DMatrix(x_val, label=y_val, nthread=params["nthread"])
    return xgb.train(
        params, train, num_boost_round=rounds, evals=[(val, "inner")], early_stopping_rounds=early_stop,
        verbose_eval=False,
    )  # fmt: skip


def _fit_blend(log_probs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Weights (softmax of free parameters: non-negative, summing to 1) and one temperature T minimising the
    log-loss of softmax(sum_m w_m log p_m / T); analytic gradient, L-BFGS-B."""
    from scipy.optimize import minimize  # fit time only: loading a Stacker needs numpy + xgboost

    m, n = len(log_probs), len(y)
    rows = np.arange(n)

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, s = softmax(theta[None, :m])[0], np.exp(theta[m])  # s = 1 / T
        mix = np.tensordot(w, log_probs, axes=1)  # [N, C]
        ls = log_softmax(s * mix)
        value = -ls[rows, y].mean()
        grad_z = np.exp(ls)
        grad_z[rows, y] -= 1
        grad_z /= n  # d loss / d (s * mix)
        grad_w = s * np.einsum("mnc,nc->m", log_probs, grad_z)
        grad_a = w * (grad_w - w @ grad_w)
        grad_b = s * float((grad_z * mix).sum())
        return float(value), np.append(grad_a, grad_b)

    bounds = [(-BLEND_LOGIT_W, BLEND_LOGIT_W)] * m + [(-BLEND_LOG_T, BLEND_LOG_T)]
    res = minimize(loss, np.zeros(m + 1), jac=True, method="L-BFGS-B", bounds=bounds)
    return softmax(res.x[None, :m])[0], float(np.exp(-res.x[m]))


class Stacker:
    """Combines members' logits [N, C] into class probabilities. kind: 'xgboost' | 'blend' | 'mean' | 'single'.

    ``features`` ('logits' | 'probs') is what the mean averages and what XGBoost sees; the blend always
    mixes log-probabilities and 'single' uses its member's logits. ``max_classes``: above it XGBoost
    refuses to fit (see the module docstring); ``xgb_*``: tree depth, learning rate, maximum rounds, early
    stopping rounds (0: always ``xgb_rounds``); ``nthread``: XGBoost's threads.
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
        seed: int = 42,
        nthread: int = 1,
    ) -> None:
        if kind not in KINDS:
            raise StackError(f"unknown stacker kind {kind!r}: one of {', '.join(KINDS)}")
        if features not in ("logits", "probs"):
            raise StackError(f"unknown stack features {features!r}: logits or probs")
        self.kind, self.features = kind, features
        self.max_classes, self.seed = max_classes, seed
        self.xgb_max_depth, self.xgb_eta, self.nthread = xgb_max_depth, xgb_eta, nthread
        self.max_rounds, self.early_stop = xgb_rounds, xgb_early_stop
        self.n_members = 0
        self.n_classes = 0
        self.member: int | None = None  # single: the member used
        self.weights: list[float] | None = None  # blend
        self.temperature: float | None = None  # blend
        self.rounds: int | None = None  # xgboost: boosting rounds of the fitted model
        self.booster: xgb.Booster | None = None
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
            "xgb_early_stop": self.early_stop, "seed": self.seed, "nthread": self.nthread,
        }  # fmt: skip

    def clone(self, kind: str | None = None) -> Stacker:
        """An unfitted stacker with these settings (and ``kind`` when given)."""
        return Stacker(**(self.get_params() | ({"kind": kind} if kind else {})))

    def _check(self, members: list[np.ndarray]) -> list[np.ndarray]:
        members = [np.asarray(m) for m in members]
        if not members:
            raise StackError("no member predictions given")
        shapes = {m.shape for m in members}
        if len(shapes) != 1 or members[0].ndim != 2:
            raise StackError(f"members must be [N, C] arrays of one shape, got {sorted(shapes)}")
        if self.n_members and (len(members), members[0].shape[1]) != (self.n_members, self.n_classes):
            raise StackError(
                f"this stacker was fitted on {self.n_members} member(s) x {self.n_classes} classes, got "
                f"{len(members)} x {members[0].shape[1]}"
            )
        if bad := [i for i, m in enumerate(members) if not np.isfinite(m).all()]:
            raise StackError(f"member(s) {bad} hold NaN or inf logits")
        return members

    def _features(self, members: list[np.ndarray]) -> np.ndarray:
        parts = members if self.features == "logits" else [softmax(m) for m in members]
        return np.concatenate(parts, axis=1).astype(np.float32)

    def fit(
        self,
        members: list[np.ndarray],
        y: np.ndarray,
        folds: np.ndarray | None = None,
        rounds: int | None = None,
    ) -> Stacker:
        """Fit on these rows. xgboost: ``rounds`` fixes the rounds (the final refit); otherwise they are chosen
        by early stopping on an inner fold of ``folds`` (ids of these rows), never on rows outside them."""
        members = self._check(members)
        y = np.asarray(y, dtype=np.int64)
        n, c = members[0].shape
        if len(y) != n or y.min() < 0 or y.max() >= c:
            raise StackError(f"y must hold {n} class indices in 0..{c - 1}")
        self.n_members, self.n_classes = len(members), c
        if self.kind == "single":
            self.member = best_member(members, y)
        elif self.kind == "blend":
            weights, self.temperature = _fit_blend(np.stack([log_softmax(m) for m in members]), y)
            self.weights = weights.tolist()
        elif self.kind == "xgboost":
            self._fit_xgboost(members, y, folds, rounds)
        return self

    def _fit_xgboost(
        self, members: list[np.ndarray], y: np.ndarray, folds: np.ndarray | None, rounds: int | None
    ) -> None:
        if self.n_classes > self.max_classes:
            raise StackError(
                f"XGBoost is not fitted above stack_max_classes ({self.max_classes}) classes: {self.n_classes} "
                "classes would mean C trees per round over M x C features (cost ~ M x C^2 per round). Use "
                "--stacker blend or auto, or raise --stack-max-classes if you can afford it"
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

    def predict_proba(self, members: list[np.ndarray]) -> np.ndarray:
        """Class probabilities [N, C] (float64, rows summing to 1)."""
        if not self.n_members:
            raise StackError("predict_proba before fit or load")
        members = self._check(members)
        if self.kind == "single":
            return softmax(members[self.member])
        if self.kind == "mean" and self.features == "probs":
            return np.mean([softmax(m) for m in members], axis=0)
        if self.kind == "mean":
            return softmax(np.mean([log_softmax(m) for m in members], axis=0))
        if self.kind == "blend":
            mix = sum(w * log_softmax(m) for w, m in zip(self.weights, members, strict=True))
            return softmax(mix / self.temperature)
        p = self.booster.predict(xgb.DMatrix(self._features(members))).astype(np.float64)
        return p / p.sum(axis=1, keepdims=True)

    def save(self, folder: Path) -> list[Path]:
        """Write stacker.json (+ xgb_model.ubj for xgboost) into ``folder``; return the files written."""
        folder = Path(folder)
        state = {
            "format": FORMAT, "kind": self.kind, "features": self.features, "n_members": self.n_members,
            "n_classes": self.n_classes, "member": self.member, "weights": self.weights,
            "temperature": self.temperature, "rounds": self.rounds,
            "model": XGB_FILE if self.booster is not None else None,
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
        stacker = cls(state["kind"], features=state["features"])
        stacker.n_members, stacker.n_classes = state["n_members"], state["n_classes"]
        for key in ("member", "weights", "temperature", "rounds"):
            setattr(stacker, key, state[key])
        if state["model"]:
            stacker.booster = xgb.Booster()
            stacker.booster.load_model(str(Path(folder) / state["model"]))
        return stacker


# ---------------------------------------------------------------------------------------------------------
# Nested comparison and the final fit.


def nested_fits(
    template: Stacker, members: list[np.ndarray], y: np.ndarray, folds: np.ndarray
) -> tuple[np.ndarray, list[Stacker]]:
    """Nested OOF probabilities [N, C] (float64) and the per-fold stackers: fold k's rows are predicted by
    a copy of ``template`` fitted on the other folds' rows only (its early stopping included)."""
    folds = np.asarray(folds)
    out = np.zeros(members[0].shape, dtype=np.float64)
    fitted = []
    for k in np.unique(folds):
        val = folds == k
        s = template.clone().fit([m[~val] for m in members], y[~val], folds[~val])
        out[val] = s.predict_proba([m[val] for m in members])
        fitted.append(s)
    if template.kind == "xgboost":
        log.info(
            "xgboost rounds per outer fold (early-stopped on an inner fold): %s", [s.rounds for s in fitted]
        )
    return out, fitted


def refit(
    template: Stacker, members: list[np.ndarray], y: np.ndarray, folds: np.ndarray, nested: list[Stacker]
) -> Stacker:
    """The final stacker on all OOF; XGBoost takes the median of the nested fits' rounds (no row is left to
    early-stop on without scoring on training rows)."""
    rounds = None
    if template.kind == "xgboost":
        rounds = max(1, round(float(np.median([s.rounds for s in nested]))))
    return template.clone().fit(members, y, folds, rounds=rounds)


def _kind(method: str) -> str:
    return method.split(" ", 1)[0]


def compare(
    members: list[np.ndarray], y: np.ndarray, folds: np.ndarray, classes: list[str], names: list[str],
    *, template: Stacker,
) -> tuple[pd.DataFrame, dict[str, tuple[np.ndarray, list[Stacker]]]]:  # fmt: skip
    """The nested comparison: a table (method, accuracy, macro_f1, log_loss; one row per kind, ``single``
    naming its member; xgboost only up to ``template.max_classes`` classes) and, per kind, its nested OOF
    probabilities and per-fold stackers."""
    import pandas as pd

    kinds = [k for k in KINDS if k != "xgboost" or len(classes) <= template.max_classes]
    if "xgboost" not in kinds:
        log.info(
            "%d classes > stack_max_classes (%d): no XGBoost stacker (cost ~ members x classes^2 per round)",
            len(classes), template.max_classes,
        )  # fmt: skip
    rows, fits = [], {}
    for kind in kinds:
        probs, fitted = nested_fits(template.clone(kind), members, y, folds)
        fits[kind] = (probs, fitted)
        method = f"single ({names[best_member(members, y)]})" if kind == "single" else kind
        rows.append({"method": method, **index_scores(log_probs(probs), y, classes)})
    return pd.DataFrame(rows, columns=["method", "accuracy", "macro_f1", "log_loss"]), fits


def choose(table: pd.DataFrame, *, stacker: str = "auto", max_classes: int = 50) -> str:
    """``stacker``, or for 'auto' the kind with the lowest nested log-loss (the simpler one on ties)."""
    kinds = [_kind(m) for m in table["method"]]
    if stacker == "auto":
        return kinds[int(np.argmin(table["log_loss"].to_numpy()))]
    if stacker not in kinds:
        raise StackError(
            f"stacker {stacker!r} was not evaluated (rows: {', '.join(kinds)}): above stack_max_classes "
            f"({max_classes}) classes there is no XGBoost stacker; use --stacker auto or blend"
        )
    return stacker


@dataclass
class StackResult:
    """What :func:`fit_stacker` found: the comparison, the kind chosen, its nested OOF and the final fit."""

    table: pd.DataFrame
    kind: str
    nested: np.ndarray  # [N, C] float64 probabilities of the chosen kind, nested
    final: Stacker


def fit_stacker(
    members: list[np.ndarray], y: np.ndarray, folds: np.ndarray, classes: list[str], names: list[str],
    *, template: Stacker, choice: str = "auto",
) -> StackResult:  # fmt: skip
    """Compare every kind nested on ``folds``, choose (``choice``: a kind or auto), refit it on all rows.

    Args:
        members: per member its OOF logits, float [N, C], rows aligned with ``y`` and ``folds``.
        y: true class indices, int [N]; folds: fold id of each row, int [N].
        classes: the C class names; names: the members' names (for the table's single row).
        template: the settings every fitted stacker copies (its kind is ignored).

    Raises:
        StackError: ``choice`` is xgboost above ``template.max_classes`` classes, or a member is malformed.
    """
    if choice == "xgboost" and len(classes) > template.max_classes:
        raise StackError(
            f"stacker xgboost asked for but {len(classes)} classes > stack_max_classes ({template.max_classes}): "
            "XGBoost's cost grows as members x classes^2 per round; use --stacker auto or blend"
        )
    table, fits = compare(members, y, folds, classes, names, template=template)
    kind = choose(table, stacker=choice, max_classes=template.max_classes)
    probs, nested = fits[kind]
    final = refit(template.clone(kind), members, y, folds, nested)
    return StackResult(table, kind, probs, final)
