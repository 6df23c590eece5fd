"""The layout of an experiment and of the training list: where every stage reads and writes.

An experiment is a folder ``<output_dir>/<exp>/`` (see ../shared/DESIGN.md, "Outputs")::

    config.yaml               the resolved config that produced it
    fold<k>/best.pt           weights of fold k's best validation epoch (models.save_checkpoint)
    fold<k>/last.pt           everything train.py --resume needs
    fold<k>/log.csv           one row per epoch
    fold<k>/oof.npz           fold k's validation logits (lib/oof.py)
    fold<k>/oof_<view>.npz    the same under a test-time view (train.py, from best.pt, as package.py runs it)
    oof.npz                   every fold's, aligned with folds.csv, once all are done
    oof_<view>.npz            every fold's under a view, likewise (train.py; package.py computes what is missing)
    full/best.pt, last.pt, log.csv   the full fit (config full_fit): every row trained, the last epoch's weights
    soft_labels.npz           soft labels distilled from this experiment's OOF (distill.py)
    stack.json                only in a stack's output: marks it, so it is never taken as a member

``folds.csv`` (written by folds.py) is the training list every later stage reads: ``image``, ``label``
(class names as strings), ``group``, ``fold``. The class list is its sorted distinct labels: index i of
every logit row, checkpoint and bundle is ``class_names(folds)[i]``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lib.common import PipelineError, get_logger
from lib.config import ORIG
from lib.images import match_ids
from lib.oof import (
    DENSE_MAX_CELLS,
    TOPK,
    Collector,
    Predictions,
    TopK,
    load_soft_labels,
    open_oof,
    rows_per_chunk,
    write_oof,
)

log = get_logger("layout")

BEST, LAST, LOG, OOF = "best.pt", "last.pt", "log.csv", "oof.npz"
SOFT_LABELS = "soft_labels.npz"
CONFIG = "config.yaml"
STACK_MARKER = "stack.json"
RESIZE_INDEX, RESIZE_BAD = "_index.csv", "_bad.csv"
RUN_FOLDS = "run python src/folds.py --config <your config> first"
# The fold id of the full fit (config full_fit): every row of folds.csv trains, none validates.
FULL = "full"
FoldId = int | str


class LayoutError(PipelineError, FileNotFoundError):
    """An input another stage writes is missing or does not match; the message names the stage to run."""


@dataclass(frozen=True)
class Experiment:
    """The paths of one experiment folder (nothing is created)."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def oof(self) -> Path:
        return self.root / OOF

    @property
    def soft_labels(self) -> Path:
        return self.root / SOFT_LABELS

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def is_stack(self) -> bool:
        return (self.root / STACK_MARKER).exists()

    def fold(self, k: FoldId) -> Path:
        return self.root / fold_name(k)

    def best(self, k: FoldId) -> Path:
        return self.fold(k) / BEST

    def last(self, k: FoldId) -> Path:
        return self.fold(k) / LAST

    def log(self, k: FoldId) -> Path:
        return self.fold(k) / LOG

    def fold_oof(self, k: FoldId) -> Path:
        return self.fold(k) / OOF

    def fold_view_oof(self, k: FoldId, view: str) -> Path:
        """Fold k's validation logits under a test-time view (``orig``: its oof.npz)."""
        return self.fold(k) / _view_file(view)

    def fold_view_oofs(self, k: FoldId, views: list[str]) -> dict[str, Path]:
        """view -> fold k's file for every test-time view of ``views`` but ``orig`` (its oof.npz, written with
        the fold's training)."""
        return {v: self.fold_view_oof(k, v) for v in views if v != ORIG}

    def view_oof(self, view: str) -> Path:
        """The experiment's OOF logits under a test-time view (``orig``: its oof.npz)."""
        return self.root / _view_file(view)


def _view_file(view: str) -> str:
    return OOF if view == ORIG else f"oof_{view}.npz"


def experiment(output_dir: str | Path, name: str) -> Experiment:
    return Experiment(Path(output_dir) / name)


def find_experiments(output_dir: str | Path, *, exclude: tuple[str, ...] = (), stacks: bool = False) -> list[str]:
    """Names of the experiments under ``output_dir`` with an oof.npz, sorted; hidden (".") folders, the
    ``exclude`` names and, unless ``stacks``, stack outputs are left out."""
    found = []
    for path in Path(output_dir).glob(f"*/{OOF}"):
        exp = Experiment(path.parent)
        if exp.name.startswith(".") or exp.name in exclude or (exp.is_stack and not stacks):
            continue
        found.append(exp.name)
    return sorted(found)


