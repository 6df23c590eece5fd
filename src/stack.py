"""Stacking: combine several experiments' out-of-fold predictions, nested on the folds that made them.

``python src/stack.py --config configs/X.yaml`` stacks the experiments ``stack_members`` (default: every
``<output_dir>/*/oof.npz`` except stack outputs, which carry a ``stack.json``). Every member must come from the
same ``folds.csv`` (same images, fold ids and classes); a member that does not is refused by name, since its
"out-of-fold" logits could come from a model trained on the very images the stacker is scored on.

Four combiners are scored on the same OOF, each **nested**: the prediction for fold k comes from a combiner
fitted on the other folds only, so the table compares honest numbers and never rewards a stacker for
memorising its own training rows:

- ``single``: the member with the lowest OOF log-loss, alone (nested: chosen on the training folds);
- ``mean``: softmax of the mean of the members' log-probabilities (``stack_features logits``) or the mean of
  their probabilities (``probs``); ``stack_features`` also sets what XGBoost sees;
- ``blend``: non-negative weights summing to 1 over the members' log-probabilities plus one global
  temperature, fitted by minimising log-loss (scipy);
- ``xgboost``: XGBoost ``multi:softprob`` over the concatenated members' logits (or probabilities), [N, M*C];
  its number of rounds is chosen by early stopping on an inner fold *of the training folds*, and the final
  stacker, refitted on all OOF, uses the median of the nested fits' rounds.

``stacker auto`` keeps the lowest nested log-loss (ties go to the simpler combiner). **Class threshold**:
above ``stack_max_classes`` (default 50) classes XGBoost is not fitted. It sees M*C features and grows C
trees per round, each scanning histograms of all M*C features, so a round costs ~ N*M*C^2. Measured here
(2,000 images x 3 members, one thread, other jobs sharing the 2 cores): 0.04 s per round at 10 classes,
0.6 s at 50, 7 s at 200; the nested scheme fits 2K+1 models (an early-stopping probe and a refit per outer
fold, then the final one) of a few hundred rounds each, so 50 classes already cost about half an hour on one
core and 200 classes hours, while the images per class each tree learns from shrink. The blend's cost is
linear in C and it has M+1 parameters whatever C is, so above the threshold ``auto`` picks among single,
mean and blend, and ``stacker xgboost`` is an error.

Writes ``<output_dir>/<stack_exp>/``: ``oof.npz`` (the chosen combiner's nested OOF log-probabilities in
``logits``, scored by report.py like any experiment), ``stack_report.csv`` and ``stack_report.md`` (the
members' and the four combiners' OOF scores, the choice), ``stacker/`` (the final combiner, refitted on all
OOF: :meth:`Stacker.save`), ``stack.json`` (members, features, chosen kind, classes) and ``config.yaml``.
The folder is built beside the old one and swapped in whole, so it never mixes two runs.
:class:`Stacker` needs only numpy and xgboost to load and predict (pandas, scikit-learn and scipy's
optimiser are imported by the stage functions that use them), so the prediction image can stay small.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import xgboost as xgb

from lib.common import atomic_path, atomic_write, get_logger, num_workers
from lib.config import Config, parse_config, save_config

if TYPE_CHECKING:
    import pandas as pd

log = get_logger("stack")

KINDS = ("single", "mean", "blend", "xgboost")  # simplest first: ties in auto go to the simpler one
MARKER = "stack.json"  # marks a stack output, which is never taken as a member
STACKER_FILE = "stacker.json"
XGB_FILE = "xgb_model.ubj"
FORMAT = 1
PROB_FLOOR = 1e-15  # log(0) would make the OOF file unscorable; exp(-34.5) is "impossible" enough
BLEND_LOG_T = 3.0  # the blend's temperature stays within e^-3..e^3 (0.05..20): beyond is degenerate
BLEND_LOGIT_W = 30.0  # weight logits bounded: e^-60 is zero for every purpose, and L-BFGS-B stays finite
INNER_FRACTION = 0.2  # held-out share for early stopping when the rows given span a single fold


class StackError(ValueError):
    """The members or settings cannot be stacked; the message names the experiment and the fix."""


# ---------------------------------------------------------------------------------------------------------
# The combiner.


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _softmax(z: np.ndarray) -> np.ndarray:
    return np.exp(_log_softmax(z))


def _nll(log_probs: np.ndarray, y: np.ndarray) -> float:
    return float(-log_probs[np.arange(len(y)), y].mean())


def _best_member(members: list[np.ndarray], y: np.ndarray) -> int:
    """Index of the member with the lowest log-loss on these rows (the first one on ties)."""
    return int(np.argmin([_nll(_log_softmax(m), y) for m in members]))


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
        w, s = _softmax(theta[None, :m])[0], np.exp(theta[m])  # s = 1 / T
        mix = np.tensordot(w, log_probs, axes=1)  # [N, C]
        ls = _log_softmax(s * mix)
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
    return _softmax(res.x[None, :m])[0], float(np.exp(-res.x[m]))


class Stacker:
    """Combines members' logits [N, C] into class probabilities. kind: 'xgboost' | 'blend' | 'mean' | 'single'.

    ``features`` ('logits' | 'probs') is what the mean averages and what XGBoost sees; the blend always
    mixes log-probabilities and 'single' uses its member's logits. XGBoost settings come from ``cfg``.
    """

    def __init__(self, kind: str, features: str = "logits", cfg: Config | None = None) -> None:
        if kind not in KINDS:
            raise StackError(f"unknown stacker kind {kind!r}: one of {', '.join(KINDS)}")
        if features not in ("logits", "probs"):
            raise StackError(f"unknown stack features {features!r}: logits or probs")
        cfg = cfg or Config()
        self.kind, self.features = kind, features
        self.n_members = 0
        self.n_classes = 0
        self.member: int | None = None  # single: the member used
        self.weights: list[float] | None = None  # blend
        self.temperature: float | None = None  # blend
        self.rounds: int | None = None  # xgboost: boosting rounds of the fitted model
        self.booster: xgb.Booster | None = None
        self.max_classes = cfg.stack_max_classes
        self.max_rounds, self.early_stop, self.seed = cfg.xgb_rounds, cfg.xgb_early_stop, cfg.seed
        self.params = {
            "objective": "multi:softprob", "tree_method": "hist", "eval_metric": "mlogloss",
            "max_depth": cfg.xgb_max_depth, "eta": cfg.xgb_eta, "nthread": num_workers(cfg.workers),
            "seed": cfg.seed,
        }  # fmt: skip

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
        parts = members if self.features == "logits" else [_softmax(m) for m in members]
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
            self.member = _best_member(members, y)
        elif self.kind == "blend":
            weights, self.temperature = _fit_blend(np.stack([_log_softmax(m) for m in members]), y)
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
            return _softmax(members[self.member])
        if self.kind == "mean" and self.features == "probs":
            return np.mean([_softmax(m) for m in members], axis=0)
        if self.kind == "mean":
            return _softmax(np.mean([_log_softmax(m) for m in members], axis=0))
        if self.kind == "blend":
            mix = sum(w * _log_softmax(m) for w, m in zip(self.weights, members, strict=True))
            return _softmax(mix / self.temperature)
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
            raise StackError(f"{path} is missing or unreadable ({e}): re-run python src/stack.py") from e
        if state.get("format") != FORMAT:
            raise StackError(
                f"{path} has format {state.get('format')!r}, expected {FORMAT}: re-run src/stack.py"
            )
        stacker = cls(state["kind"], state["features"])
        stacker.n_members, stacker.n_classes = state["n_members"], state["n_classes"]
        for key in ("member", "weights", "temperature", "rounds"):
            setattr(stacker, key, state[key])
        if state["model"]:
            stacker.booster = xgb.Booster()
            stacker.booster.load_model(str(Path(folder) / state["model"]))
        return stacker


# ---------------------------------------------------------------------------------------------------------
# Nested evaluation.


def nested_fits(
    kind: str, members: list[np.ndarray], y: np.ndarray, folds: np.ndarray, cfg: Config
) -> tuple[np.ndarray, list[Stacker]]:
    """Nested OOF probabilities [N, C] and the per-fold stackers: fold k's rows are predicted by a stacker
    fitted on the other folds' rows only (its early stopping included)."""
    folds = np.asarray(folds)
    out = np.zeros(members[0].shape, dtype=np.float64)
    fitted = []
    for k in np.unique(folds):
        val = folds == k
        s = Stacker(kind, cfg.stack_features, cfg).fit([m[~val] for m in members], y[~val], folds[~val])
        out[val] = s.predict_proba([m[val] for m in members])
        fitted.append(s)
    if kind == "xgboost":
        log.info(
            "xgboost rounds per outer fold (early-stopped on an inner fold): %s", [s.rounds for s in fitted]
        )
    return out, fitted


