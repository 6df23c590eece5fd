"""Clean the training list and split it into stratified, group-aware cross-validation folds.

Reads ``train.csv`` and the resized copies made by ``src/resize.py``; writes ``folds.csv`` (the kept rows with
their leakage group and fold) and ``clean_report.csv`` beside it (one row per train.csv row saying what was
done to it and why). Cleaning drops images resize could not read, images too small to learn from, and every
member of a duplicate group whose labels disagree; consistent duplicates (identical pixels, or 64-bit
perceptual hashes within ``--phash-distance`` bits) share a group with the user's own ``group`` column, so no
group is ever split across folds and validation never scores an image the model trained on.
"""

from __future__ import annotations

import hashlib
import re
import sys
import warnings
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

import cv2
import imagehash
import numpy as np
import pandas as pd
from PIL import Image
from sklearn.model_selection import StratifiedGroupKFold

from lib.common import atomic_path, get_logger, num_workers, progress
from lib.config import Config, parse_config, save_config
from lib.images import match_ids

log = get_logger("folds")

FOLD_COLUMNS = ["image", "label", "group", "fold"]
REPORT_COLUMNS = ["image", "label", "action", "reason", "group", "detail"]
EXAMPLES = 5  # offending rows quoted per problem: enough to find the pattern, short enough to read
PAIR_BLOCK = 512  # hashes per side of one tile of the pairwise search (2 MiB: fits in cache; fastest here)
SUMMARY_CLASSES = 20  # classes shown in the per-fold count table; the rest are summarised in one line
THUMB = 16  # side of the colour thumbnail that confirms a perceptual-hash match
PAIR_CHUNK = 65536  # candidate pairs whose thumbnails are compared at once (2 x 200 MB of float32 at most)
_GRAY = {3: cv2.COLOR_BGR2GRAY, 4: cv2.COLOR_BGRA2GRAY}


class DataError(ValueError):
    """The training data cannot be folded; the message lists every problem found and how to fix it."""


