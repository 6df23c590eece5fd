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

**auto.** ``distill_temperature: auto`` calibrates the teacher by nested temperature scaling (Guo et al.,
"On calibration of modern neural networks", ICML 2017): for each fold k, T_k minimises the log-loss of
softmax(logits / T) on the other folds' OOF rows, and scores fold k (the nested log-loss); the soft labels use
the T fitted on every row. ``distill_alpha: auto`` sets alpha to the calibrated teacher's nested log-loss over
the class prior's (:func:`auto_alpha` says why). The choice and the nested numbers go to a JSON beside the
soft-label file (``soft_labels.json``: alpha, temperature, where each came from, the per-fold T, log-losses,
accuracy); the .npz is the same as ever. Above ``FIT_CELLS`` rows x classes the fits read a seeded sample of
rows: one or two parameters need no more.

**Verdict.** ``python src/distill.py --config configs/X.yaml --verdict --student <student> [--fold K]`` judges
a student trained on one fold (K: default the first of folds.csv) against the teacher on that fold's rows and
writes ``<output_dir>/<student>/distill_verdict.json`` (:func:`judge`); run_all.sh continues the round's other
folds only when it pays. Exit 0 either way: not paying is an answer, not an error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from lib.common import PipelineError, atomic_write, get_logger
from lib.config import AUTO, NONE, Config, ConfigError, load_config, parse_config
from lib.layout import LayoutError, class_names, experiment, read_folds, targets
from lib.metrics import fit_temperature, log_softmax, softmax
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


class DistillError(PipelineError):
    """The config asks for no distillation (distill_alpha none); the message says what to set."""


ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # the values distill_alpha: auto picks from
FIT_CELLS = 1 << 22  # rows x classes the fits and the verdict read at most (above: a seeded sample of rows)
VERDICT = "distill_verdict.json"  # the verdict's file, in the student's experiment folder


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


# ---------------------------------------------------------------------------------------------------------
# Nested temperature scaling and the auto alpha.


def label_log_probs(logits: np.ndarray, labels: np.ndarray, temperature: float) -> np.ndarray:
    """float64 [N]: log softmax(logits / temperature) at each row's class ``labels`` (int [N])."""
    return log_softmax(np.asarray(logits, np.float64) / temperature)[np.arange(len(labels)), labels]


def nested_temperatures(
    logits: np.ndarray, labels: np.ndarray, groups: np.ndarray
) -> tuple[dict[int, float], np.ndarray]:
    """Nested temperature scaling: for each group g of ``groups`` (int [N], e.g. fold ids), T_g fitted on
    the other groups' rows, and each row's log-probability of its label at its group's T (float64 [N]; minus
    its mean is the nested log-loss: every row scored by a T that never saw it). A group alone keeps T 1."""
    temperatures, log_p = {}, np.zeros(len(labels))
    for g in np.unique(groups):
        inside = groups == g
        t = fit_temperature(logits[~inside], labels[~inside]) if (~inside).any() else 1.0
        temperatures[int(g)] = t
        log_p[inside] = label_log_probs(logits[inside], labels[inside], t)
    return temperatures, log_p


def nested_prior_log_loss(labels: np.ndarray, groups: np.ndarray, n_classes: int) -> float:
    """Mean log-loss of the class frequencies of the other groups' rows, add-one smoothed (a class absent
    there costs log(n + C), not infinity): the score of a teacher that knows nothing about the image."""
    total = 0.0
    for g in np.unique(groups):
        inside = groups == g
        counts = np.bincount(labels[~inside], minlength=n_classes) + 1.0
        total -= float(np.log(counts[labels[inside]] / counts.sum()).sum())
    return total / max(1, len(labels))


