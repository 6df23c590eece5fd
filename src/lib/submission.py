"""The submission file: its rows (the test images, or a sample submission's ids), its columns, and how the
predicted probabilities become a CSV or JSON file, written atomically.

Rows: without a sample submission, every non-hidden file under the test folder once (lib.images.find_images:
a file that is no image gets the fallback prediction), sorted by relative path (the id is that path). With one, its rows in its order; its first column is the id, matched to the files by
lib.images.match_ids (relative path, with or without extension, or file name); an id without an image gets
the fallback prediction.

Columns (CSV): the sample submission's header, else ``image,label``.

- A sample is a **probability submission** when at least two of its non-id columns are names of the model's
  classes (one column alone is read as the label, even when a class is named like it: ``id,label`` with a
  class called "label" stays a label submission). Then each class column gets that class's probability
  (the model's own value, not renormalised), every other column gets 0 (a class the model never saw, or a
  column that is no class at all: a warning names them once, when the columns are planned), and the
  model's classes missing from the header are left out (a warning names them; a row then sums to less than
  1 by their probability) unless ``with_probs`` appends them.
- Otherwise every non-id column gets the predicted label (the class of highest probability).
- ``with_probs`` appends one column per class not already a probability column, named by the class, or
  ``prob_<class>`` when the header already holds that name.

JSON: ``{id: label}``, or with ``with_probs`` ``{id: {"label": label, "probs": {class: p}}}``; the sample's
header plays no part.
"""

from __future__ import annotations

import csv
import io
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lib.common import PipelineError, atomic_write, get_logger, preview
from lib.images import find_images, match_ids

log = get_logger("submission")

FORMATS = ("csv", "json")
DEFAULT_HEADER = ["image", "label"]
LABEL = -1  # Columns.cells: the column holds the predicted label
ZERO = -2  # Columns.cells: the column holds 0 (a probability column of no known class)


class SubmissionInputError(PipelineError, ValueError):
    """The test folder or the sample submission cannot be used; the message names it and the fix."""


@dataclass
class Rows:
    """The submission's rows.

    ``ids`` [R] the row ids as written; ``source`` [R] each row's image (an index into ``files``) or None
    when no image matches its id; ``files`` every file found (relative posix paths, sorted), predicted or
    not; ``escaping`` indices into ``files`` of links pointing outside the test folder (never read);
    ``header`` the sample submission's header, None without one.
    """

    ids: list[str]
    source: list[int | None]
    files: list[str]
    escaping: set[int]
    header: list[str] | None = None


def find_test_images(test_dir: Path) -> tuple[list[str], list[str]]:
    """(usable, escaping) paths of the files under ``test_dir``, relative to it, each sorted: every non-hidden
    file, an image or not (images.find_images; the ones that do not decode get the fallback prediction).

    Raises SubmissionInputError when the folder is missing, not a folder, or has nothing but hidden files.
    """
    if not test_dir.exists():
        raise SubmissionInputError(f"test folder {test_dir} does not exist: pass the folder of test images")
    if not test_dir.is_dir():
        raise SubmissionInputError(f"{test_dir} is not a folder: pass the folder of test images")
    usable, escaping = find_images(test_dir)
    if not usable and not escaping:
        anything = any(test_dir.iterdir())
        what = "holds no files to predict (hidden ones and __MACOSX are skipped)" if anything else "is empty"
        raise SubmissionInputError(f"test folder {test_dir} {what}: nothing to predict")
    return usable, escaping