def nested_oof(
    kind: str, members: list[np.ndarray], y: np.ndarray, folds: np.ndarray, cfg: Config
) -> np.ndarray:
    """[N, C] probabilities; fold k's rows from a stacker fitted without fold k."""
    return nested_fits(kind, members, y, folds, cfg)[0]


def refit(
    kind: str, members: list[np.ndarray], y: np.ndarray, folds: np.ndarray, cfg: Config, nested: list[Stacker]
) -> Stacker:
    """The final stacker on all OOF; XGBoost takes the median of the nested fits' rounds (no row is left to
    early-stop on without scoring on training rows)."""
    rounds = None
    if kind == "xgboost":
        rounds = max(1, round(float(np.median([s.rounds for s in nested]))))
    return Stacker(kind, cfg.stack_features, cfg).fit(members, y, folds, rounds=rounds)


def _log_probs(p: np.ndarray) -> np.ndarray:
    return np.log(np.clip(p, PROB_FLOOR, 1.0))


def _scores(log_p: np.ndarray, y: np.ndarray, classes: list[str]) -> dict[str, float]:
    from lib.metrics import logit_scores

    s = logit_scores(log_p, np.asarray(classes)[y], classes)
    return {"accuracy": s["accuracy"], "macro_f1": s["macro_f1"], "log_loss": s["log_loss"]}