def nested_scores(logits: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> dict[str, Any]:
    """A model's logits (float [N, C]) scored nested on ``groups`` (int [N]): log_loss (calibrated by
    :func:`nested_temperatures`), log_loss_t1 (raw), accuracy, prior_log_loss, the per-group temperatures
    and the temperature fitted on every row."""
    temperatures, log_p = nested_temperatures(logits, labels, groups)
    return {
        "rows": len(labels),
        "log_loss": float(-log_p.mean()),
        "log_loss_t1": float(-label_log_probs(logits, labels, 1.0).mean()),
        "accuracy": float(np.mean(np.asarray(logits).argmax(axis=1) == labels)),
        "prior_log_loss": nested_prior_log_loss(labels, groups, logits.shape[1]),
        "group_temperatures": {str(g): t for g, t in temperatures.items()},
        "temperature": fit_temperature(logits, labels),
    }


def auto_alpha(teacher_log_loss: float, prior_log_loss: float) -> float:
    """distill_alpha: auto: the grid value (ALPHA_GRID, 0.3..0.9) nearest teacher_log_loss / prior_log_loss,
    both nested (the teacher calibrated by :func:`nested_temperatures`, the prior from the other folds).

    The soft label mixes two estimates of an image's class distribution: its one-hot label (unbiased but a
    single draw) and the teacher (smooth but carrying its own errors). The weight each deserves is not
    measurable by scoring soft labels against the labels: the one-hot part trivially predicts its own
    label, so every such score picks alpha = 1. What the teacher's OOF does measure is the share of the
    labels' uncertainty (the class prior's log-loss) the teacher explains on images it never saw, 1 -
    ratio (McFadden's pseudo-R^2); calibrated first, so over-confidence does not pass for knowledge. The
    rule gives the teacher that share and the label the rest: a teacher no better than the prior gets 0.9
    (the round is nearly a retraining, and the pilot decides), a near-perfect one 0.3 (its soft labels are
    near one-hot anyway; below 0.3 the student would be trained mostly to imitate). Not chosen: putting on
    the label the probability that it is right as the calibrated teacher estimates it, which is exactly
    what the teacher part already puts there (alpha 0), and which cannot tell label noise from the
    teacher's ignorance, so it would give a useless teacher the most say. The optimal shrinkage weight
    (teacher error / (teacher error + label noise)) is not identifiable from one label per image: only the
    sum is. Published solutions used 0.6-0.7 by hand.
    """
    ratio = teacher_log_loss / prior_log_loss if prior_log_loss > 0 else 1.0
    return min(ALPHA_GRID, key=lambda a: abs(a - ratio))


def sample_rows(n: int, n_classes: int, seed: int, within: np.ndarray | None = None) -> np.ndarray:
    """Sorted positions (int64) of the rows a fit reads: every row of ``within`` (bool [n]; default all)
    while rows x classes <= FIT_CELLS, else a seeded sample of that many cells."""
    rows = np.arange(n) if within is None else np.flatnonzero(within)
    cap = max(1, FIT_CELLS // max(1, n_classes))
    if len(rows) <= cap:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, cap, replace=False))


def dense_rows(view: Aligned, rows: np.ndarray) -> np.ndarray:
    """float32 [len(rows), C] logits of the aligned rows ``rows`` (a top-k row made dense, its residual
    spread evenly).

    Raises:
        OOFError: a row holds NaN or +inf.
    """
    part = view.stored.take(view.order[rows])
    logits = part.dense() if isinstance(part, TopK) else part
    if np.isnan(logits).any() or (logits == np.inf).any():
        raise OOFError(f"{view.stored.path} holds NaN or inf values: re-run the stage that wrote it")
    return logits


def resolve_settings(
    view: Aligned,
    labels: np.ndarray,
    fold_ids: np.ndarray,
    *,
    alpha: float | str,
    temperature: float | str,
    seed: int,
) -> dict[str, Any]:
    """The alpha and temperature the soft labels use: the config's numbers, or where one is ``auto`` the
    nested choice from the teacher's rows ``view`` (folds.csv order; ``labels``, ``fold_ids`` int [N]) with
    the nested numbers behind it (``nested``: :func:`nested_scores` over the folds; None when nothing is auto)."""
    settings: dict[str, Any] = {
        "alpha": alpha, "temperature": temperature, "alpha_from": "config", "temperature_from": "config",
        "nested": None,
    }  # fmt: skip
    if AUTO not in (alpha, temperature):
        return settings
    rows = sample_rows(len(labels), view.stored.n_classes, seed)
    nested = nested_scores(dense_rows(view, rows), labels[rows], fold_ids[rows])
    nested["sampled_from"] = len(labels)
    settings["nested"] = nested
    if alpha == AUTO:
        settings.update(alpha=auto_alpha(nested["log_loss"], nested["prior_log_loss"]), alpha_from="auto")
    if temperature == AUTO:
        settings.update(temperature=nested["temperature"], temperature_from="auto")
    return settings