# ---------------------------------------------------------------------------------------------------------
# folds.csv and the resized copies.


def read_csv_strings(path: Path) -> pd.DataFrame:
    """Read a CSV with every cell a string, so labels like "1", "NA" or "None" stay class names.

    Rows with more fields than the header are an error (pandas' ParserWarning raised) rather than silently
    becoming an index.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.ParserWarning)
        return pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False)


def read_folds(path: str | Path) -> pd.DataFrame:
    """folds.csv: labels as strings, ``group`` and ``fold`` as integers.

    Raises:
        LayoutError: the file does not exist (folds.py has not run).
    """
    path = Path(path)
    if not path.is_file():
        raise LayoutError(f"{path} not found: {RUN_FOLDS}")
    return read_csv_strings(path).astype({"group": int, "fold": int})


def class_names(folds: pd.DataFrame) -> list[str]:
    """The class list of a training list: its distinct labels, sorted (index i is logit column i)."""
    return sorted(folds["label"].unique().tolist())


def targets(folds: pd.DataFrame, classes: list[str]) -> np.ndarray:
    """Class indices (int64 [N]) of the rows' labels."""
    return folds["label"].map({c: i for i, c in enumerate(classes)}).to_numpy(dtype=np.int64)


def fold_name(fold: FoldId) -> str:
    """Fold ``fold``'s folder and file stem: ``fold<k>``; the full fit's: ``full``."""
    return FULL if fold == FULL else f"fold{fold}"


def fold_seed(seed: int, fold: FoldId) -> int:
    """The seed of fold ``fold``'s run: ``seed + fold``; the full fit's, ``seed - 1`` (no fold's)."""
    return seed - 1 if fold == FULL else seed + int(fold)


def select_folds(which: str, folds_csv: str | Path, *, full_fit: bool = False) -> list[FoldId]:
    """The folds a ``--fold`` argument names: an integer, ``full`` (the full fit), or ``all`` (every fold of
    folds.csv, then the full fit when ``full_fit``).

    Raises:
        LayoutError: ``which`` is none of these, or folds.csv is missing.
    """
    if which == FULL:
        return [FULL]
    if which != "all":
        try:
            return [int(which)]
        except ValueError:
            raise LayoutError(f"--fold must be an integer, 'full' or 'all', got {which!r}") from None
    return [*sorted(read_folds(folds_csv)["fold"].unique().tolist()), *([FULL] if full_fit else [])]


def read_train_csv(
    path: str | Path, *, image_column: str, label_column: str, group_column: str, problems: list[str]
) -> pd.DataFrame | None:
    """train.csv (strings throughout) with its image, label and group columns renamed ``image``, ``label``,
    ``group``, the names every later stage uses; a column already called so that is not the chosen one is
    kept as ``<name>_original``. None when the file is missing, unreadable or lacks a named column, with the
    problem and its fix appended to ``problems`` (folds.py reports them all at once)."""
    path = Path(path)
    header = f"{image_column},{label_column}"
    if not path.is_file():
        problems.append(
            f"{path} not found: write the training list there (header {header}[,{group_column}]) "
            "or pass --train-csv"
        )
        return None
    try:
        df = read_csv_strings(path)
    except (ValueError, OSError, pd.errors.ParserWarning) as e:
        problems.append(
            f"{path} is not a readable CSV ({e}): save it as UTF-8 CSV with a header row {header}"
        )
        return None
    # The group column is optional under its default name only: one named on purpose must be there.
    named = [image_column, label_column] + [group_column] * (group_column != "group")
    missing = [c for c in named if c not in df.columns]
    if missing:
        problems.append(
            f"{path} lacks column(s) {', '.join(missing)} (its columns: {', '.join(df.columns)}): set "
            "image_column, label_column, group_column (--image-column, ...) to the header's names"
        )
        return None
    names = {image_column: "image", label_column: "label", group_column: "group"}
    names = {src: dst for src, dst in names.items() if src in df.columns and src != dst}
    clash = {c: f"{c}_original" for c in names.values() if c in df.columns and c not in names}
    return df.rename(columns=clash).rename(columns=names)