def read_csv_strings(path: Path) -> pd.DataFrame:
    """Read a CSV with every cell a string, so labels like "1", "NA" or "None" stay class names.

    Rows with more fields than the header are an error rather than silently becoming an index.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.ParserWarning)
        return pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False)


def read_folds(path: Path) -> pd.DataFrame:
    """Read a folds.csv written by this stage: labels as strings, ``group`` and ``fold`` as integers."""
    df = read_csv_strings(path)
    return df.astype({"group": int, "fold": int})


def clean_report_path(cfg: Config) -> Path:
    """The clean report lives beside folds.csv so both travel together."""
    return Path(cfg.folds_csv).parent / "clean_report.csv"


# ---------------------------------------------------------------------------------------------------------
# Validation: collect every problem, then fail once with all of them.


def _lines(rows: pd.DataFrame, column: str = "image") -> str:
    """'line 3 'a.png', line 9 'b.png', ...' for the first few rows (line 1 is the header)."""
    head = rows.head(EXAMPLES)
    shown = [f"line {i + 2} {v!r}" for i, v in zip(head.index, head[column], strict=True)]
    more = f", ... ({len(rows) - EXAMPLES} more)" if len(rows) > EXAMPLES else ""
    return ", ".join(shown) + more


def _unsafe(image: str) -> bool:
    """Absolute paths, drive letters and '..' would read outside the images folder."""
    posix = image.replace("\\", "/")
    return posix.startswith("/") or re.match(r"^[A-Za-z]:", posix) is not None or ".." in posix.split("/")


def _read_train(cfg: Config, problems: list[str]) -> pd.DataFrame | None:
    """train.csv with its image, label and group columns renamed to the names every later stage uses."""
    path = Path(cfg.train_csv)
    header = f"{cfg.image_column},{cfg.label_column}"
    if not path.is_file():
        problems.append(
            f"{path} not found: write the training list there (header {header}[,{cfg.group_column}]) "
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
    named = [cfg.image_column, cfg.label_column] + [cfg.group_column] * (cfg.group_column != "group")
    missing = [c for c in named if c not in df.columns]
    if missing:
        problems.append(
            f"{path} lacks column(s) {', '.join(missing)} (its columns: {', '.join(df.columns)}): set "
            "image_column, label_column, group_column (--image-column, ...) to the header's names"
        )
        return None
    names = {cfg.image_column: "image", cfg.label_column: "label", cfg.group_column: "group"}
    names = {src: dst for src, dst in names.items() if src in df.columns and src != dst}
    # A column already called image/label/group that is not the chosen one is carried through renamed.
    clash = {c: f"{c}_original" for c in names.values() if c in df.columns and c not in names}
    return df.rename(columns=clash).rename(columns=names)


def resolve_ids(ids: pd.Series, files: Sequence[str]) -> tuple[pd.Series, int]:
    """Image ids written as Kaggle lists often do (``Train_0`` for ``train/Train_0.jpg``) replaced by the one
    file they name (images.match_ids); returns the ids and how many changed. An id naming no file, or
    several, is left for the missing-file check to report."""
    found = match_ids(ids.tolist(), list(files))
    resolved = pd.Series(
        [files[k] if k is not None else i for i, k in zip(ids, found, strict=True)], index=ids.index
    )
    return resolved, int((resolved != ids).sum())


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
    """_index.csv and _bad.csv of the resized folder (a missing _bad.csv means nothing was bad)."""
    folder = cfg.resized_images
    fix = f"run python src/resize.py (with the same --config / --train-images / --resize) to make {folder}"
    if not folder.is_dir():
        problems.append(f"resized images folder {folder} not found: {fix}")
        return None
    index_path, bad_path = folder / "_index.csv", folder / "_bad.csv"
    if not index_path.is_file():
        problems.append(f"{index_path} not found (resize did not finish): {fix}")
        return None
    try:
        index = read_csv_strings(index_path)
        bad = read_csv_strings(bad_path) if bad_path.is_file() else pd.DataFrame(columns=["image", "reason"])
    except (ValueError, OSError, pd.errors.ParserWarning) as e:
        problems.append(f"unreadable resize output in {folder} ({e}): {fix}")
        return None
    needed = {index_path: ["image", "file", "width", "height"], bad_path: ["image", "reason"]}
    for path, frame in ((index_path, index), (bad_path, bad)):
        missing = [c for c in needed[path] if c not in frame.columns]
        if missing:
            problems.append(f"{path} lacks column(s) {', '.join(missing)}: {fix}")
            return None
    size = index[["width", "height"]].apply(pd.to_numeric, errors="coerce")
    if size.isna().any().any():
        problems.append(f"{index_path} has non-numeric width/height: {fix}")
        return None
    index[["width", "height"]] = size.astype(int)
    index = index.drop_duplicates("image", keep="last").set_index("image")
    return index, bad.drop_duplicates("image", keep="last").set_index("image")


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
    in_index = present["image"].isin(index.index)
    copy_ok = in_index.copy()
    copy_ok[in_index] = [
        (cfg.resized_images / f).is_file() for f in index.loc[present.loc[in_index, "image"], "file"]
    ]
    todo = ~copy_ok & ~present["image"].isin(bad.index)
    if todo.any():
        problems.append(
            f"{todo.sum()} image(s) not resized yet or whose resized copy is gone ({_lines(present[todo])}): "
            "run python src/resize.py first"
        )


def load_inputs(cfg: Config) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """train.csv, the resize index and the bad list, or a DataError listing every problem at once."""
    problems: list[str] = []
    df = _read_train(cfg, problems)
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
# Hashing and duplicate search.


class Hashes(NamedTuple):
    """What folds.py needs of one image to find its duplicates."""

    digest: bytes  # of the decoded pixels and shape: equal only for exact copies
    phash: int  # 64-bit perceptual hash of the grayscale image: the candidate search
    thumb: np.ndarray  # THUMB x THUMB x 3 uint8 colour thumbnail: confirms a candidate


def hash_image(path: str) -> Hashes | None:
    """The :class:`Hashes` of one image, or None if it cannot be read.

    The exact digest is over decoded pixels, not file bytes, so re-saved copies with other metadata match.
    """
    try:
        img = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
    except (OSError, cv2.error):
        return None
    if img is None:
        return None
    digest = hashlib.blake2b(f"{img.shape}{img.dtype}".encode() + img.tobytes(), digest_size=16).digest()
    gray = img if img.ndim == 2 else cv2.cvtColor(img, _GRAY[img.shape[2]])
    bits = imagehash.phash(Image.fromarray(gray)).hash.ravel()
    colour = img if img.ndim == 3 else cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if colour.shape[2] == 4:
        colour = cv2.cvtColor(colour, cv2.COLOR_BGRA2BGR)
    thumb = cv2.resize(colour, (THUMB, THUMB), interpolation=cv2.INTER_AREA)
    return Hashes(digest, int(np.packbits(bits).view(">u8")[0]), thumb)


def hash_images(paths: Sequence[str], workers: int) -> list[Hashes | None]:
    """:func:`hash_image` over many files, in ``workers`` processes (inline for one)."""
    if workers == 1 or len(paths) < 2:
        return list(progress(map(hash_image, paths), total=len(paths), desc="hashing"))
    chunk = max(1, min(256, len(paths) // (workers * 8)))
    with ProcessPoolExecutor(workers) as pool:
        return list(progress(pool.map(hash_image, paths, chunksize=chunk), total=len(paths), desc="hashing"))


def thumb_correlation(thumbs: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Pearson correlation of the colour thumbnails of each pair (i[k], j[k]), in [-1, 1].

    Brightness and contrast changes of a re-saved copy leave it near 1; two different pictures whose
    grayscale perceptual hashes collide (flat backgrounds, objects that differ only in colour) fall far
    below. Two flat thumbnails correlate 1 when their colours agree within 8 levels, else 0.
    """
    flat = thumbs.reshape(len(thumbs), -1).astype(np.float32)
    mean = flat.mean(axis=1, keepdims=True)
    centred = flat - mean
    norm = np.linalg.norm(centred, axis=1)
    unit = centred / np.maximum(norm, 1e-6)[:, None]
    is_flat = norm < np.sqrt(flat.shape[1])  # under one level of spread per pixel
    out = np.empty(len(i), np.float32)
    for a in range(0, len(i), PAIR_CHUNK):
        ii, jj = i[a : a + PAIR_CHUNK], j[a : a + PAIR_CHUNK]
        corr = np.einsum("kd,kd->k", unit[ii], unit[jj])
        both_flat = is_flat[ii] & is_flat[jj]
        same = np.abs(flat[ii] - flat[jj]).max(axis=1) <= 8
        out[a : a + PAIR_CHUNK] = np.where(both_flat, same.astype(np.float32), corr)
    return out


