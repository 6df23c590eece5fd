"""The prediction store: the one place out-of-fold logits, view OOF, soft labels and test logits are written,
read and checked against folds.csv.

**File.** An uncompressed ``.npz`` (np.savez: no pickles) holding ``image`` (str [N]), ``fold`` (int16 [N],
the fold that validated each image), ``classes`` (str [C], index -> name) and one prediction array under its
key (``logits``; soft labels: ``log_targets``), stored one of two ways by size (:func:`uses_topk`):

- dense: ``<key>`` float16 [N, C], while N x C <= ``dense_max_cells`` (config ``store_dense_max_cells``,
  default :data:`DENSE_MAX_CELLS`, 100 MB) or k >= C: every demo and tiny test file;
- top-k above it: ``<key>_index`` int32 [N, k], ``<key>_values`` float16 [N, k] and ``<key>_rest`` float32
  [N], a :class:`TopK` (k: config ``store_topk``, default :data:`TOPK`). 550k images x 5,000 classes is
  11 GB as float32 and 83 MB as top-50.

float16 keeps 11 significant bits (relative rounding error <= 2^-11, about 0.05%; a logit of 10 is kept within
0.004), so scores computed from a saved file differ from the in-memory logits' in about the fourth digit: a
test comparing saved OOF with recomputed logits needs float16-level tolerance (rtol ~1e-3), or must compare
with the logits rounded to float16.

**Reading.** :func:`open_oof` memory-maps the prediction arrays from their offsets inside the zip (np.savez
stores members uncompressed), so opening costs nothing and only the rows read are paged in.
:func:`open_aligned` puts a file in folds.csv order, refusing files whose images, fold ids or classes differ
from folds.csv, and :meth:`Aligned.chunks` streams its rows about :data:`CHUNK_CELLS` cells at a time.
:func:`aligned_predictions` gives all rows at once, dense or top-k as stored; :func:`aligned_logits` dense.

**Soft labels** (src/distill.py) are stored as log-probabilities floored at :data:`LOG_FLOOR`: the softmax of a
row, dense or top-k, is the soft label, so a top-k soft label keeps its k probabilities (up to float16: a
probability p within a relative |log p| x 2^-11) and the residual mass in ``rest`` (:func:`load_soft_labels`).
"""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lib.common import PipelineError, atomic_path, preview
from lib.metrics import log_softmax

if TYPE_CHECKING:
    import pandas as pd

LOGITS = "logits"  # the array of an OOF, view-OOF or test-logit file
SOFT_KEY = "log_targets"  # the array of a soft-label file: log-probabilities
DENSE_MAX_CELLS = 50_000_000  # N x C above which a file is stored top-k (config store_dense_max_cells)
TOPK = 50  # classes kept per row of a top-k file (config store_topk)
CHUNK_CELLS = 1 << 22  # rows are streamed in chunks of about this many cells (32 MB as float64)
LOG_FLOOR = -80.0  # a soft label's log(0): exp(-80) ~ 2e-35 is nothing, and the file stays finite
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504
ROW_SUM_TOL = 1e-3  # a soft label's probabilities must sum to 1 within this (float16 rounding is ~1e-4)
_TOPK_PARTS = ("index", "values", "rest")