def evaluate(
    members: list[np.ndarray],
    y: np.ndarray,
    folds: np.ndarray,
    classes: list[str],
    cfg: Config,
    names: list[str],
) -> tuple[pd.DataFrame, dict[str, tuple[np.ndarray, list[Stacker]]]]:
    """The comparison table and, per kind, its nested OOF probabilities and per-fold stackers."""
    import pandas as pd

    kinds = [k for k in KINDS if k != "xgboost" or len(classes) <= cfg.stack_max_classes]
    if "xgboost" not in kinds:
        log.info(
            "%d classes > stack_max_classes (%d): no XGBoost stacker (cost ~ members x classes^2 per round)",
            len(classes), cfg.stack_max_classes,
        )  # fmt: skip
    rows, fits = [], {}
    for kind in kinds:
        probs, fitted = nested_fits(kind, members, y, folds, cfg)
        fits[kind] = (probs, fitted)
        method = f"single ({names[_best_member(members, y)]})" if kind == "single" else kind
        rows.append({"method": method, **_scores(_log_probs(probs), y, classes)})
    return pd.DataFrame(rows, columns=["method", "accuracy", "macro_f1", "log_loss"]), fits


def compare(
    members: list[np.ndarray],
    y: np.ndarray,
    folds: np.ndarray,
    classes: list[str],
    cfg: Config,
    names: list[str],
) -> pd.DataFrame:
    """Nested OOF accuracy, macro-F1 and log-loss of single (named), mean, blend and xgboost (when
    C <= stack_max_classes)."""
    return evaluate(members, y, folds, classes, cfg, names)[0]


def _kind(method: str) -> str:
    return method.split(" ", 1)[0]


def choose(table: pd.DataFrame, cfg: Config) -> str:
    """cfg.stacker, or for 'auto' the lowest nested log-loss (the simpler combiner on ties)."""
    kinds = [_kind(m) for m in table["method"]]
    if cfg.stacker == "auto":
        return kinds[int(np.argmin(table["log_loss"].to_numpy()))]
    if cfg.stacker not in kinds:
        raise StackError(
            f"stacker {cfg.stacker!r} was not evaluated (rows: {', '.join(kinds)}): above stack_max_classes "
            f"({cfg.stack_max_classes}) classes there is no XGBoost stacker; use --stacker auto or blend"
        )
    return cfg.stacker