def metadata_path(soft_labels: Path) -> Path:
    """The JSON beside a soft-label file: its alpha, temperature and nested numbers."""
    return Path(soft_labels).with_suffix(".json")


def make_soft_labels(cfg: Config, out: Path | None = None) -> Path:
    """Write the soft labels of every folds.csv image from the ``cfg.exp`` teacher's OOF logits, and beside
    them (:func:`metadata_path`) the alpha and temperature used with the nested numbers behind an ``auto``.

    Raises:
        DistillError: distill_alpha is none. LayoutError: folds.csv is missing. OOFError: the teacher's OOF is
        missing or does not match folds.csv.
    """
    if cfg.distill_alpha == NONE:
        raise DistillError("distill_alpha is none: there is no round to make soft labels for (set a number or auto)")
    folds = read_folds(cfg.folds_csv)
    classes = class_names(folds)
    teacher = experiment(cfg.output_dir, cfg.exp)
    labels = targets(folds, classes)
    try:
        view = open_aligned(teacher.oof, folds, classes)
        settings = resolve_settings(
            view, labels, folds["fold"].to_numpy(dtype=int), alpha=cfg.distill_alpha,
            temperature=cfg.distill_temperature, seed=cfg.seed,
        )  # fmt: skip
        soft, agree, weight = distill_rows(
            view, labels, alpha=settings["alpha"], temperature=settings["temperature"], **cfg.store_options()
        )
    except OOFError as e:
        raise OOFError(f"teacher {cfg.exp!r}: {e} (retrain the teacher on the current folds.csv)") from None
    out = Path(out) if out else teacher.soft_labels
    write_oof(out, folds, soft, classes, key=SOFT_KEY, **cfg.store_options())
    meta = {"teacher": cfg.exp, "soft_labels": out.name, **settings, "teacher_accuracy": agree}
    atomic_write(metadata_path(out), json.dumps({**meta, "mean_true_weight": weight}, indent=2) + "\n")
    log.info(
        f"{len(folds)} soft labels from {teacher.oof} (teacher OOF accuracy {agree:.4f}; {_settings_line(settings)}; "
        f"mean weight on the true class {weight:.3f}; {'top-' + str(soft.k) if isinstance(soft, TopK) else 'dense'}) "
        f"-> {out} (+ {metadata_path(out).name})"
    )
    return out


def _settings_line(settings: dict[str, Any]) -> str:
    """alpha and T as the log states them, with the nested numbers behind an auto."""
    line = (
        f"alpha {settings['alpha']} ({settings['alpha_from']}), "
        f"T {settings['temperature']:.4g} ({settings['temperature_from']})"
    )
    if (nested := settings["nested"]) is not None:
        per_fold = ", ".join(f"{t:.3g}" for t in nested["group_temperatures"].values())
        line += (
            f"; nested over {nested['rows']} rows: T per fold {per_fold}, teacher log-loss {nested['log_loss']:.4f} "
            f"calibrated ({nested['log_loss_t1']:.4f} raw), class prior {nested['prior_log_loss']:.4f}"
        )
    return line


# ---------------------------------------------------------------------------------------------------------
# The pilot's verdict.


def half_split(groups: np.ndarray, seed: int) -> np.ndarray:
    """int [n] 0 or 1 per row: whole groups (``groups`` int [n], folds.csv's) dealt alternately to two
    halves in a seeded order, so a near-duplicate never calibrates its own copy."""
    unique, inverse = np.unique(groups, return_inverse=True)
    side = np.random.default_rng(seed).permutation(len(unique)) % 2
    return side[inverse.ravel()]


def judge(student: np.ndarray, teacher: np.ndarray, labels: np.ndarray, halves: np.ndarray) -> dict[str, Any]:
    """Whether a student's pilot fold pays, from its logits and the teacher's on the same rows (float [n, C]
    each; ``labels`` int [n]; ``halves`` int [n] from :func:`half_split`).

    Both are scored alike, nested: each half calibrated by the temperature fitted on the other half (the
    stack calibrates whatever it is given, so raw over- or under-confidence must not decide), then
    log-loss; accuracy needs no calibration. The round pays when the student's nested log-loss is strictly
    lower and its accuracy not lower (at least as many rows right): a round must buy both, not trade one
    for the other.
    """
    scores = {}
    for name, logits in (("student", student), ("teacher", teacher)):
        nested = nested_scores(logits, labels, halves)
        keep = ("log_loss", "accuracy", "log_loss_t1")
        scores[name] = {**{k: nested[k] for k in keep}, "half_temperatures": nested["group_temperatures"]}
    s, t = scores["student"], scores["teacher"]
    pays = s["log_loss"] < t["log_loss"] and s["accuracy"] >= t["accuracy"]
    return {"pays": bool(pays), "rows": len(labels), **scores}