def read_sample(path: Path) -> tuple[list[str], list[str]]:
    """A sample submission's (header, ids): the ids are the first cells of its non-empty rows, in order.

    Raises SubmissionInputError when the file is missing, not a UTF-8 CSV, or has fewer than two columns.
    """
    if not path.is_file():
        raise SubmissionInputError(f"sample submission {path} not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's byte-order mark
            table = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SubmissionInputError(f"sample submission {path} is not a readable CSV: {e}") from e
    if not table or len(table[0]) < 2:
        raise SubmissionInputError(
            f"sample submission {path} needs a header with an id column and at least one more column"
        )
    return table[0], [r[0] for r in table[1:] if r]


def make_rows(*, test_dir: Path, sample: Path | None) -> Rows:
    """The rows for the images under ``test_dir`` and the optional sample submission ``sample``.

    Warns naming the links that leave ``test_dir`` and the sample's ids without an image; raises
    SubmissionInputError as find_test_images and read_sample do.
    """
    usable, escaping = find_test_images(test_dir)
    files = sorted(usable + escaping)
    outside = set(escaping)
    esc = {i for i, f in enumerate(files) if f in outside}
    if escaping:
        log.warning(
            "%d file(s) link outside %s and are not read (fallback prediction): %s",
            len(escaping), test_dir, preview(escaping),
        )  # fmt: skip
    if sample is None:
        return Rows(files, list(range(len(files))), files, esc)
    header, ids = read_sample(sample)
    index = match_ids(ids, files)
    missing = [i for i, s in zip(ids, index, strict=True) if s is None]
    if missing:
        log.warning(
            "%d id(s) of %s have no image in %s (fallback prediction): %s",
            len(missing), sample, test_dir, preview(missing),
        )  # fmt: skip
    used = {s for s in index if s is not None}
    if len(used) < len(files):
        log.info(
            "%d image(s) of %s are not in the sample submission and are not predicted",
            len(files) - len(used), test_dir,
        )  # fmt: skip
    return Rows(ids, index, files, esc, header)


@dataclass(frozen=True)
class Columns:
    """A CSV's column plan: ``header`` the row written first; ``cells`` what each column after the id holds
    (a class index: that probability; LABEL: the label; ZERO: 0); ``unknown`` the probability submission's
    columns that are no class of the model; ``missing`` the classes of a probability submission not in it
    (and not appended)."""

    header: list[str]
    cells: list[int]
    unknown: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def plan_columns(*, header: list[str] | None, classes: list[str], with_probs: bool) -> Columns:
    """The columns of a CSV for a sample ``header`` (None: ``image,label``) and the model's ``classes``,
    by the rule of this module's docstring; warns once naming unknown columns and left-out classes."""
    header = list(header or DEFAULT_HEADER)
    col = {c: j for j, c in enumerate(classes)}
    given = header[1:]
    probability = sum(c in col for c in given) >= 2
    cells = [col.get(c, ZERO) for c in given] if probability else [LABEL] * len(given)
    extra = [c for c in classes if not (probability and c in given)] if with_probs else []
    names = [f"prob_{c}" if c in header else c for c in extra]
    plan = Columns(
        [*header, *names],
        cells + [col[c] for c in extra],
        [c for c in given if c not in col] if probability else [],
        [c for c in classes if c not in given and c not in extra] if probability else [],
    )
    if plan.unknown:
        log.warning(
            "the sample submission's column(s) %s are no class of the model (it knows %s): they get 0",
            preview(plan.unknown, quote=True), preview(classes, quote=True),
        )  # fmt: skip
    if plan.missing:
        log.warning(
            "class(es) %s of the model have no column in the sample submission: their probability is left "
            "out (pass --probs to append them)", preview(plan.missing, quote=True),
        )  # fmt: skip
    return plan


def _num(v: float) -> str:
    return f"{v:.6g}"


@dataclass
class Writer:
    """Renders the rows as a ``fmt`` file ("csv" or "json") at ``out`` and writes it atomically; write() is
    thread-safe (the main loop and the deadline timer both write). The CSV's columns are planned once, at
    construction (the warnings of plan_columns come then). Raises ValueError for another ``fmt``."""

    out: Path
    fmt: str
    with_probs: bool
    rows: Rows
    classes: list[str]
    columns: Columns | None = field(init=False, default=None)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"unknown submission format {self.fmt!r}: one of {FORMATS}")
        if self.fmt == "csv":
            self.columns = plan_columns(
                header=self.rows.header, classes=self.classes, with_probs=self.with_probs
            )

    def render(self, probs: np.ndarray, fallback: np.ndarray) -> str:
        """The file's text. ``probs`` [len(rows.files), C] float: each file's probabilities (class order of
        ``classes``); ``fallback`` [C] float: the rows without an image."""
        p = (
            np.stack([probs[s] if s is not None else fallback for s in self.rows.source])
            if self.rows.ids
            else np.zeros((0, len(self.classes)))
        )
        labels = [self.classes[i] for i in p.argmax(axis=1)] if len(p) else []
        if self.columns is None:
            return self._json(labels, p)
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.columns.header)
        for rid, lab, row in zip(self.rows.ids, labels, p, strict=True):
            cells = (lab if k == LABEL else "0" if k == ZERO else _num(row[k]) for k in self.columns.cells)
            writer.writerow([rid, *cells])
        return buf.getvalue()

    def _json(self, labels: list[str], p: np.ndarray) -> str:
        data: dict[str, Any]
        if self.with_probs:
            data = {
                i: {
                    "label": lab,
                    "probs": {c: float(_num(v)) for c, v in zip(self.classes, row, strict=True)},
                }
                for i, lab, row in zip(self.rows.ids, labels, p, strict=True)
            }
        else:
            data = dict(zip(self.rows.ids, labels, strict=True))
        return json.dumps(data, ensure_ascii=False, indent=1) + "\n"

    def write(self, probs: np.ndarray, fallback: np.ndarray) -> None:
        """Render (as render()) and replace ``out`` atomically."""
        text = self.render(probs, fallback)
        with self.lock:
            atomic_write(self.out, text)