def resolve_ids(ids: pd.Series, files: Sequence[str]) -> tuple[pd.Series, int]:
    """Image ids written as Kaggle lists often do (``Train_0`` for ``train/Train_0.jpg``) replaced by the one
    file they name (lib.images.match_ids); returns the ids and how many changed. An id naming no file, or
    several, is left for the missing-file check to report."""
    found = match_ids(ids.tolist(), list(files))
    resolved = pd.Series(
        [files[k] if k is not None else i for i, k in zip(ids, found, strict=True)], index=ids.index
    )
    return resolved, int((resolved != ids).sum())


def read_resize_outputs(resized: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """resize.py's record of a folder of copies: (index, bad), each indexed by the train.csv image path.

    ``index`` has the columns file (the copy, relative to ``resized``), width and height (int, the original's
    size in pixels after EXIF orientation); ``bad`` the column reason. A missing _bad.csv means nothing was bad.

    Raises:
        LayoutError: the folder or _index.csv is missing or malformed (resize has not run or not finished).
    """
    folder = Path(resized)
    fix = f"run python src/resize.py (with the same --config / --train-images / --resize) to make {folder}"
    index_path, bad_path = folder / RESIZE_INDEX, folder / RESIZE_BAD
    if not folder.is_dir():
        raise LayoutError(f"resized images folder {folder} not found: {fix}")
    if not index_path.is_file():
        raise LayoutError(f"{index_path} not found (resize did not finish): {fix}")
    try:
        index = read_csv_strings(index_path)
        bad = read_csv_strings(bad_path) if bad_path.is_file() else pd.DataFrame(columns=["image", "reason"])
    except (ValueError, OSError, pd.errors.ParserWarning) as e:
        raise LayoutError(f"unreadable resize output in {folder} ({e}): {fix}") from e
    needed = {index_path: ["image", "file", "width", "height"], bad_path: ["image", "reason"]}
    for path, frame in ((index_path, index), (bad_path, bad)):
        if missing := [c for c in needed[path] if c not in frame.columns]:
            raise LayoutError(f"{path} lacks column(s) {', '.join(missing)}: {fix}")
    size = index[["width", "height"]].apply(pd.to_numeric, errors="coerce")
    if size.isna().any().any():
        raise LayoutError(f"{index_path} has non-numeric width/height: {fix}")
    index[["width", "height"]] = size.astype(int)
    index = index.drop_duplicates("image", keep="last").set_index("image")
    return index, bad.drop_duplicates("image", keep="last").set_index("image")


def training_table(folds_csv: str | Path, resized: Path) -> tuple[pd.DataFrame, list[str]]:
    """folds.csv joined with the resized copies: every row gains ``path`` (its copy) and ``target`` (class
    index); and the class list.

    Raises:
        LayoutError: folds.csv or the resize index is missing, or lists images the other lacks.
    """
    table = read_folds(folds_csv)
    files = read_resize_outputs(resized)[0]["file"]
    missing = ~table["image"].isin(files.index)
    if missing.any():
        raise LayoutError(
            f"{missing.sum()} image(s) of {folds_csv} are not in {Path(resized) / RESIZE_INDEX} (e.g. "
            f"{table['image'][missing].iloc[0]!r}): re-run python src/resize.py and python src/folds.py with the same config"
        )
    classes = class_names(table)
    table["path"] = [str(Path(resized) / f) for f in files.loc[table["image"]]]
    table["target"] = targets(table, classes)
    return table, classes


@dataclass
class FoldData:
    """The rows of folds.csv split for one fold, with resized file paths and class indices."""

    train: pd.DataFrame
    val: pd.DataFrame
    classes: list[str]
    # Soft labels of the training images (distill.py), or None: probabilities float32 [N, C], or a TopK of
    # log-probabilities (a top-k file) that lib.data.ImageDataset densifies one image at a time.
    soft: Predictions | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def validates(self) -> bool:
        """False for the full fit (:data:`FULL`): no image is held out, so no epoch can be chosen by a score
        and the last one is kept."""
        return len(self.val) > 0

    @property
    def train_targets(self) -> Predictions:
        """What the training images are fitted to: their soft labels, else their class indices."""
        return self.soft if self.soft is not None else self.train["target"].to_numpy()


def load_fold(
    *, folds_csv: str | Path, resized: Path, fold: FoldId, soft_labels: str | Path | None = None
) -> FoldData:
    """folds.csv split into fold ``fold``'s training rows (every other fold) and validation rows; for
    :data:`FULL`, every row trains and none validates.

    ``soft_labels``: a distill.py file whose rows replace the training images' hard labels.

    Raises:
        LayoutError: an input is missing, or ``fold`` is not a fold of folds.csv.
        OOFError: the soft labels do not match folds.csv.
    """
    table, classes = training_table(folds_csv, resized)
    present = sorted(table["fold"].unique().tolist())
    if fold != FULL and fold not in present:
        raise LayoutError(f"fold {fold} out of range: {folds_csv} has folds {present}")
    is_train = np.ones(len(table), dtype=bool) if fold == FULL else (table["fold"] != fold).to_numpy()
    soft = None
    if soft_labels:
        every = load_soft_labels(Path(soft_labels), table, classes)
        soft = every.rows(is_train) if isinstance(every, TopK) else every[is_train]
    return FoldData(table[is_train], table[~is_train], classes, soft)


def assemble_oof(
    exp: Experiment, folds: pd.DataFrame, *, view: str = ORIG, dense_max_cells: int = DENSE_MAX_CELLS,
    topk: int = TOPK,
) -> Path | None:  # fmt: skip
    """The experiment's OOF logits under ``view`` (``orig``: oof.npz; else oof_<view>.npz) in folds.csv row
    order, once every fold has written its own (:meth:`Experiment.fold_view_oof`).

    A fold whose file holds other images than folds.csv gives it (folds remade since it trained) counts as
    not trained yet: retraining the folds one by one after new folds must not stop at the first one.
    The fold files are read memory-mapped and copied a chunk of rows at a time into the store's format
    (lib/oof.py; ``dense_max_cells``, ``topk``: config store_dense_max_cells, store_topk), so no [N, C]
    float32 array is made. Returns the file written, or None while a fold is missing.

    Raises:
        LayoutError: the folds were trained on different classes, or together do not cover folds.csv.
        OOFError: a fold file is unreadable.
    """
    fold_ids = sorted(folds["fold"].unique())
    parts = [exp.fold_view_oof(k, view) for k in fold_ids]
    if not all(p.is_file() for p in parts):
        return None
    pieces = [open_oof(p) for p in parts]
    stale = [
        k
        for k, piece in zip(fold_ids, pieces, strict=True)
        if set(piece.image) != set(folds.loc[folds["fold"] == k, "image"].astype(str))
    ]
    if stale:
        log.info(
            "OOF (view %s) of fold(s) %s of %s predates the current folds.csv: the experiment's is assembled "
            "once they are retrained", view, ", ".join(map(str, stale)), exp.name,
        )  # fmt: skip
        return None
    classes = pieces[0].classes
    if any(p.classes != classes for p in pieces):
        raise LayoutError(f"the folds of {exp.root} were trained on different classes: retrain them")
    images = pd.Index(np.concatenate([p.image for p in pieces]))
    if not images.is_unique or set(images) != set(folds["image"].astype(str)):
        raise LayoutError(f"the OOF files of {exp.root} do not cover folds.csv exactly: retrain the folds")
    source = images.get_indexer(folds["image"].astype(str))  # each folds.csv row's row among the pieces
    width = min([topk, *(p.topk.k for p in pieces if p.topk is not None)])  # fold files of an older store_topk
    out = Collector(len(folds), len(classes), dense_max_cells=dense_max_cells, topk=width)
    start = 0
    for piece in pieces:
        dest = np.flatnonzero((source >= start) & (source < start + len(piece)))
        step = rows_per_chunk(len(classes))
        for i in range(0, len(dest), step):
            out.put(dest[i : i + step], piece.take(source[dest[i : i + step]] - start))
        start += len(piece)
    rows = folds.assign(image=folds["image"].astype(str))
    target = exp.view_oof(view)
    write_oof(target, rows, out.result(), classes, dense_max_cells=dense_max_cells, topk=topk)
    return target


def assemble_oofs(
    exp: Experiment, folds: pd.DataFrame, *, views: list[str], dense_max_cells: int = DENSE_MAX_CELLS,
    topk: int = TOPK,
) -> dict[str, Path]:  # fmt: skip
    """:func:`assemble_oof` for orig and every view of ``views`` (config tta_views): view -> the file
    written, for those every fold has written its own."""
    written = {}
    for view in dict.fromkeys([ORIG, *views]):
        if oof := assemble_oof(exp, folds, view=view, dense_max_cells=dense_max_cells, topk=topk):
            written[view] = oof
            log.info("all folds done: OOF logits%s -> %s", "" if view == ORIG else f" under view {view}", oof)
    return written
