"""Clean the training list and split it into stratified, group-aware cross-validation folds.

Reads ``train.csv`` and the resized copies made by ``src/resize.py``; writes ``folds.csv`` (the kept rows with
their leakage group and fold) and ``clean_report.csv`` beside it (one row per train.csv row saying what was
done to it and why). Cleaning drops images resize could not read, images too small to learn from (outliers
of this data set: a competition of 28x28 images keeps them), and every member of a duplicate group whose
labels disagree; consistent duplicates (identical pixels, or 64-bit perceptual hashes within
``--phash-distance`` bits; lib/duplicates.py finds them) share a group with the user's own ``group`` column,
so no group is ever split across folds and validation never scores an image the model trained on.
Every problem is a :class:`DataError` naming the setting or file to change; nothing is written then.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from lib.common import PipelineError, atomic_path, get_logger, num_workers, preview
from lib.config import Config, parse_config, save_config
from lib.duplicates import Duplicates, Hashes, components, find_duplicates, group_ids, hash_images
from lib.images import is_skipped
from lib.layout import LayoutError, read_resize_outputs, read_train_csv, resolve_ids
from lib.splits import split_folds

log = get_logger("folds")

FOLD_COLUMNS = ["image", "label", "group", "fold"]
REPORT_COLUMNS = ["image", "label", "action", "reason", "group", "detail"]
EXAMPLES = 5  # offending rows quoted per problem: enough to find the pattern, short enough to read
MEMBERS = 10  # members of a duplicate group quoted in the clean report's detail
SUMMARY_CLASSES = 20  # classes shown in the per-fold count table; the rest are summarised in one line
# What to change when cleaning dropped every row, per reason (check_kept).
DROP_FIXES = {
    "unreadable": "resize.py could not use them (reasons in its _bad.csv): replace the files",
    "too small": "shorter side below min_side and below min_side_fraction x the median shorter side: "
    "lower --min-side or --min-side-fraction",
    "conflicting labels": "copies with different labels: fix the labels or lower --conflict-distance",
}


class DataError(PipelineError, ValueError):
    """The training data cannot be folded; the message lists every problem found and how to fix it."""


def clean_report_path(cfg: Config) -> Path:
    """The clean report lives beside folds.csv so both travel together."""
    return Path(cfg.folds_csv).parent / "clean_report.csv"


# ---------------------------------------------------------------------------------------------------------
# Validation: collect every problem, then fail once with all of them.


def _lines(rows: pd.DataFrame, column: str = "image") -> str:
    """'line 3 'a.png', line 9 'b.png', ...' for the first few rows (line 1 is the header)."""
    return preview((f"line {i + 2} {v!r}" for i, v in zip(rows.index, rows[column], strict=True)), EXAMPLES)


def _unsafe(image: str) -> bool:
    """Absolute paths, drive letters and '..' would read outside the images folder."""
    posix = image.replace("\\", "/")
    return posix.startswith("/") or re.match(r"^[A-Za-z]:", posix) is not None or ".." in posix.split("/")


def _check_rows(df: pd.DataFrame, cfg: Config, problems: list[str]) -> pd.Series:
    """Row-level checks of train.csv; returns the mask of rows whose path may be looked up on disk."""
    empty_image = df["image"].str.strip() == ""
    if empty_image.any():
        problems.append(
            f"{empty_image.sum()} row(s) with an empty image path ({_lines(df[empty_image], 'label')}): "
            "fill in the path or delete the row"
        )
    empty_label = df["label"].str.strip() == ""
    if empty_label.any():
        problems.append(
            f"{empty_label.sum()} row(s) with an empty label ({_lines(df[empty_label])}): "
            "give each image its class name or delete the row"
        )
    dup = df["image"].duplicated(keep=False) & ~empty_image
    if dup.any():
        problems.append(
            f"{df.loc[dup, 'image'].nunique()} image id(s) listed more than once ({dup.sum()} rows: "
            f"{_lines(df[dup])}): list each image once"
        )
    unsafe = df["image"].map(_unsafe)
    if unsafe.any():
        problems.append(
            f"{unsafe.sum()} image path(s) absolute or outside {cfg.train_images} ({_lines(df[unsafe])}): "
            "write paths relative to the images folder, without '..'"
        )
    return ~empty_image & ~unsafe


def _read_resize_outputs(cfg: Config, problems: list[str]) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """_index.csv and _bad.csv of the resized folder (lib/layout.py), or None with the problem recorded."""
    try:
        return read_resize_outputs(cfg.resized_images)
    except LayoutError as e:
        problems.append(str(e))
        return None


def _check_files(
    df: pd.DataFrame,
    lookup: pd.Series,
    resized: tuple[pd.DataFrame, pd.DataFrame] | None,
    cfg: Config,
    problems: list[str],
) -> None:
    """Source images must exist, and each must be resized (in _index.csv with its copy present) or bad."""
    images = Path(cfg.train_images)
    if not images.is_dir():
        problems.append(
            f"images folder {images} not found: put the training images there or pass --train-images"
        )
        return
    rows = df[lookup]
    absent = ~rows["image"].map(lambda p: (images / p).is_file())
    if absent.any():
        problems.append(
            f"{absent.sum()} image(s) missing from {images} ({_lines(rows[absent])}): "
            "add the files or delete their rows"
        )
    if resized is None:
        return
    index, bad = resized
    present = rows[~absent]
    copies = index["file"].reindex(present["image"]).tolist()  # NaN where resize has no copy
    copy_ok = pd.Series(
        [isinstance(f, str) and (cfg.resized_images / f).is_file() for f in copies], index=present.index
    )
    todo = ~copy_ok & ~present["image"].isin(bad.index)
    # resize.py never lists hidden files: running it again cannot help those.
    hidden = todo & present["image"].map(is_skipped)
    if hidden.any():
        problems.append(
            f"{hidden.sum()} image(s) hidden (name starting with '.') or inside a __MACOSX folder, which "
            f"resize.py skips ({_lines(present[hidden])}): rename them or delete their rows"
        )
    todo &= ~hidden
    if todo.any():
        problems.append(
            f"{todo.sum()} image(s) not resized yet or whose resized copy is gone ({_lines(present[todo])}): "
            "run python src/resize.py first"
        )


def load_inputs(cfg: Config) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """train.csv, the resize index and the bad list, or a DataError listing every problem at once."""
    problems: list[str] = []
    df = read_train_csv(
        cfg.train_csv, image_column=cfg.image_column, label_column=cfg.label_column,
        group_column=cfg.group_column, problems=problems,
    )  # fmt: skip
    resized = _read_resize_outputs(cfg, problems)
    if df is not None and resized is not None:
        df["image"], matched = resolve_ids(df["image"], [*resized[0].index, *resized[1].index])
        if matched:
            log.info("%d image id(s) matched to their files without extension or folder", matched)
    if df is not None:
        lookup = _check_rows(df, cfg, problems)
        _check_files(df, lookup, resized, cfg, problems)
    if problems:
        raise DataError(
            f"cannot make folds: {len(problems)} problem(s) in the training data (nothing was written)\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    assert df is not None and resized is not None
    return df, *resized


# ---------------------------------------------------------------------------------------------------------
# Cleaning: unusable rows, duplicate groups (copies vs look-alikes), conflicting labels, leakage groups.


def _drop(report: pd.DataFrame, rows: pd.Index, reason: str, detail: Sequence[str] | np.ndarray) -> None:
    """Mark ``rows`` of the clean report dropped for ``reason``, each with its own detail."""
    if len(rows):
        report.loc[rows, ["action", "reason"]] = ["dropped", reason]
        report.loc[rows, "detail"] = detail


def small_side_limit(short_sides: np.ndarray, *, min_side: int, min_side_fraction: float) -> float:
    """Pixels below which an image's shorter side is too small to learn from.

    ``min_side``, lowered to ``min_side_fraction`` x the median of ``short_sides`` (the shorter sides of the
    data set's readable images; NaN ignored): the rule removes outliers of this data set, never a whole
    data set of small images (28x28 digits keep their limit at 7 px; 300 px cells keep 48). ``min_side``
    when no size is known.
    """
    sizes = np.asarray(short_sides, dtype=np.float64)
    sizes = sizes[~np.isnan(sizes)]
    if not len(sizes):
        return float(min_side)
    return min(float(min_side), min_side_fraction * float(np.median(sizes)))


def _drop_unusable(
    report: pd.DataFrame, df: pd.DataFrame, index: pd.DataFrame, bad: pd.DataFrame, cfg: Config
) -> None:
    """Drop what resize found unusable, with its reason, and images too small (see small_side_limit)."""
    # _bad.csv wins over _index.csv: an image resize once found unusable is not trusted.
    unreadable = df["image"].isin(bad.index)
    reasons = bad["reason"].reindex(df.loc[unreadable, "image"]).to_numpy()
    _drop(report, df.index[unreadable], "unreadable", reasons)

    size = index.reindex(df["image"])[["width", "height"]].set_axis(df.index)
    short = size.min(axis=1)
    limit = small_side_limit(
        short[~unreadable].to_numpy(), min_side=cfg.min_side, min_side_fraction=cfg.min_side_fraction
    )
    tiny = ~unreadable & (short < limit)
    _drop(report, df.index[tiny], "too small", [f"{w:.0f}x{h:.0f}" for w, h in size.loc[tiny].to_numpy()])
    if tiny.any():
        log.info(
            "%d image(s) too small: shorter side below %g px (min_side %d, lowered to min_side_fraction %g x "
            "the median shorter side)", int(tiny.sum()), limit, cfg.min_side, cfg.min_side_fraction,
        )  # fmt: skip


def _hash_kept(
    report: pd.DataFrame, df: pd.DataFrame, index: pd.DataFrame, cfg: Config
) -> tuple[pd.Index, list[Hashes]]:
    """Hash the resized copy of every row still kept; a copy that no longer decodes drops its row.

    Returns the rows hashed (report index labels) and their hashes, aligned.
    """
    todo = df.index[report["action"] == "kept"]
    files = [str(cfg.resized_images / f) for f in index.loc[df.loc[todo, "image"].tolist(), "file"]]
    hashes = hash_images(files, workers=num_workers(cfg.workers))
    lost = np.array([h is None for h in hashes], dtype=bool)
    gone = [f"resized copy {f} cannot be decoded" for f, x in zip(files, lost, strict=True) if x]
    _drop(report, todo[lost], "unreadable", gone)
    return todo[~lost], [h for h in hashes if h is not None]


def _duplicate_verdicts(
    rows: pd.DataFrame, digests: Sequence[bytes], dups: Duplicates
) -> tuple[np.ndarray, np.ndarray, np.ndarray, Counter[str]]:
    """Keep mask, reason and detail (object arrays) of each hashed row, and counts of the groups found.

    A copy group whose labels disagree is label noise: every member is dropped (there is no telling which
    label is right). Each kept member of a look-alike group is an exact or a near duplicate of the others.
    """
    images, labels = rows["image"].to_numpy(), rows["label"].to_numpy()
    keep = np.ones(len(rows), dtype=bool)
    reason = np.full(len(rows), "", dtype=object)
    detail = np.full(len(rows), "", dtype=object)
    found: Counter[str] = Counter()
    for members in components(dups.copies):
        label_counts = Counter(labels[members])
        if len(label_counts) > 1:
            keep[members] = False
            counts = ", ".join(f"{k!r}: {v}" for k, v in sorted(label_counts.items()))
            names = [f"{images[m]} ({labels[m]})" for m in members]
            reason[members] = "conflicting labels"
            detail[members] = f"labels {{{counts}}} in duplicates {preview(names, MEMBERS)}"
            found["conflicting"] += 1
    for members in components(dups.lookalikes):
        members = members[keep[members]]
        if len(members) < 2:
            continue
        kind = "exact duplicate" if len({digests[m] for m in members}) == 1 else "near duplicate"
        found[kind] += 1
        found["mixed labels"] += len(set(labels[members])) > 1
        for m in members:
            reason[m] = kind
            detail[m] = "duplicate of " + preview([images[o] for o in members if o != m], MEMBERS)
    return keep, reason, detail, found


def _log_duplicates(found: Counter[str], rejected: int, cfg: Config) -> None:
    if rejected:
        log.info(
            "%d image pair(s) with matching perceptual hashes are not duplicates: their colour thumbnails "
            "correlate below %.2f (duplicate_correlation)", rejected, cfg.duplicate_correlation,
        )  # fmt: skip
    log.info(
        "duplicate groups: %d exact, %d near (phash within %d bits; %d of them look-alikes with several "
        "labels, kept in one fold), %d copies (within %d bits) with conflicting labels (dropped)",
        found["exact duplicate"], found["near duplicate"], cfg.phash_distance, found["mixed labels"],
        found["conflicting"], cfg.conflict_distance,
    )  # fmt: skip


def clean(df: pd.DataFrame, index: pd.DataFrame, bad: pd.DataFrame, cfg: Config) -> pd.DataFrame:
    """The clean report: one row per train.csv row, kept or dropped with the reason, and its group id.

    Unreadable and tiny images go first; the rest are hashed and grouped (lib/duplicates.py): copies with
    conflicting labels are dropped, and the kept images' leakage group joins their look-alikes with the
    user's own ``group`` column, so that neither is ever split across folds.
    """
    report = df[["image", "label"]].assign(action="kept", reason="", group="", detail="")
    _drop_unusable(report, df, index, bad, cfg)
    todo, hashes = _hash_kept(report, df, index, cfg)
    dups = find_duplicates(
        hashes,
        phash_distance=cfg.phash_distance,
        conflict_distance=cfg.conflict_distance,
        duplicate_correlation=cfg.duplicate_correlation,
    )
    keep, reason, detail, found = _duplicate_verdicts(df.loc[todo], [h.digest for h in hashes], dups)
    report.loc[todo, "reason"] = reason
    report.loc[todo, "detail"] = detail
    report.loc[todo[~keep], "action"] = "dropped"
    _log_duplicates(found, dups.rejected, cfg)
    keys = [dups.lookalikes[keep].tolist()]
    if "group" in df.columns:
        keys.append([g if g.strip() else None for g in df.loc[todo[keep], "group"]])
    report.loc[todo[keep], "group"] = group_ids(*keys).astype(str)
    return report


def check_kept(report: pd.DataFrame, cfg: Config) -> None:
    """Refuse a clean report that kept nothing, saying which rule dropped how many rows and what to change.

    Raises:
        DataError: no row is kept.
    """
    if (report["action"] == "kept").any():
        return
    lines = [
        f"{reason}: {n} ({preview(report.loc[report['reason'] == reason, 'image'], EXAMPLES, quote=True)}): "
        + DROP_FIXES.get(reason, "see clean_report.csv")
        for reason, n in report["reason"].value_counts().items()
    ]
    if not lines:
        lines = [f"{cfg.train_csv} lists no image: add rows (image, label)"]
    raise DataError(
        f"cannot make folds: no image is left to fold, cleaning dropped all {len(report)} row(s) of "
        f"{cfg.train_csv} (nothing was written)\n" + "\n".join(f"  - {line}" for line in lines)
    )


def assign_folds(rows: pd.DataFrame, cfg: Config) -> np.ndarray:
    """Fold of each row (lib/splits.py): classes spread evenly, groups never split."""
    n_groups = rows["group"].nunique()
    if n_groups < cfg.n_folds:
        raise DataError(
            f"only {n_groups} independent group(s) of images remain after cleaning, fewer than n_folds="
            f"{cfg.n_folds}: add data, lower --n-folds, or merge less (lower --phash-distance, finer groups)"
        )
    counts = rows["label"].value_counts()
    if counts.max() < cfg.n_folds:
        raise DataError(
            f"every class has fewer images than n_folds={cfg.n_folds} (the largest has {counts.max()}): "
            "lower --n-folds or add data"
        )
    rare = counts[counts < cfg.n_folds]
    if len(rare):
        listed = ", ".join(f"{k!r} ({v})" for k, v in rare.items())
        log.warning(
            "%d class(es) have fewer images than the %d folds, so some validation folds will lack them: %s",
            len(rare), cfg.n_folds, listed,
        )  # fmt: skip
    return split_folds(
        labels=rows["label"].to_numpy(), groups=rows["group"].to_numpy(), n_folds=cfg.n_folds, seed=cfg.seed,
        dense_limit=cfg.dense_split_limit,
    )  # fmt: skip


def _summary(df: pd.DataFrame, report: pd.DataFrame, folds: pd.DataFrame) -> None:
    """Log what cleaning did and how classes spread over folds, so a bad split is seen before training."""
    dropped = report.loc[report["action"] == "dropped", "reason"].value_counts()
    listed = "".join(f"; {r}: {n}" for r, n in dropped.items())
    log.info("%d rows in, %d kept, %d dropped%s", len(df), len(folds), dropped.sum(), listed)
    lost = sorted(set(df["label"]) - set(folds["label"]))
    if lost:
        log.warning("class(es) with no image left after cleaning: %s", ", ".join(map(repr, lost)))
    table = pd.crosstab(folds["label"], folds["fold"], margins=True, margins_name="total")
    table = table.sort_values("total", ascending=False)
    shown = table.head(SUMMARY_CLASSES + 1)
    more = f"\n... {len(table) - len(shown)} more classes" if len(table) > len(shown) else ""
    log.info("images per class and fold:\n%s%s", shown.to_string(), more)


def make_folds(cfg: Config) -> pd.DataFrame:
    """Validate, clean and fold the training data; write folds.csv and clean_report.csv; return the folds."""
    df, index, bad = load_inputs(cfg)
    if "fold" in df.columns:
        log.warning("%s already has a fold column: it is replaced by the folds made here", cfg.train_csv)
    report = clean(df, index, bad, cfg)
    check_kept(report, cfg)
    kept = report["action"] == "kept"
    folds = df.loc[kept, ["image", "label"]].assign(group=report.loc[kept, "group"].astype(int))
    folds["fold"] = assign_folds(folds, cfg)
    extra = [c for c in df.columns if c not in FOLD_COLUMNS]
    folds = pd.concat([folds, df.loc[kept, extra]], axis=1).reset_index(drop=True)

    with atomic_path(clean_report_path(cfg)) as tmp:
        report[REPORT_COLUMNS].to_csv(tmp, index=False)
    with atomic_path(Path(cfg.folds_csv)) as tmp:
        folds.to_csv(tmp, index=False)
    save_config(cfg, Path(cfg.folds_csv).with_suffix(".config.yaml"))
    _summary(df, report, folds)
    log.info("wrote %s and %s", cfg.folds_csv, clean_report_path(cfg))
    return folds


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_config(argv, description=__doc__.splitlines()[0], stage="folds")
    try:
        make_folds(cfg)
    except PipelineError as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