def candidate_pairs(phashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image pairs (i < j) whose perceptual hashes are at most ``max_distance`` bits apart, with the
    distance: every pair within a hash value's images, and across the images of near hash values (searched
    once per distinct value)."""
    unique, inverse = np.unique(phashes, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    members = np.split(order, np.flatnonzero(np.diff(inverse[order])) + 1)
    ui, uj = near_pairs(unique, max_distance)
    pairs_i, pairs_j, dist = [np.empty(0, np.int64)], [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for m in members:
        if len(m) > 1:
            a, b = np.triu_indices(len(m), 1)
            pairs_i.append(m[a])
            pairs_j.append(m[b])
            dist.append(np.zeros(len(a), np.int64))
    for u, v, d in zip(ui.tolist(), uj.tolist(), np.bitwise_count(unique[ui] ^ unique[uj]).tolist(), strict=True):
        a, b = np.meshgrid(members[u], members[v], indexing="ij")
        pairs_i.append(np.minimum(a, b).ravel())
        pairs_j.append(np.maximum(a, b).ravel())
        dist.append(np.full(a.size, d, np.int64))
    return np.concatenate(pairs_i), np.concatenate(pairs_j), np.concatenate(dist)


def near_pairs(
    hashes: np.ndarray, max_distance: int, block: int = PAIR_BLOCK
) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) of uint64 hashes at most ``max_distance`` bits apart.

    Exhaustive, so no pair is missed whatever the threshold, but vectorised: XOR + popcount over
    block×block tiles written into reused buffers, which keeps memory flat and the tiles in cache.
    """
    n = len(hashes)
    xor = np.empty((block, block), np.uint64)
    bits = np.empty((block, block), np.uint8)
    close = np.empty((block, block), bool)
    found_i, found_j = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    starts = range(0, n, block)
    for a in progress(starts, total=len(starts), desc="near duplicates"):
        rows = hashes[a : a + block, None]
        for b in range(a, n, block):
            cols = hashes[None, b : b + block]
            tile = (slice(0, rows.shape[0]), slice(0, cols.shape[1]))
            np.bitwise_xor(rows, cols, out=xor[tile])
            np.bitwise_count(xor[tile], out=bits[tile])
            np.less_equal(bits[tile], max_distance, out=close[tile])
            if close[tile].any():
                i, j = np.nonzero(np.triu(close[tile], 1) if a == b else close[tile])
                found_i.append(i + a)
                found_j.append(j + b)
    return np.concatenate(found_i), np.concatenate(found_j)