# ---------------------------------------------------------------------------------------------------------
# Members.


def find_members(cfg: Config) -> list[str]:
    """cfg.stack_members, else every experiment with an oof.npz except stack outputs, sorted by name."""
    out = Path(cfg.output_dir)
    if cfg.stack_members:
        names = list(dict.fromkeys(cfg.stack_members))
        if cfg.stack_exp in names:
            raise StackError(
                f"stack_exp {cfg.stack_exp!r} is also a member: its output would replace its input"
            )
        return names
    names = sorted(
        p.parent.name for p in out.glob("*/oof.npz")
        if p.parent.name != cfg.stack_exp and not p.parent.name.startswith(".") and not (p.parent / MARKER).exists()
    )  # fmt: skip
    if not names:
        raise StackError(
            f"no experiment with an oof.npz under {out}/ to stack: train every fold first (python src/train.py "
            "--config <your config> --fold all) and/or fine-tune it (python src/finetune.py --config ...)"
        )
    return names


def _read_members(
    cfg: Config, exps: list[str]
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, list[str], pd.DataFrame]:
    from folds import read_folds
    from lib.oof import OOFError, aligned

    if not exps:
        raise StackError("no members to stack: set stack_members or train an experiment first")
    folds_path = Path(cfg.folds_csv)
    if not folds_path.is_file():
        raise StackError(f"{folds_path} not found: run python src/folds.py --config <your config> first")
    table = read_folds(folds_path)
    classes = sorted(table["label"].unique().tolist())
    members = []
    for exp in exps:
        path = Path(cfg.output_dir) / exp / "oof.npz"
        if not path.is_file():
            raise StackError(
                f"member {exp!r} has no {path}: train every fold of it (python src/train.py --config <its config> "
                "--fold all) or finish its fine-tune (python src/finetune.py --config <its config>)"
            )
        try:
            logits, got = aligned(path, table)
        except OOFError as e:
            raise StackError(f"member {exp!r} does not share {folds_path} with the others: {e}") from None
        if got != classes:
            raise StackError(
                f"member {exp!r} has classes {got[:5]}{'...' if len(got) > 5 else ''} ({len(got)}) but "
                f"{folds_path} has {classes[:5]}{'...' if len(classes) > 5 else ''} ({len(classes)}): re-run it "
                "on the current folds.csv"
            )
        if not np.isfinite(logits).all():
            raise StackError(
                f"member {exp!r}: {path} holds NaN or inf logits; re-run the stage that wrote it"
            )
        members.append(logits)
    y = table["label"].map({c: i for i, c in enumerate(classes)}).to_numpy(dtype=np.int64)
    return members, y, table["fold"].to_numpy(dtype=np.int64), classes, table


def load_members(cfg: Config, exps: list[str]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, list[str]]:
    """(member logits aligned with folds.csv, y [N], folds [N], classes); members whose images, fold ids or
    classes differ from folds.csv are refused by name."""
    return _read_members(cfg, exps)[:4]


# ---------------------------------------------------------------------------------------------------------
# The stage.


def markdown(
    cfg: Config, table: pd.DataFrame, member_rows: pd.DataFrame, chosen: str, final: Stacker, n_classes: int
) -> str:
    """stack_report.md: the members, the four nested rows with the choice marked, how the choice was made."""

    def rows(df: pd.DataFrame, mark: str | None) -> list[str]:
        out = []
        for r in df.itertuples(index=False):
            star = " **(chosen)**" if mark is not None and _kind(r.method) == mark else ""
            out.append(f"| {r.method}{star} | {r.accuracy:.4f} | {r.macro_f1:.4f} | {r.log_loss:.4f} |")
        return out

    head = ["| method | accuracy | macro_f1 | log_loss |", "| --- | ---: | ---: | ---: |"]
    how = (
        "the lowest nested log-loss, stacker auto"
        if cfg.stacker == "auto"
        else f"set by stacker {cfg.stacker} in the config"
    )
    lines = [
        f"# Stack `{cfg.stack_exp}`", "",
        f"{len(member_rows)} member(s), features {cfg.stack_features}, {n_classes} classes, folds from "
        f"`{cfg.folds_csv}`.", "", "## Members (their own OOF)", "", *head, *rows(member_rows, None), "",
        "## Combiners (nested: fold k predicted by a combiner fitted without fold k)", "", *head,
        *rows(table, chosen), "", f"Chosen: **{chosen}**, {how}.",
    ]  # fmt: skip
    if chosen == "blend":
        lines.append(
            f"Blend weights {[round(w, 4) for w in final.weights]}, temperature {final.temperature:.4f}."
        )
    if final.rounds is not None:
        lines.append(
            f"Final XGBoost refitted on all OOF with {final.rounds} rounds (median of the nested fits)."
        )
    if n_classes > cfg.stack_max_classes:
        lines.append(
            f"No XGBoost row: {n_classes} classes > stack_max_classes ({cfg.stack_max_classes}); its cost grows "
            "as members x classes^2 per round."
        )
    return "\n".join(lines) + "\n"


