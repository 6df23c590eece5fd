"""Out-of-fold accuracy, macro-F1 and log-loss of every experiment, a confusion matrix and training curves.

``python src/report.py --config configs/X.yaml [EXP ...] [--out DIR] [--test-scores FILE]`` scores the
OOF logits ``<output_dir>/<exp>/oof.npz`` of the named experiments (default: every experiment that has one,
oldest first, which is pipeline order: baseline -> distilled -> fine-tuned -> stack) against folds.csv,
matching images by name, and writes into ``--out`` (default ``<output_dir>/report/``):

- ``report.csv``: one row per experiment and fold (``fold`` is ``all`` or k): n, accuracy, macro_f1, log_loss;
- ``report.md``: the per-experiment and per-fold tables, best experiment by OOF accuracy marked (also
  printed to stdout);
- per-class recall of the best experiment in ``report.md``: its distribution over the classes (quantiles,
  mean = balanced accuracy), the worst classes (with what they are mistaken for) and the most confused
  (true, predicted) pairs, found from the predicted classes alone (no C x C matrix);
- ``confusion.png``: up to 50 classes, the best experiment's confusion matrix, rows normalised to each true
  class's images, counts annotated; above (thousands of classes in a large competition), ``recall.png``
  instead: the histogram of the per-class recall;
- ``curves.png``: per experiment, train and validation loss and the learning rate per epoch of every fold
  and of the full fit (from ``fold<k>/log.csv`` and ``full/log.csv``; experiments without logs, e.g. a stack,
  are left out).

``report.md`` also says which rounds ran: the teacher (the config's ``exp``) and each distillation round
found under ``output_dir`` (an experiment whose config.yaml names soft labels): ran on every fold, skipped
after its pilot fold (the verdict distill.py --verdict wrote, ``<student>/distill_verdict.json``, both scores
given), or not configured.

``--test-scores`` takes the JSON that ``python src/score.py SUBMISSION LABELS --json`` prints and adds the
held-out test accuracy; where the config names a published result (``anchor_name``, ``anchor_accuracy``; the
demo's is Deitsch et al. 2019 on the same ELPV split) it stands beside it.
An OOF file that does not match folds.csv (other images, fold ids or classes) is an error (exit 2), never
scored: its predictions would not be out-of-fold. OOF files are read through lib/oof.py a chunk of rows at a
time, dense or top-k (a top-k file's log-loss spreads each row's residual mass evenly over the classes
outside its top k), so memory stays at a few arrays of N numbers whatever the class count.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from lib.common import PipelineError, atomic_path, atomic_write, get_logger
from lib.config import Config, parse_config
from lib.layout import FULL, LOG, FoldId, class_names, experiment, find_experiments, read_folds, targets
from lib.oof import OOFError, open_aligned, row_stats, scores_from

log = get_logger("report")

COLUMNS = ["exp", "fold", "n", "accuracy", "macro_f1", "log_loss"]
MAX_CONFUSION_CLASSES = 50  # the confusion matrix is drawn up to this; above, the recall histogram
ANNOTATE_ZEROS_UP_TO = 12  # larger matrices annotate only non-zero cells, so the errors stand out
TABLE_ROWS = 10  # worst classes and most confused pairs listed in report.md
QUANTILES = {"min": 0.0, "5%": 0.05, "25%": 0.25, "median": 0.5, "75%": 0.75, "95%": 0.95, "max": 1.0}
VERDICT = (
    "distill_verdict.json"  # distill.py --verdict's file in a student's folder (stages share files, not code)
)


class ReportError(PipelineError, ValueError):
    """Nothing to report or an input is wrong; the message names the file and the fix."""


@dataclass
class Scored:
    """What the figures need of one experiment: its true and predicted class indices, not its logits."""

    name: str
    exp_dir: Path
    classes: list[str]
    truth: np.ndarray
    pred: np.ndarray


# ---------------------------------------------------------------------------------------------------------
# Inputs.


def report_experiments(cfg: Config, names: list[str]) -> list[tuple[str, Path]]:
    """(name, oof.npz) of the named experiments in the given order, else of all (stacks included), oldest
    oof.npz first: pipeline order (baseline -> distilled -> fine-tuned -> stack)."""
    if names:
        return [(n, experiment(cfg.output_dir, n).oof) for n in dict.fromkeys(names)]
    found = [experiment(cfg.output_dir, n) for n in find_experiments(cfg.output_dir, stacks=True)]
    if not found:
        raise ReportError(
            f"no experiment with an oof.npz under {cfg.output_dir}/: train every fold first "
            "(python src/train.py --config <your config> --fold all)"
        )
    found.sort(key=lambda e: (e.oof.stat().st_mtime, e.name))
    return [(e.name, e.oof) for e in found]


def read_test_scores(path: Path) -> dict:
    """The held-out scores printed by ``score.py --json``, checked so a wrong file is not reported."""
    fix = "write it with python src/score.py SUBMISSION LABELS --json > FILE"
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ReportError(f"--test-scores file {path} not found: {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"--test-scores file {path} is not readable JSON ({e}): {fix}") from None
    ok = isinstance(data, dict) and isinstance(data.get("n"), int)
    ok = ok and all(
        isinstance(data.get(k), (int, float)) and 0 <= data[k] <= 1 for k in ("accuracy", "macro_f1")
    )
    if not ok:
        raise ReportError(f"--test-scores file {path} lacks n, accuracy and macro_f1 in 0..1: {fix}")
    return data


# ---------------------------------------------------------------------------------------------------------
# Scores.


def score_experiment(name: str, path: Path, folds: pd.DataFrame) -> tuple[list[dict], Scored]:
    """The experiment's "all" row and one row per fold, from its OOF logits matched to folds.csv by name and
    read a chunk of rows at a time.

    Raises:
        OOFError: the file does not match folds.csv or holds NaN/inf.
    """
    classes = class_names(folds)
    y = targets(folds, classes)
    pred, log_p = np.zeros(len(y), np.int64), np.zeros(len(y))
    for where, part in open_aligned(path, folds, classes).chunks():
        pred[where], log_p[where] = row_stats(part, y[where])
    fold_ids = folds["fold"].to_numpy(dtype=int)
    rows = []
    for fold in ["all", *sorted(set(fold_ids.tolist()))]:
        mask = np.ones(len(y), bool) if fold == "all" else fold_ids == fold
        s = scores_from(pred[mask], log_p[mask], y[mask], len(classes))
        rows.append({"exp": name, "fold": str(fold), "n": int(mask.sum()), **s})
    return rows, Scored(name, path.parent, classes, y, pred)


def score_all(experiments: list[tuple[str, Path]], folds: pd.DataFrame) -> tuple[pd.DataFrame, list[Scored]]:
    """Rows of every experiment; every experiment that cannot be scored is listed in one error."""
    rows, scored, problems = [], [], []
    for name, path in experiments:
        try:
            r, s = score_experiment(name, path, folds)
        except OOFError as e:
            problems.append(str(e))
            continue
        rows += r
        scored.append(s)
    if problems:
        raise ReportError(
            f"{len(problems)} experiment(s) cannot be reported (name the ones to report, or delete stale ones):\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    return pd.DataFrame(rows, columns=COLUMNS), scored


def best_experiment(table: pd.DataFrame) -> str:
    """Highest OOF accuracy; ties go to macro-F1, then the lower log-loss, then the earlier experiment."""
    overall = table[table["fold"] == "all"].reset_index(drop=True)
    key = list(zip(overall["accuracy"], overall["macro_f1"], -overall["log_loss"], strict=True))
    return str(overall["exp"][max(range(len(key)), key=lambda i: key[i])])


# ---------------------------------------------------------------------------------------------------------
# Per-class recall and confusions, from the true and predicted classes alone (O(N), never C x C).


def class_recall(truth: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """float64 [C]: each class's recall over its images (NaN for a class without images)."""
    support = np.bincount(truth, minlength=n_classes)
    hits = np.bincount(truth[truth == pred], minlength=n_classes)
    return np.divide(hits, support, out=np.full(n_classes, np.nan), where=support > 0)