class UnionFind:
    """Disjoint sets over 0..n-1, with path halving."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def union_keys(self, keys: Sequence[object]) -> None:
        """Join every position sharing a key with the first position that had it; None joins nothing."""
        first: dict[object, int] = {}
        for i, k in enumerate(keys):
            if k is not None:
                self.union(first.setdefault(k, i), i)

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


def _components(roots: np.ndarray) -> list[np.ndarray]:
    """Positions of each set with more than one member, in first-appearance order within a set."""
    multi = np.flatnonzero(np.bincount(roots)[roots] > 1)
    if not len(multi):
        return []
    order = multi[np.argsort(roots[multi], kind="stable")]
    return np.split(order, np.flatnonzero(np.diff(roots[order])) + 1)


def _members(images: Sequence[str], limit: int = 10) -> str:
    more = f", ... (+{len(images) - limit} more)" if len(images) > limit else ""
    return ", ".join(images[:limit]) + more


# ---------------------------------------------------------------------------------------------------------
# Cleaning and folds.


def clean(df: pd.DataFrame, index: pd.DataFrame, bad: pd.DataFrame, cfg: Config) -> pd.DataFrame:
    """The clean report: one row per train.csv row, kept or dropped with the reason, and its group id."""
    report = df[["image", "label"]].assign(action="kept", reason="", group="", detail="")

    def drop(rows: pd.Index, reason: str, detail: np.ndarray | list[str]) -> None:
        if len(rows):
            report.loc[rows, ["action", "reason"]] = ["dropped", reason]
            report.loc[rows, "detail"] = detail

    # _bad.csv wins over _index.csv: an image resize once found unusable is not trusted.
    unreadable = df["image"].isin(bad.index)
    drop(df.index[unreadable], "unreadable", bad["reason"].reindex(df.loc[unreadable, "image"]).to_numpy())

    size = index.reindex(df["image"])[["width", "height"]].set_axis(df.index)
    tiny = ~unreadable & (size.min(axis=1) < cfg.min_side)
    drop(df.index[tiny], "too small", [f"{w:.0f}x{h:.0f}" for w, h in size.loc[tiny].to_numpy()])

    todo = df.index[report["action"] == "kept"]
    files = [str(cfg.resized_images / f) for f in index.loc[df.loc[todo, "image"], "file"]]
    hashes = hash_images(files, num_workers(cfg.workers))
    lost = np.array([h is None for h in hashes], dtype=bool)
    drop(todo[lost], "unreadable", [f"resized copy {f} cannot be decoded" for f in np.array(files)[lost]])
    todo = todo[~lost]
    found_hashes = [h for h in hashes if h is not None]
    digests = [h.digest for h in found_hashes]
    phashes = np.array([h.phash for h in found_hashes], dtype=np.uint64)
    thumbs = np.stack([h.thumb for h in found_hashes]) if found_hashes else np.empty((0, THUMB, THUMB, 3))

    # Duplicate groups: image pairs whose perceptual hashes are within phash_distance bits are candidates,
    # confirmed when their colour thumbnails correlate at least duplicate_correlation (hashes of different
    # pictures collide on flat backgrounds or when only colour differs); the pixel digests tell exact
    # copies from near ones in the report. Two radii: within conflict_distance an image is a copy, so copies
    # with other labels are label noise and dropped; within phash_distance it is a look-alike, kept but
    # held in one fold against leakage.
    cand_i, cand_j, distance = candidate_pairs(phashes, cfg.phash_distance)
    corr = thumb_correlation(thumbs, cand_i, cand_j)
    confirmed = corr >= cfg.duplicate_correlation
    if (~confirmed).any():
        log.info(
            "%d image pair(s) with matching perceptual hashes are not duplicates: their colour thumbnails "
            "correlate below %.2f (duplicate_correlation)",
            int((~confirmed).sum()),
            cfg.duplicate_correlation,
        )
    copies, lookalikes = UnionFind(len(todo)), UnionFind(len(todo))
    for i, j, d in zip(
        cand_i[confirmed].tolist(), cand_j[confirmed].tolist(), distance[confirmed].tolist(), strict=True
    ):
        lookalikes.union(i, j)
        if d <= cfg.conflict_distance:
            copies.union(i, j)
    dup_root = lookalikes.roots()

    images = df.loc[todo, "image"].to_numpy()
    labels = df.loc[todo, "label"].to_numpy()
    keep = np.ones(len(todo), dtype=bool)
    reason = np.full(len(todo), "", dtype=object)
    detail = np.full(len(todo), "", dtype=object)
    found: Counter[str] = Counter()
    for members in _components(copies.roots()):
        label_counts = Counter(labels[members])
        if len(label_counts) > 1:
            keep[members] = False
            counts = ", ".join(f"{k!r}: {v}" for k, v in sorted(label_counts.items()))
            names = [f"{images[m]} ({labels[m]})" for m in members]
            reason[members] = "conflicting labels"
            detail[members] = f"labels {{{counts}}} in duplicates {_members(names)}"
            found["conflicting"] += 1
    for members in _components(dup_root):
        members = members[keep[members]]
        if len(members) < 2:
            continue
        exact = len({digests[m] for m in members}) == 1
        kind = "exact duplicate" if exact else "near duplicate"
        found[kind] += 1
        found["mixed labels"] += len(set(labels[members])) > 1
        for m in members:
            reason[m] = kind
            detail[m] = "duplicate of " + _members([images[o] for o in members if o != m])
    report.loc[todo, "reason"] = reason
    report.loc[todo, "detail"] = detail
    report.loc[todo[~keep], "action"] = "dropped"
    log.info(
        "duplicate groups: %d exact, %d near (phash within %d bits; %d of them look-alikes with several "
        "labels, kept in one fold), %d copies (within %d bits) with conflicting labels (dropped)",
        found["exact duplicate"],
        found["near duplicate"],
        cfg.phash_distance,
        found["mixed labels"],
        found["conflicting"],
        cfg.conflict_distance,
    )

    # Leakage groups: duplicate groups joined with the user's groups, among the rows still kept.
    kept = np.flatnonzero(keep)
    groups = UnionFind(len(kept))
    groups.union_keys(dup_root[kept].tolist())
    if "group" in df.columns:
        user = df.loc[todo[kept], "group"].to_numpy()
        groups.union_keys([g if g.strip() else None for g in user])
    _, group_id = np.unique(groups.roots(), return_inverse=True)
    report.loc[todo[kept], "group"] = group_id.astype(str)
    return report


def assign_folds(rows: pd.DataFrame, cfg: Config) -> np.ndarray:
    """StratifiedGroupKFold fold of each row: classes spread evenly, groups never split."""
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
            len(rare),
            cfg.n_folds,
            listed,
        )
    splitter = StratifiedGroupKFold(n_splits=cfg.n_folds, shuffle=True, random_state=cfg.seed)
    fold = np.empty(len(rows), dtype=np.int64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for k, (_, val) in enumerate(splitter.split(np.zeros(len(rows)), rows["label"], rows["group"])):
            fold[val] = k
    return fold


def _summary(df: pd.DataFrame, report: pd.DataFrame, folds: pd.DataFrame) -> None:
    """Log what cleaning did and how classes spread over folds, so a bad split is seen before training."""
    dropped = report.loc[report["action"] == "dropped", "reason"].value_counts()
    log.info(
        "%d rows in, %d kept, %d dropped%s",
        len(df),
        len(folds),
        dropped.sum(),
        "".join(f"; {r}: {n}" for r, n in dropped.items()),
    )
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
    except DataError as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