def _publish(staging: Path, target: Path) -> None:
    """Swap the finished folder in for the old one: readers see one whole run or the other."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old)


def run(cfg: Config) -> str:
    """Stack the members, write ``<output_dir>/<stack_exp>/`` and return the report's markdown."""
    import pandas as pd

    from lib.oof import write_oof

    target = Path(cfg.output_dir) / cfg.stack_exp
    if target.is_dir() and any(target.iterdir()) and not (target / MARKER).is_file():
        raise StackError(
            f"{target} exists and is not a stack output (no {MARKER}): set another stack_exp rather than replace it"
        )
    names = find_members(cfg)
    members, y, folds, classes, table_rows = _read_members(cfg, names)
    if cfg.stacker == "xgboost" and len(classes) > cfg.stack_max_classes:
        raise StackError(
            f"stacker xgboost asked for but {len(classes)} classes > stack_max_classes ({cfg.stack_max_classes}): "
            "XGBoost's cost grows as members x classes^2 per round; use --stacker auto or blend"
        )
    log.info("stacking %d member(s) over %d images x %d classes: %s", len(names), len(y), len(classes), names)
    table, fits = evaluate(members, y, folds, classes, cfg, names)
    chosen = choose(table, cfg)
    probs, nested = fits[chosen]
    final = refit(chosen, members, y, folds, cfg, nested)
    member_rows = pd.DataFrame(
        [{"method": n, **_scores(_log_softmax(m), y, classes)} for n, m in zip(names, members, strict=True)]
    )
    text = markdown(cfg, table, member_rows, chosen, final, len(classes))
    report = pd.concat(
        [member_rows.assign(role="member", chosen=False),
         table.assign(role="stacker", chosen=[_kind(m) == chosen for m in table["method"]])],
        ignore_index=True,
    )[["role", "method", "accuracy", "macro_f1", "log_loss", "chosen"]]  # fmt: skip
    state = {
        "members": names, "features": cfg.stack_features, "kind": chosen, "classes": classes,
        "stacker": "stacker", "folds_csv": cfg.folds_csv, "chosen_by": cfg.stacker,
    }  # fmt: skip

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{cfg.stack_exp}.tmp-{os.getpid()}")  # dot: never taken as a member
    shutil.rmtree(staging, ignore_errors=True)  # a killed run's leftover with the same pid
    staging.mkdir()
    try:
        atomic_write(staging / MARKER, json.dumps(state, indent=2) + "\n")
        final.save(staging / "stacker")
        write_oof(staging / "oof.npz", table_rows, _log_probs(probs), classes)
        with atomic_path(staging / "stack_report.csv") as tmp:
            report.to_csv(tmp, index=False)
        atomic_write(staging / "stack_report.md", text)
        save_config(cfg, staging / "config.yaml")
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("chose %s; wrote %s", chosen, target)
    return text


DESCRIPTION = (
    "Stack experiments' OOF predictions (single, mean, blend, XGBoost), nested on the same folds. Above "
    "stack_max_classes classes XGBoost is not fitted (it sees members x classes features and grows one tree "
    "per class per round: cost ~ members x classes^2 per round); auto then picks among single, mean and blend."
)


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_config(argv, DESCRIPTION, stage="stack")
    from lib.oof import OOFError

    try:
        text = run(cfg)
    except (StackError, OOFError) as e:
        log.error("%s", e)
        return 2
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