def confused_pairs(
    truth: np.ndarray, pred: np.ndarray, n_classes: int, limit: int = TABLE_ROWS
) -> list[tuple[int, int, int]]:
    """The ``limit`` most frequent errors as (true class, predicted class, images), most first (ties in
    class order)."""
    wrong = truth != pred
    keys, counts = np.unique(truth[wrong].astype(np.int64) * n_classes + pred[wrong], return_counts=True)
    top = np.lexsort((keys, -counts))[:limit]
    return [
        (int(k // n_classes), int(k % n_classes), int(c)) for k, c in zip(keys[top], counts[top], strict=True)
    ]


def recall_lines(s: Scored) -> list[str]:
    """report.md's per-class section of one experiment: recall quantiles over the classes, the worst classes
    (what each is most often predicted as) and the most confused pairs."""
    n = len(s.classes)
    recall = class_recall(s.truth, s.pred, n)
    support = np.bincount(s.truth, minlength=n)
    present = recall[~np.isnan(recall)]
    qs = [f"{np.quantile(present, q):.4f}" for q in QUANTILES.values()]
    lines = [
        f"## Per-class recall ({_cell(s.name)})", "",
        f"Recall of each of the {len(present)} classes over its own images ({support.min()} to {support.max()} "
        f"images per class); the mean is the balanced accuracy.", "",
        "| " + " | ".join(["recall", *QUANTILES, "mean"]) + " |", "| --- |" + " ---: |" * (len(QUANTILES) + 1),
        "| classes | " + " | ".join([*qs, f"{present.mean():.4f}"]) + " |", "",
        "| worst classes | images | recall | most often predicted as |", "| --- | ---: | ---: | --- |",
    ]  # fmt: skip
    worst = np.lexsort((np.arange(n), -support, np.nan_to_num(recall, nan=np.inf)))[
        : min(TABLE_ROWS, len(present))
    ]
    for c in worst:
        wrong = s.pred[(s.truth == c) & (s.pred != c)]
        if len(wrong):
            other = np.bincount(wrong).argmax()
            instead = f"{_cell(s.classes[other])} ({int((wrong == other).sum())})"
        else:
            instead = "-"
        lines.append(f"| {_cell(s.classes[c])} | {support[c]} | {recall[c]:.4f} | {instead} |")
    lines += [
        "",
        "| most confused: true | predicted | images | share of the true class |",
        "| --- | --- | ---: | ---: |",
    ]
    pairs = confused_pairs(s.truth, s.pred, n)
    lines += [
        f"| {_cell(s.classes[t])} | {_cell(s.classes[p])} | {k} | {k / support[t]:.4f} |" for t, p, k in pairs
    ] or ["| (no errors) | | | |"]
    return lines


# ---------------------------------------------------------------------------------------------------------
# Rounds: which of the teacher, distillation (pilot and verdict) ran.


def _read_mapping(path: Path) -> dict | None:
    """A JSON or YAML file's mapping, or None where it is missing or unreadable (a report never fails on it)."""
    try:
        data = yaml.safe_load(path.read_text())  # JSON is YAML
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def distill_rounds(output_dir: str | Path) -> list[tuple[str, Path, dict | None]]:
    """(student, its soft-label file, its verdict or None) of every experiment under ``output_dir`` whose
    config.yaml names a soft-label file, by name (the teacher is the folder holding that file)."""
    found = []
    for path in sorted(Path(output_dir).glob("*/config.yaml")):
        soft = (_read_mapping(path) or {}).get("soft_labels")
        if soft and not path.parent.name.startswith("."):
            found.append((path.parent.name, Path(str(soft)), _read_mapping(path.parent / VERDICT)))
    return found


def _settings(v: dict | None, soft: Path) -> str:
    """ ", alpha A (auto), T T (config)" from the verdict, else from the soft labels' JSON beside them; "" if
    neither says."""
    for source in (v, _read_mapping(soft.with_suffix(".json"))):
        if source and all(isinstance(source.get(k), int | float) for k in ("alpha", "temperature")):
            return (
                f", alpha {source['alpha']:g} ({source.get('alpha_from')}), T {source['temperature']:.3g} "
                f"({source.get('temperature_from')})"
            )
    return ""


def _pilot_scores(v: dict) -> str:
    s, t = v["student"], v["teacher"]
    return (
        f"student nested log-loss {s['log_loss']:.4f}, accuracy {s['accuracy']:.4f} vs teacher "
        f"{t['log_loss']:.4f}, {t['accuracy']:.4f} on fold {v['fold']}'s {v['rows']} images"
    )


def round_lines(output_dir: str | Path, teacher: str) -> list[str]:
    """report.md's "Rounds" section: the teacher, then each distillation round (:func:`distill_rounds`): ran
    on every fold, skipped after its pilot fold (both scores), paid but unfinished, or not configured."""
    root = Path(output_dir)
    lines = ["## Rounds", ""]
    done = "every fold (OOF)" if experiment(root, teacher).oof.is_file() else "no OOF yet"
    lines.append(f"- Teacher `{_cell(teacher)}`: {done}.")
    rounds = distill_rounds(root)
    if not rounds:
        lines.append("- Distillation: not configured (no experiment here was trained on soft labels).")
    for student, soft, v in rounds:
        name = f"- Distillation `{_cell(student)}` (soft labels of `{_cell(soft.parent.name)}`{_settings(v, soft)}): "
        whole = experiment(root, student).oof.is_file()
        try:
            if v is None:
                state = "ran on every fold (no pilot)." if whole else "not finished (no OOF yet)."
            elif not v["pays"]:
                pilot = f"the fold-{v['fold']} pilot"
                state = f"**skipped** after {pilot}: {_pilot_scores(v)}; later stages build on the teacher."
            else:
                then = "then every fold." if whole else "its other folds are not finished."
                state = f"**ran**: the fold-{v['fold']} pilot paid ({_pilot_scores(v)}), {then}"
        except (KeyError, TypeError, ValueError):
            state = f"its verdict ({root / student / VERDICT}) is unreadable: rerun python src/distill.py --verdict."
        lines.append(name + state)
    return lines


# ---------------------------------------------------------------------------------------------------------
# Markdown.


def held_out_line(scores: dict, anchor_name: str = "", anchor_accuracy: float = 0.0) -> str:
    """The held-out test result, with a published result beside it when the config names one."""
    line = (
        f"Held-out test ({scores['n']} images): accuracy **{scores['accuracy']:.2%}**, "
        f"macro-F1 {scores['macro_f1']:.4f}"
    )
    if anchor_name:
        line += f"; published anchor, {anchor_name}: {anchor_accuracy:.2%}"
    return line


def _cell(name: str) -> str:
    return name.replace("|", "\\|")


def _table(rows: pd.DataFrame, best: str, with_fold: bool) -> list[str]:
    head = ["experiment", *(["fold"] if with_fold else []), "images", "accuracy", "macro-F1", "log-loss"]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + (" ---: |" * (len(head) - 1))]
    for r in rows.itertuples():
        name = f"**{_cell(r.exp)}** (best)" if r.exp == best and not with_fold else _cell(r.exp)
        fold = [str(r.fold)] if with_fold else []
        cells = [name, *fold, str(r.n), f"{r.accuracy:.4f}", f"{r.macro_f1:.4f}", f"{r.log_loss:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(
    table: pd.DataFrame,
    best: str,
    folds: pd.DataFrame,
    folds_csv: str,
    test_line: str | None,
    figures: list[str],
    per_class: list[str],
    rounds: list[str],
) -> str:
    """report.md: the per-experiment table (best marked), the held-out line, ``rounds`` (:func:`round_lines`),
    the per-fold table, then ``per_class`` (the best experiment's :func:`recall_lines`)."""
    lines = [
        "# Out-of-fold report",
        "",
        f"{len(folds)} images of {folds_csv}, {folds['label'].nunique()} classes, {folds['fold'].nunique()} folds; "
        f"every score is out-of-fold. Best by OOF accuracy: **{_cell(best)}**.",
        "",
        *_table(table[table["fold"] == "all"], best, with_fold=False),
    ]
    if test_line:
        lines += ["", test_line]
    lines += ["", *rounds]
    lines += ["", "## Per fold", "", *_table(table[table["fold"] != "all"], best, with_fold=True)]
    lines += ["", *per_class]
    if figures:
        lines += ["", "Figures: " + ", ".join(figures) + "."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# Figures (matplotlib's object API on the Agg canvas: no pyplot state, no display needed).


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")


def _short(name: str, width: int = 24) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def confusion_counts(truth: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """int64 [C, C]: images of true class i predicted as j. Only for C <= MAX_CONFUSION_CLASSES (above, the
    matrix is neither drawn nor made: 5,000 classes would make 25M cells of mostly zeros)."""
    if n_classes > MAX_CONFUSION_CLASSES:
        raise ValueError(f"no confusion matrix above {MAX_CONFUSION_CLASSES} classes, got {n_classes}")
    return np.bincount(truth * n_classes + pred, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes
    )


def plot_confusion(s: Scored, path: Path) -> None:
    """Row-normalised confusion matrix of one experiment (at most MAX_CONFUSION_CLASSES classes), class
    names on the axes, counts annotated."""
    k = len(s.classes)
    counts = confusion_counts(s.truth, s.pred, k)
    frac = counts / np.maximum(counts.sum(axis=1), 1)[:, None]
    side = max(4.5, 0.32 * k + 2.5)
    font = 9 if k <= ANNOTATE_ZEROS_UP_TO else max(5.0, 9 - (k - ANNOTATE_ZEROS_UP_TO) / 7)
    fig = Figure(figsize=(side + 1.2, side))
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class's images")
    names = [_short(c) for c in s.classes]
    ax.set_xticks(range(k), names, rotation=90, fontsize=font)
    ax.set_yticks(range(k), names, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            if counts[i, j] or k <= ANNOTATE_ZEROS_UP_TO:
                colour = "white" if frac[i, j] > 0.5 else "black"
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=font, color=colour)
    accuracy = float(np.mean(s.truth == s.pred))
    ax.set_title(
        f"{s.name}: out-of-fold confusion ({len(s.truth)} images, accuracy {accuracy:.4f})", fontsize=10
    )
    _save(fig, path)


def plot_recall(s: Scored, path: Path) -> None:
    """Histogram of one experiment's per-class recall (classes with images), quartiles marked."""
    recall = class_recall(s.truth, s.pred, len(s.classes))
    recall = recall[~np.isnan(recall)]
    fig = Figure(figsize=(7.0, 4.2))
    ax = fig.add_subplot()
    ax.hist(recall, bins=np.linspace(0, 1, 21), color="C0", edgecolor="white")
    for q, style in ((0.25, ":"), (0.5, "--"), (0.75, ":")):
        ax.axvline(
            np.quantile(recall, q), color="C3", ls=style, label=f"{q:.0%} quantile" if q != 0.5 else "median"
        )
    ax.axvline(recall.mean(), color="k", ls="-", lw=1, label=f"mean {recall.mean():.4f} (balanced accuracy)")
    ax.set_xlabel("recall of the class (its images predicted right)")
    ax.set_ylabel("classes")
    ax.set_xlim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(
        f"{s.name}: out-of-fold recall of {len(recall)} classes ({len(s.truth)} images)", fontsize=10
    )
    _save(fig, path)


def read_logs(exp_dir: Path) -> list[tuple[FoldId, pd.DataFrame]]:
    """(fold, log) of every fold<k>/log.csv and of the full fit's full/log.csv (fold ``FULL``), numeric
    columns as numbers, the folds in order and the full fit last; unreadable logs are skipped."""
    logs: list[tuple[FoldId, pd.DataFrame]] = []
    for p in sorted(exp_dir.glob(f"*/{LOG}")):
        name = p.parent.name
        suffix = name.removeprefix("fold")
        if name != FULL and not (name.startswith("fold") and suffix.isdigit()):
            continue
        try:
            df = pd.read_csv(p)
        except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
            log.warning("%s is unreadable (%s): its curves are left out", p, e)
            continue
        cols = [c for c in ("epoch", "lr", "train_loss", "val_loss") if c in df.columns]
        if "epoch" not in cols or len(cols) < 2:
            log.warning("%s has no epoch column or nothing to plot against it: its curves are left out", p)
            continue
        df = df[cols].apply(pd.to_numeric, errors="coerce").sort_values("epoch")
        logs.append((FULL if name == FULL else int(suffix), df))
    return sorted(logs, key=lambda t: (t[0] == FULL, t[0] if t[0] != FULL else 0))


def plot_curves(logs: dict[str, list[tuple[FoldId, pd.DataFrame]]], path: Path) -> None:
    """One column per experiment: train (solid) and validation (dashed) loss per fold (the full fit in black,
    train loss only: it holds nothing out), learning rate below."""
    fig = Figure(figsize=(4.6 * len(logs), 7.0))
    axes = fig.subplots(2, len(logs), squeeze=False, sharex="col")
    for col, (name, folds) in enumerate(logs.items()):
        loss_ax, lr_ax = axes[0, col], axes[1, col]
        handles = []
        for fold, df in folds:
            colour, label = ("black", "full fit") if fold == FULL else (f"C{fold % 10}", f"fold {fold}")
            handles.append(Line2D([], [], color=colour, label=label))
            for key, style in (("train_loss", "-"), ("val_loss", "--")):
                if key in df and df[key].notna().any():
                    loss_ax.plot(df["epoch"], df[key], style, color=colour, marker="o", markersize=3)
            if "lr" in df and df["lr"].notna().any():
                lr_ax.plot(df["epoch"], df["lr"], color=colour, marker="o", markersize=3)
        handles += [
            Line2D([], [], color="grey", ls=ls, label=lab)
            for ls, lab in (("-", "train"), ("--", "validation"))
        ]
        loss_ax.legend(handles=handles, fontsize=7, ncol=2)
        loss_ax.set_title(name)
        loss_ax.set_ylabel("loss")
        lr_ax.set_xlabel("epoch")
        lr_ax.set_ylabel("learning rate")
        lr_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for ax in (loss_ax, lr_ax):
            ax.grid(alpha=0.3)
        rates = np.concatenate(
            [df["lr"].dropna().to_numpy() for _, df in folds if "lr" in df] or [np.zeros(0)]
        )
        if len(rates) and (rates > 0).all() and rates.max() / rates.min() > 20:
            lr_ax.set_yscale("log")  # SGDR spans eta_min..lr: decades apart
        if not lr_ax.lines:
            lr_ax.text(
                0.5, 0.5, "no learning rate logged", ha="center", va="center", transform=lr_ax.transAxes
            )
    fig.tight_layout()
    _save(fig, path)


# ---------------------------------------------------------------------------------------------------------
# Entry points.


def report(cfg: Config, names: list[str], out: Path, test_scores: Path | None = None) -> str:
    """Score the experiments, write report.csv, report.md and the figures into ``out``; return the markdown."""
    experiments = report_experiments(cfg, names)
    test = read_test_scores(test_scores) if test_scores else None
    folds = read_folds(cfg.folds_csv)
    table, scored = score_all(experiments, folds)
    best = best_experiment(table)
    with atomic_path(out / "report.csv") as tmp:
        table.to_csv(tmp, index=False)

    figures = []
    top = next(s for s in scored if s.name == best)
    matrix = len(top.classes) <= MAX_CONFUSION_CLASSES
    drawn, stale = ("confusion.png", "recall.png") if matrix else ("recall.png", "confusion.png")
    (plot_confusion if matrix else plot_recall)(top, out / drawn)
    (out / stale).unlink(missing_ok=True)  # a figure of an earlier report would contradict this one
    figures.append(f"{drawn} ({best})")
    logs = {s.name: found for s in scored if (found := read_logs(s.exp_dir))}
    curves = out / "curves.png"
    if logs:
        plot_curves(logs, curves)
        figures.append(f"curves.png ({', '.join(logs)})")
    else:
        curves.unlink(missing_ok=True)  # a stale figure would contradict the tables
        log.info("no fold<k>/log.csv or full/log.csv in any reported experiment: no curves.png")

    test_line = held_out_line(test, cfg.anchor_name, cfg.anchor_accuracy) if test else None
    rounds = round_lines(cfg.output_dir, cfg.exp)
    text = markdown(table, best, folds, cfg.folds_csv, test_line, figures, recall_lines(top), rounds)
    atomic_write(out / "report.md", text)
    log.info(
        "wrote %s into %s", ", ".join(["report.csv", "report.md"] + [f.split()[0] for f in figures]), out
    )
    return text


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: the help states the real default, which the formatter would otherwise print as None.
    quiet = {"default": argparse.SUPPRESS}
    parser.add_argument(
        "experiments", nargs="*", metavar="EXP", **quiet,
        help="experiments to report (default: every one with an oof.npz, oldest first)",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, **quiet, help="folder of the report (default: <output_dir>/report)"
    )
    parser.add_argument(
        "--test-scores", type=Path, **quiet,
        help="held-out scores JSON from python src/score.py SUB LABELS --json (default: none)",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(argv, __doc__.splitlines()[0], _add_arguments, stage="report")
    given = vars(args)
    out = given.get("out") or Path(cfg.output_dir) / "report"
    try:
        text = report(cfg, given.get("experiments", []), out, given.get("test_scores"))
    except PipelineError as e:
        log.error("%s", e)
        return 2
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