def _soft_settings(student_config: Path) -> dict[str, Any]:
    """alpha and temperature of the soft labels a student was trained on (its config's soft_labels file's
    JSON), or {} where that is not known."""
    try:
        meta = json.loads(metadata_path(Path(load_config(student_config).soft_labels)).read_text())
    except (ConfigError, OSError, ValueError):
        return {}
    return {key: meta.get(key) for key in ("alpha", "temperature", "alpha_from", "temperature_from")}


def write_verdict(cfg: Config, student: str, fold: int | None = None) -> dict[str, Any]:
    """Judge student ``student``'s fold ``fold`` (default: the first of folds.csv) against the teacher
    ``cfg.exp`` on that fold's rows (:func:`judge`; a seeded sample above FIT_CELLS) and write the verdict
    to ``<output_dir>/<student>/distill_verdict.json``.

    Raises:
        LayoutError: folds.csv is missing or lacks the fold. OOFError: the student's fold OOF or the
        teacher's OOF is missing or does not match folds.csv.
    """
    folds = read_folds(cfg.folds_csv)
    classes, fold_ids = class_names(folds), folds["fold"].to_numpy(dtype=int)
    fold = int(fold_ids.min()) if fold is None else fold
    inside = fold_ids == fold
    if not inside.any():
        raise LayoutError(
            f"fold {fold} is not a fold of {cfg.folds_csv} (folds {sorted(set(fold_ids.tolist()))})"
        )
    pupil = experiment(cfg.output_dir, student)
    rows = sample_rows(len(folds), len(classes), cfg.seed, within=inside)
    local = np.searchsorted(np.flatnonzero(inside), rows)  # the same rows among fold k's
    try:
        student_logits = dense_rows(open_aligned(pupil.fold_oof(fold), folds[inside], classes), local)
    except OOFError as e:
        raise OOFError(f"student {student!r}, fold {fold}: {e}") from None
    try:
        teacher_logits = dense_rows(
            open_aligned(experiment(cfg.output_dir, cfg.exp).oof, folds, classes), rows
        )
    except OOFError as e:
        raise OOFError(f"teacher {cfg.exp!r}: {e}") from None
    halves = half_split(folds["group"].to_numpy()[rows], cfg.seed)
    verdict = judge(student_logits, teacher_logits, targets(folds, classes)[rows], halves)
    s, t = verdict["student"], verdict["teacher"]
    s["exp"], t["exp"], verdict["fold"] = student, cfg.exp, fold
    verdict |= _soft_settings(pupil.config)
    atomic_write(pupil.root / VERDICT, json.dumps(verdict, indent=2) + "\n")
    log.info(
        f"fold {fold} pilot of {student} ({verdict['rows']} rows): nested log-loss {s['log_loss']:.4f} vs teacher "
        f"{t['log_loss']:.4f}, accuracy {s['accuracy']:.4f} vs {t['accuracy']:.4f}: "
        f"{'pays' if verdict['pays'] else 'does not pay'} -> {pupil.root / VERDICT}"
    )
    return verdict


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, help="soft-label file to write (default: <output_dir>/<exp>/soft_labels.npz)"
    )
    parser.add_argument(
        "--verdict", action="store_true",
        help="instead of soft labels: judge --student's pilot fold against the teacher (exp) and write "
        f"<output_dir>/<student>/{VERDICT}",
    )  # fmt: skip
    parser.add_argument("--student", help="with --verdict: the student experiment")
    parser.add_argument(
        "--fold", type=int, help="with --verdict: the pilot fold (default: the first of folds.csv)"
    )


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(argv, __doc__.splitlines()[0], _add_arguments, stage="distill")
    if args.verdict != bool(args.student):
        log.error(
            "--verdict and --student go together: python src/distill.py --config X --verdict --student EXP"
        )
        return 2
    try:
        if args.verdict:
            write_verdict(cfg, args.student, args.fold)
        else:
            make_soft_labels(cfg, args.out)
    except PipelineError as e:
        log.error(str(e))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
