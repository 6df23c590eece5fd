"""Out-of-fold prediction files: the one place they are written, read and checked against folds.csv.

An OOF file is an ``.npz`` (no pickles) with ``logits`` float32 [N, C], ``image`` (str [N]), ``fold``
(int16 [N], the fold each image was validated in) and ``classes`` (str [C], index -> name). Dense:
N x C x 4 bytes, fine at thousands of images and a few hundred classes (at 500k images x 5,000 classes it
would be 10 GB per member). Soft-label files (src/distill.py) share the layout with ``targets`` in place
of ``logits``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lib.common import PipelineError, atomic_path, preview

SOFT_KEY = "targets"  # the array of a soft-label file


@dataclass(frozen=True)
class TopK:
    """The k largest logits of each row and the log-sum-exp of the rest: a compact stand-in for [N, C] logits
    when C is large (5,000 classes x 550k images is 11 GB dense in float32; top-50 is 0.2 GB).

    ``index`` int32 [N, k]: class indices, each row in descending order of logit; ``values`` float [N, k]:
    those logits; ``rest`` float32 [N]: log-sum-exp of the row's other C - k logits (-inf when k == C), so the
    softmax over all C classes is exact for the k kept ones; ``n_classes``: C.
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
    def from_logits(cls, logits: np.ndarray, k: int) -> TopK:
        """The top ``k`` of dense logits [N, C] (all C, sorted, when k >= C)."""
        logits = np.asarray(logits, dtype=np.float32)
        n, c = logits.shape
        k = min(k, c)
        part = np.argpartition(-logits, k - 1, axis=1)[:, :k] if k < c else np.tile(np.arange(c), (n, 1))
        vals = np.take_along_axis(logits, part, axis=1)
        order = np.argsort(-vals, axis=1, kind="stable")
        index = np.take_along_axis(part, order, axis=1).astype(np.int32)
        values = np.take_along_axis(vals, order, axis=1)
        if k == c:
            return cls(index, values, np.full(n, -np.inf, np.float32), c)
        mask = np.ones_like(logits, dtype=bool)
        np.put_along_axis(mask, index, False, axis=1)
        others = np.where(mask, logits, -np.inf).astype(np.float64)
        top = others.max(axis=1, keepdims=True)
        rest = (top[:, 0] + np.log(np.exp(others - top).sum(axis=1))).astype(np.float32)
        return cls(index, values, rest, c)

    def rows(self, which: slice | np.ndarray) -> TopK:
        """The rows ``which`` selects (a slice, a boolean mask or indices)."""
        return TopK(self.index[which], self.values[which], self.rest[which], self.n_classes)

    def dense(self) -> np.ndarray:
        """float32 [N, C] logits: the k kept in place, every other class ``rest - log(C - k)`` (the residual
        mass spread evenly), so each row's softmax gives the kept classes their exact probabilities."""
        n, c, k = len(self), self.n_classes, self.k
        fill = self.rest - np.log(c - k) if k < c else np.zeros(n, np.float32)
        out = np.repeat(fill.astype(np.float32)[:, None], c, axis=1)
        np.put_along_axis(out, self.index.astype(np.int64), self.values.astype(np.float32), axis=1)
        return out


class OOFError(PipelineError, ValueError):
    """An OOF or soft-label file does not match folds.csv; the message says what differs and the fix."""


def write_oof(path: Path, rows: pd.DataFrame, values: np.ndarray, classes: list[str], key: str = "logits") -> None:
    """Write ``values`` (one row per row of ``rows``, which has image and fold columns) atomically."""
    with atomic_path(Path(path)) as tmp:
        np.savez(
            tmp, **{key: values.astype(np.float32)}, image=rows["image"].to_numpy(dtype=str),
            fold=rows["fold"].to_numpy(dtype=np.int16), classes=np.array(classes, dtype=str),
        )  # fmt: skip


def read_oof(path: Path) -> dict[str, np.ndarray]:
    """Every array of an OOF file (a clear error when it is missing or not one)."""
    path = Path(path)
    if not path.is_file():
        raise OOFError(f"{path} not found: train every fold of that experiment first (src/train.py --fold all)")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise OOFError(f"{path} is not a readable .npz file ({e}): delete it and re-run the stage that wrote it") from e


def aligned(path: Path, folds: pd.DataFrame, key: str = "logits") -> tuple[np.ndarray, list[str]]:
    """The file's ``key`` rows reordered to ``folds`` (folds.csv rows) and its class names.

    Refuses a file whose images or fold ids differ from folds.csv: a prediction for image i is only
    out-of-fold if it came from the model of the fold that validated i, so the fold ids must agree
    (a file from an older or re-seeded folds.csv would leak labels into every later stage).
    """
    data = read_oof(path)
    if key not in data or "image" not in data or "fold" not in data:
        raise OOFError(f"{path} lacks the arrays {key!r}, 'image' and 'fold': re-run the stage that wrote it")
    images = pd.Index(data["image"].astype(str))
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
    moved = np.flatnonzero(data["fold"][order].astype(int) != folds["fold"].to_numpy(dtype=int))
    if len(moved):
        names = want.iloc[moved].tolist()
        raise OOFError(
            f"{path}: {len(moved)} image(s) carry another fold id than in folds.csv ({preview(names, 3, quote=True)}), so "
            f"their predictions may come from a model trained on them: {fix}"
        )
    return data[key][order], data["classes"].astype(str).tolist()


def aligned_logits(path: Path, folds: pd.DataFrame, classes: list[str], key: str = "logits") -> np.ndarray:
    """:func:`aligned`, also refusing a file made for other classes than ``classes`` or holding NaN/inf:
    the rows every consumer of an experiment's OOF (distill, stack, package, report) works from."""
    values, got = aligned(Path(path), folds, key=key)
    if got != classes:
        missing, extra = sorted(set(classes) - set(got)), sorted(set(got) - set(classes))
        raise OOFError(
            f"{path} was made for other classes than folds.csv: {len(got)} vs {len(classes)} classes, "
            f"{len(missing)} of folds.csv missing ({preview(missing, quote=True)}), {len(extra)} not in it "
            f"({preview(extra, quote=True)}){', other order' if not missing and not extra else ''}: re-run the "
            "stage that wrote it on the current folds.csv"
        )
    if not np.isfinite(values).all():
        raise OOFError(f"{path} holds NaN or inf values: re-run the stage that wrote it")
    return values


def load_soft_labels(path: Path, folds: pd.DataFrame, classes: list[str]) -> np.ndarray:
    """Soft-label rows (float32 [N, C]) of a distill.py file aligned with ``folds`` (all of folds.csv),
    refusing files made from other folds, other classes, or holding rows that are not distributions."""
    soft = aligned_logits(Path(path), folds, classes, key=SOFT_KEY)
    if np.any(soft < 0) or not np.allclose(soft.sum(1), 1, atol=1e-3):
        raise OOFError(f"{path}: soft labels must be finite, non-negative rows summing to 1: rebuild it")
    return soft