def rows_per_chunk(n_classes: int, width: int | None = None) -> int:
    """Rows of about CHUNK_CELLS cells when a row holds ``width`` cells (default ``n_classes``)."""
    return max(1, CHUNK_CELLS // max(1, width or n_classes))


def uses_topk(n: int, n_classes: int, *, dense_max_cells: int, topk: int) -> bool:
    """Whether an [n, n_classes] prediction is stored top-k: above ``dense_max_cells`` cells, when k < C."""
    return n * n_classes > dense_max_cells and topk < n_classes


@dataclass(frozen=True)
class TopK:
    """The k largest logits of each row and the log-sum-exp of the rest: a compact stand-in for [N, C] logits
    when C is large (5,000 classes x 550k images is 11 GB dense in float32; top-50 is 0.2 GB).

    ``index`` int32 [N, k]: class indices, each row in descending order of logit; ``values`` float [N, k]:
    those logits; ``rest`` float32 [N]: log-sum-exp of the row's other C - k logits (-inf when k == C), so the
    softmax over all C classes is exact for the k kept ones; ``n_classes``: C. Arrays may be memory-mapped
    (a file opened by :func:`open_oof`).
    """

    index: np.ndarray
    values: np.ndarray
    rest: np.ndarray
    n_classes: int

    def __len__(self) -> int:
        return len(self.index)

    @property
    def k(self) -> int:
        return self.index.shape[1]

    @classmethod
    def from_logits(cls, logits: np.ndarray, k: int, keep: np.ndarray | None = None) -> TopK:
        """The top ``k`` of dense logits [N, C] (all C, sorted, when k >= C), a chunk of rows at a time (no
        [N, C] float64 temporary). ``keep`` int [N]: a class each row keeps whatever its logit (a soft
        label's true class), in place of the k-th largest when it is not among the top k."""
        n, c = logits.shape
        k = min(k, c)
        step = rows_per_chunk(c)
        parts = [
            _top_k(np.asarray(logits[i : i + step], np.float32), k, None if keep is None else keep[i : i + step])
            for i in range(0, n, step)
        ]
        return cls.concat(parts, k=k, n_classes=c)

    @classmethod
    def concat(cls, parts: list[TopK], *, k: int, n_classes: int) -> TopK:
        """The rows of ``parts`` (all of width ``k`` over ``n_classes``) one after the other."""
        if not parts:
            return cls(np.zeros((0, k), np.int32), np.zeros((0, k), np.float32), np.zeros(0, np.float32), n_classes)
        return cls(
            np.concatenate([p.index for p in parts]), np.concatenate([p.values for p in parts]),
            np.concatenate([p.rest for p in parts]), n_classes,
        )  # fmt: skip

    def rows(self, which: slice | np.ndarray) -> TopK:
        """The rows ``which`` selects (a slice, a boolean mask or indices), as in-memory float32 arrays."""
        return TopK(
            np.asarray(self.index[which], np.int32), np.asarray(self.values[which], np.float32),
            np.asarray(self.rest[which], np.float32), self.n_classes,
        )  # fmt: skip

    def fill(self) -> np.ndarray:
        """float64 [N]: the logit :meth:`dense` gives each class outside the top k, ``rest - log(C - k)``."""
        if self.k >= self.n_classes:
            return np.full(len(self), -np.inf)
        return self.rest.astype(np.float64) - np.log(self.n_classes - self.k)

    def dense(self) -> np.ndarray:
        """float32 [N, C] logits: the k kept in place, every other class ``rest - log(C - k)`` (the residual
        mass spread evenly), so each row's softmax gives the kept classes their exact probabilities."""
        n, c, k = len(self), self.n_classes, self.k
        fill = self.fill() if k < c else np.zeros(n)
        out = np.repeat(fill.astype(np.float32)[:, None], c, axis=1)
        np.put_along_axis(out, self.index.astype(np.int64), np.asarray(self.values, np.float32), axis=1)
        return out

    def log_norm(self) -> np.ndarray:
        """float64 [N]: the log-sum-exp of each whole row (the softmax's normaliser)."""
        v = np.asarray(self.values, np.float64)
        top = v.max(axis=1) if self.k else np.full(len(self), -np.inf)
        kept = top + np.log(np.exp(v - top[:, None]).sum(axis=1))
        return np.logaddexp(kept, np.asarray(self.rest, np.float64))

    def log_prob(self, y: np.ndarray) -> np.ndarray:
        """float64 [N]: log-softmax of class ``y[i]`` (int [N]) in row i, the even spread outside the top k."""
        hit = np.asarray(self.index) == np.asarray(y)[:, None]
        found = hit.any(axis=1)
        kept = np.take_along_axis(np.asarray(self.values, np.float64), hit.argmax(axis=1)[:, None], axis=1)[:, 0]
        return np.where(found, kept, self.fill()) - self.log_norm()

    def probs(self) -> np.ndarray:
        """float32 [N, C]: the softmax of :meth:`dense` (a top-k soft label's target rows), rows summing to 1."""
        return np.exp(self.dense().astype(np.float64) - self.log_norm()[:, None]).astype(np.float32)

    def truncate(self, k: int) -> TopK:
        """The first ``k`` columns (k <= self.k), the dropped ones added to ``rest``."""
        if k >= self.k:
            return self
        dropped = np.asarray(self.values[:, k:], np.float64)
        top = dropped.max(axis=1)
        lse = top + np.log(np.exp(dropped - top[:, None]).sum(axis=1))
        rest = np.logaddexp(np.asarray(self.rest, np.float64), lse).astype(np.float32)
        return TopK(np.asarray(self.index[:, :k]), np.asarray(self.values[:, :k]), rest, self.n_classes)


def _top_k(logits: np.ndarray, k: int, keep: np.ndarray | None) -> TopK:
    """:meth:`TopK.from_logits` of one chunk of rows, float32 [n, C]."""
    n, c = logits.shape
    score = logits if keep is None else np.where(np.arange(c) == np.asarray(keep)[:, None], np.inf, logits)
    part = np.argpartition(-score, k - 1, axis=1)[:, :k] if k < c else np.tile(np.arange(c), (n, 1))
    vals = np.take_along_axis(logits, part, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    index = np.take_along_axis(part, order, axis=1).astype(np.int32)
    values = np.take_along_axis(vals, order, axis=1)
    if k == c:
        return TopK(index, values, np.full(n, -np.inf, np.float32), c)
    others = logits.astype(np.float64)
    np.put_along_axis(others, index.astype(np.int64), -np.inf, axis=1)
    top = others.max(axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)  # a row of -inf others (the union of _mean_topk): rest -inf
    with np.errstate(divide="ignore"):
        rest = (top[:, 0] + np.log(np.exp(others - top).sum(axis=1))).astype(np.float32)
    return TopK(index, values, rest, c)


Predictions = np.ndarray | TopK  # float [N, C] logits, or their top k


class OOFError(PipelineError, ValueError):
    """An OOF or soft-label file does not match folds.csv; the message says what differs and the fix."""


# ---------------------------------------------------------------------------------------------------------
# Building and writing.


class Collector:
    """An [N, C] prediction filled piece by piece (fold by fold, batch by batch, in any row order), held in
    the store's format from the start (:func:`uses_topk`): float16 [N, C] when small, else top-k float32,
    so no [N, C] float32 array is ever made. Every row must be put once before :meth:`result`."""

    def __init__(self, n: int, n_classes: int, *, dense_max_cells: int, topk: int) -> None:
        self.n_classes = n_classes
        self.is_topk = uses_topk(n, n_classes, dense_max_cells=dense_max_cells, topk=topk)
        self.k = min(topk, n_classes)
        if self.is_topk:
            self.top = TopK(
                np.zeros((n, self.k), np.int32), np.zeros((n, self.k), np.float32), np.zeros(n, np.float32),
                n_classes,
            )  # fmt: skip
        else:
            self.dense = np.zeros((n, n_classes), np.float16)

    def put(self, rows: np.ndarray | slice, values: Predictions) -> None:
        """Set ``rows`` (positions) to ``values``: dense [n, C] logits or a TopK at least k wide.

        Raises:
            OOFError: a value lies beyond float16's range (|x| > 65504).
            ValueError: a TopK narrower than k (the caller must size the collector to its narrowest piece).
        """
        if not self.is_topk:
            block = values.dense() if isinstance(values, TopK) else np.asarray(values)
            self.dense[rows] = _float16(block)
            return
        piece = values if isinstance(values, TopK) else TopK.from_logits(np.asarray(values), self.k)
        if piece.k < self.k:
            raise ValueError(f"a top-{piece.k} piece cannot fill a top-{self.k} prediction")
        piece = piece.rows(slice(None)).truncate(self.k)
        _float16(piece.values)
        self.top.index[rows], self.top.values[rows], self.top.rest[rows] = piece.index, piece.values, piece.rest

    def result(self) -> Predictions:
        """float16 [N, C] logits, or the TopK."""
        return self.top if self.is_topk else self.dense


def _float16(values: np.ndarray) -> np.ndarray:
    """``values`` as float16, refusing what float16 cannot hold (NaN and inf pass: reading refuses them)."""
    values = np.asarray(values)
    finite = np.abs(values[np.isfinite(values)])
    if finite.size and finite.max() > FLOAT16_MAX:
        raise OOFError(
            f"a prediction of magnitude {finite.max():.4g} does not fit float16 (at most {FLOAT16_MAX:.0f}): "
            "the model's logits have diverged; retrain it (lower lr, or precision fp32)"
        )
    return values.astype(np.float16, copy=False)


def to_store(values: Predictions, *, dense_max_cells: int = DENSE_MAX_CELLS, topk: int = TOPK) -> Predictions:
    """``values`` (dense [N, C] or TopK) in the format a file of its size is stored in: float16 [N, C], or a
    TopK of width ``topk`` (a narrower TopK stays as it is)."""
    n, c = values.shape if isinstance(values, np.ndarray) else (len(values), values.n_classes)
    topk_format = uses_topk(n, c, dense_max_cells=dense_max_cells, topk=topk)
    if isinstance(values, TopK) and topk_format:
        return values.truncate(topk)
    if isinstance(values, np.ndarray) and not topk_format:
        return _float16(values)
    collector = Collector(n, c, dense_max_cells=dense_max_cells, topk=topk)
    step = rows_per_chunk(c)
    for i in range(0, n, step):
        part = values.rows(slice(i, i + step)) if isinstance(values, TopK) else values[i : i + step]
        collector.put(slice(i, i + step), part)
    return collector.result()


def write_oof(
    path: Path,
    rows: pd.DataFrame,
    values: Predictions,
    classes: list[str],
    key: str = LOGITS,
    *,
    dense_max_cells: int = DENSE_MAX_CELLS,
    topk: int = TOPK,
) -> None:
    """Write ``values`` (dense [N, C] logits or a TopK; one row per row of ``rows``, which has image and fold
    columns) atomically, in the format of its size (:func:`uses_topk`).

    Raises:
        OOFError: the shapes disagree, or a value does not fit float16.
    """
    n, c = values.shape if isinstance(values, np.ndarray) else (len(values), values.n_classes)
    if (n, c) != (len(rows), len(classes)):
        raise OOFError(f"{path}: {n} x {c} predictions for {len(rows)} rows x {len(classes)} classes")
    try:
        stored = to_store(values, dense_max_cells=dense_max_cells, topk=topk)
    except OOFError as e:
        raise OOFError(f"{path}: {e}") from None
    if isinstance(stored, TopK):
        arrays = {
            f"{key}_index": stored.index.astype(np.int32), f"{key}_values": _float16(stored.values),
            f"{key}_rest": stored.rest.astype(np.float32),
        }  # fmt: skip
    else:
        arrays = {key: stored}
    with atomic_path(Path(path)) as tmp:
        np.savez(
            tmp, **arrays, image=rows["image"].to_numpy(dtype=str), fold=rows["fold"].to_numpy(dtype=np.int16),
            classes=np.array(classes, dtype=str),
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Reading.


@dataclass(frozen=True)
class Stored:
    """One prediction file opened for reading: its rows' ``image`` (str [N]) and ``fold`` (int [N]), its
    ``classes``, and its array memory-mapped: ``dense`` (float16 [N, C]) or ``topk`` (the other None)."""

    path: Path
    key: str
    image: np.ndarray
    fold: np.ndarray
    classes: list[str]
    dense: np.ndarray | None
    topk: TopK | None

    def __len__(self) -> int:
        return len(self.image)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def take(self, rows: np.ndarray | slice) -> Predictions:
        """Rows ``rows`` (indices or a slice) in memory: float32 [n, C], or a TopK with float32 values."""
        if self.topk is not None:
            return self.topk.rows(rows)
        return np.asarray(self.dense[rows], np.float32)


def _member(path: Path, zf: zipfile.ZipFile, name: str, *, mmap: bool) -> np.ndarray:
    """Array ``name`` of the .npz ``path``: memory-mapped from its offset inside the zip when ``mmap`` and it
    is stored uncompressed (np.savez), else read whole."""
    info = zf.getinfo(f"{name}.npy")
    if not mmap or info.compress_type != zipfile.ZIP_STORED:
        with zf.open(info) as f:
            return np.lib.format.read_array(f, allow_pickle=False)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # the zip local file header: signature ... name length, extra length
        if local[:4] != b"PK\x03\x04":
            raise ValueError(f"member {name} has no local header")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"member {name} has .npy format {version}")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError(f"member {name} holds Python objects")
    if 0 in shape:  # mmap cannot map zero bytes
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def open_oof(path: Path, key: str = LOGITS) -> Stored:
    """The prediction file ``path`` opened: small arrays read, the ``key`` array memory-mapped.

    Raises:
        OOFError: the file is missing, unreadable, or lacks the arrays.
    """
    path = Path(path)
    if not path.is_file():
        raise OOFError(f"{path} not found: train every fold of that experiment first (src/train.py --fold all)")
    try:
        with zipfile.ZipFile(path) as zf:
            names = {n.removesuffix(".npy") for n in zf.namelist()}
            is_topk = key not in names and {f"{key}_{p}" for p in _TOPK_PARTS} <= names
            if not (key in names or is_topk) or not {"image", "fold", "classes"} <= names:
                raise OOFError(f"{path} lacks the arrays {key!r}, 'image' and 'fold': re-run the stage that wrote it")
            image, fold, classes = (_member(path, zf, n, mmap=False) for n in ("image", "fold", "classes"))
            classes = classes.astype(str).tolist()
            dense = None if is_topk else _member(path, zf, key, mmap=True)
            topk = None
            if is_topk:
                index, values, rest = (_member(path, zf, f"{key}_{p}", mmap=p != "rest") for p in _TOPK_PARTS)
                topk = TopK(index, values, rest, len(classes))
    except OOFError:
        raise
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise OOFError(f"{path} is not a readable .npz file ({e}): delete it and re-run the stage that wrote it") from e
    shape = dense.shape if dense is not None else (*topk.index.shape[:1], len(classes))
    parts_agree = topk is None or (topk.values.shape == topk.index.shape and topk.rest.shape == (len(topk),))
    if shape != (len(image), len(classes)) or len(fold) != len(image) or not parts_agree:
        raise OOFError(f"{path} holds {shape} predictions for {len(image)} images x {len(classes)} classes: re-run the stage that wrote it")
    return Stored(path, key, image.astype(str), fold, classes, dense, topk)


def read_oof(path: Path) -> dict[str, np.ndarray]:
    """Every array of a prediction file, in memory (a clear error when it is missing or not one); a dense
    prediction array comes back as float32 (it is stored float16). For small files and tests: stages read
    through :func:`open_oof` / :func:`open_aligned`."""
    path = Path(path)
    if not path.is_file():
        raise OOFError(f"{path} not found: train every fold of that experiment first (src/train.py --fold all)")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise OOFError(f"{path} is not a readable .npz file ({e}): delete it and re-run the stage that wrote it") from e
    return {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in data.items()}


@dataclass(frozen=True)
class Aligned:
    """A prediction file's rows in folds.csv order: folds.csv row i is the file's row ``order[i]``."""

    stored: Stored
    order: np.ndarray

    def __len__(self) -> int:
        return len(self.order)

    def chunks(self, rows: int | None = None) -> Iterator[tuple[slice, Predictions]]:
        """(positions in folds.csv order, their rows: float32 [n, C] or a TopK) for every chunk of ``rows``
        rows (default: about CHUNK_CELLS cells).

        Raises:
            OOFError: a row holds NaN or inf (a top-k row's rest may be -inf: nothing outside its top k).
        """
        s = self.stored
        step = rows or rows_per_chunk(s.n_classes, s.topk.k if s.topk is not None else None)
        for start in range(0, len(self.order), step):
            where = slice(start, start + step)
            part = s.take(self.order[where])
            if isinstance(part, TopK):
                bad = not np.isfinite(part.values).all() or np.isnan(part.rest).any() or (part.rest == np.inf).any()
            else:
                bad = not np.isfinite(part).all()
            if bad:
                raise OOFError(f"{s.path} holds NaN or inf values: re-run the stage that wrote it")
            yield where, part

    def all(self) -> Predictions:
        """Every row in memory: float32 [N, C], or a TopK (checked as :meth:`chunks` does)."""
        parts = [p for _, p in self.chunks(rows=max(1, len(self.order)) if self.stored.topk is not None else None)]
        if self.stored.topk is not None:
            return TopK.concat(parts, k=self.stored.topk.k, n_classes=self.stored.n_classes)
        return np.concatenate(parts) if parts else np.zeros((0, self.stored.n_classes), np.float32)


def open_aligned(path: Path, folds: pd.DataFrame, classes: list[str] | None = None, key: str = LOGITS) -> Aligned:
    """The file ``path`` put in the row order of ``folds`` (folds.csv rows), nothing read yet.

    Refuses a file whose images or fold ids differ from folds.csv: a prediction for image i is only
    out-of-fold if it came from the model of the fold that validated i, so the fold ids must agree
    (a file from an older or re-seeded folds.csv would leak labels into every later stage). With
    ``classes``, also one made for other classes.

    Raises:
        OOFError: as above, or the file is missing or unreadable.
    """
    import pandas as pd  # here: lib.data imports this module, and predict.py never loads pandas

    stored = open_oof(Path(path), key)
    images = pd.Index(stored.image)
    fix = "re-run that stage on the current folds.csv (or restore the folds.csv it was made with)"
    if not images.is_unique:
        raise OOFError(f"{path} lists some images twice ({preview(images[images.duplicated()].tolist(), 3, quote=True)}): {fix}")
    want = folds["image"].astype(str)
    missing = want[~want.isin(images)].tolist()
    extra = images[~images.isin(want)].tolist()
    if missing or extra:
        raise OOFError(
            f"{path} does not cover folds.csv's images: {len(missing)} missing ({preview(missing, 3, quote=True)}), "
            f"{len(extra)} not in folds.csv ({preview(extra, 3, quote=True)}): {fix}"
        )
    order = images.get_indexer(want)
    moved = np.flatnonzero(stored.fold[order].astype(int) != folds["fold"].to_numpy(dtype=int))
    if len(moved):
        names = want.iloc[moved].tolist()
        raise OOFError(
            f"{path}: {len(moved)} image(s) carry another fold id than in folds.csv ({preview(names, 3, quote=True)}), so "
            f"their predictions may come from a model trained on them: {fix}"
        )
    got = stored.classes
    if classes is not None and got != classes:
        missing, extra = sorted(set(classes) - set(got)), sorted(set(got) - set(classes))
        raise OOFError(
            f"{path} was made for other classes than folds.csv: {len(got)} vs {len(classes)} classes, "
            f"{len(missing)} of folds.csv missing ({preview(missing, quote=True)}), {len(extra)} not in it "
            f"({preview(extra, quote=True)}){', other order' if not missing and not extra else ''}: re-run the "
            "stage that wrote it on the current folds.csv"
        )
    return Aligned(stored, order)


def aligned(path: Path, folds: pd.DataFrame, key: str = LOGITS) -> tuple[Predictions, list[str]]:
    """The file's rows reordered to ``folds`` (float32 [N, C] or a TopK, as stored) and its class names;
    refused as :func:`open_aligned` says."""
    view = open_aligned(Path(path), folds, key=key)
    return view.all(), view.stored.classes


def aligned_predictions(path: Path, folds: pd.DataFrame, classes: list[str], key: str = LOGITS) -> Predictions:
    """The rows every consumer of an experiment's OOF (distill, stack, package, report) works from: float32
    [N, C] logits, or a TopK for a file stored top-k, in folds.csv order; :func:`open_aligned`'s refusals,
    plus files made for other classes than ``classes`` or holding NaN/inf."""
    return open_aligned(Path(path), folds, classes, key).all()


def aligned_logits(path: Path, folds: pd.DataFrame, classes: list[str], key: str = LOGITS) -> np.ndarray:
    """:func:`aligned_predictions` as dense float32 [N, C] logits (a top-k file's residual spread evenly,
    :meth:`TopK.dense`): for consumers that need every column, at a size where N x C fits in memory."""
    values = aligned_predictions(path, folds, classes, key)
    return values.dense() if isinstance(values, TopK) else values


def load_soft_labels(path: Path, folds: pd.DataFrame, classes: list[str]) -> Predictions:
    """Soft labels of a distill.py file aligned with ``folds`` (all of folds.csv): probabilities float32
    [N, C] from a dense file, or the TopK of log-probabilities of a top-k file (the softmax of a row, e.g.
    :meth:`TopK.probs`, is its soft label). Refuses files made from other folds, other classes, or holding
    rows that are not distributions."""
    view = open_aligned(Path(path), folds, classes, SOFT_KEY)
    for _, part in view.chunks():
        mass = np.exp(part.log_norm()) if isinstance(part, TopK) else np.exp(part.astype(np.float64)).sum(axis=1)
        if not np.allclose(mass, 1, atol=ROW_SUM_TOL):
            raise OOFError(f"{path}: soft labels must be finite, non-negative rows summing to 1: rebuild it")
    soft = view.all()
    if isinstance(soft, TopK):
        return soft
    return np.exp(log_softmax(soft)).astype(np.float32)  # renormalised: float16 rounding leaves ~1e-4


# ---------------------------------------------------------------------------------------------------------
# Computing on stored predictions without [N, C] arrays.


def row_stats(values: Predictions, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class int64 [n], log-probability of the true class ``y`` float64 [n]) of logit rows."""
    if isinstance(values, TopK):
        return np.asarray(values.index[:, 0], np.int64), values.log_prob(y)
    values = np.asarray(values)
    return values.argmax(axis=1), log_softmax(values)[np.arange(len(y)), y]


def scores_from(pred: np.ndarray, log_p: np.ndarray, y: np.ndarray, n_classes: int) -> dict[str, float]:
    """Accuracy, macro-F1 and log-loss from :func:`row_stats` and the true classes ``y`` (int [n]): the
    numbers lib.metrics.index_scores gives (scikit-learn's clipping of probabilities at float64's eps)
    without its [n, C] one-hot and probability arrays (8 GB at 200k images x 5,000 classes)."""
    from sklearn.metrics import f1_score

    eps = np.finfo(np.float64).eps
    p = np.clip(np.exp(log_p), eps, 1 - eps)
    return {
        "accuracy": float(np.mean(pred == y)),
        "macro_f1": float(f1_score(y, pred, labels=np.arange(n_classes), average="macro", zero_division=0)),
        "log_loss": float(-np.log(p).mean()),
    }


def prediction_scores(values: Predictions, y: np.ndarray, n_classes: int) -> dict[str, float]:
    """Accuracy, macro-F1 and log-loss of logit rows (dense [N, C] or a TopK) against ``y`` (int [N]), in
    chunks of rows: equal to lib.metrics.index_scores on dense logits."""
    n = len(y)
    pred, log_p = np.zeros(n, np.int64), np.zeros(n)
    width = values.k if isinstance(values, TopK) else None
    step = rows_per_chunk(n_classes, width)
    for i in range(0, n, step):
        part = values.rows(slice(i, i + step)) if isinstance(values, TopK) else values[i : i + step]
        pred[i : i + step], log_p[i : i + step] = row_stats(part, y[i : i + step])
    return scores_from(pred, log_p, y, n_classes)


def mean_predictions(parts: list[Predictions]) -> Predictions:
    """The mean of several logit arrays of the same rows (a member's test-time views): exact [N, C] (float32,
    or float64 for float64 parts) when all are dense; otherwise the TopK (width: the widest part's) of the mean of their :meth:`TopK.dense`
    rows, computed on the union of their top-k classes without [N, C] arrays (dense parts first reduced to
    that width)."""
    if all(isinstance(p, np.ndarray) for p in parts):
        total = np.array(parts[0], np.result_type(parts[0], np.float32))
        for p in parts[1:]:
            total += p
        return total / len(parts)
    c = next(p.n_classes for p in parts if isinstance(p, TopK))
    k = max(p.k for p in parts if isinstance(p, TopK))
    n = len(parts[0])
    step = rows_per_chunk(c, k * len(parts))
    out = []
    for i in range(0, n, step):
        rows = [p.rows(slice(i, i + step)) if isinstance(p, TopK) else TopK.from_logits(p[i : i + step], k) for p in parts]
        out.append(_mean_topk(rows, k))
    return TopK.concat(out, k=min(k, c), n_classes=c)


def _mean_topk(parts: list[TopK], k: int) -> TopK:
    """:func:`mean_predictions` of one chunk of TopK rows. A class in some part's top k takes, in each part,
    its kept logit or that part's even spread; the mean of the top-k is never below the spread's mean, so the
    union holds the mean's top k; the classes outside the union all share the mean spread."""
    n, c = len(parts[0]), parts[0].n_classes
    rowkey = np.arange(n, dtype=np.int64)[:, None] * c
    cand = np.sort(np.concatenate([p.index for p in parts], axis=1), axis=1).astype(np.int64)
    dup = np.zeros(cand.shape, bool)
    dup[:, 1:] = cand[:, 1:] == cand[:, :-1]
    total = np.zeros(cand.shape)
    for p in parts:
        order = np.argsort(p.index, axis=1)
        keys = (rowkey + np.take_along_axis(p.index, order, axis=1)).ravel()
        vals = np.take_along_axis(np.asarray(p.values, np.float64), order, axis=1).ravel()
        query = (rowkey + cand).ravel()
        pos = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
        found = (keys[pos] == query).reshape(cand.shape)
        total += np.where(found, vals[pos].reshape(cand.shape), p.fill()[:, None])
    mean = np.where(dup, -np.inf, total / len(parts))
    spread = np.mean([p.fill() for p in parts], axis=0)  # every class outside the union
    outside = c - (~dup).sum(axis=1)
    k = min(k, c)
    top = TopK.from_logits(mean, k) if mean.shape[1] > k else _top_k(mean.astype(np.float32), mean.shape[1], None)
    index = np.take_along_axis(cand, top.index.astype(np.int64), axis=1).astype(np.int32)
    with np.errstate(divide="ignore"):
        rest = np.logaddexp(top.rest.astype(np.float64), spread + np.log(outside))
    return TopK(index, top.values.astype(np.float32), rest.astype(np.float32), c)
