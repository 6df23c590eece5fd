"""Duplicate search over image files: exact copies, re-saved copies and look-alikes, below N² time.

Each image is reduced to its :class:`Hashes` (a digest of its decoded pixels, a 64-bit perceptual hash and a
small colour thumbnail). Pairs of images whose perceptual hashes are within a few bits are candidates
(:func:`candidate_pairs`: once per distinct hash value, by multi-index hashing in :func:`near_pairs`, whose
reference is the exhaustive :func:`exhaustive_pairs`); a candidate is confirmed when the two thumbnails
correlate (:func:`thumb_correlation`); confirmed pairs are joined into groups, the connected components of
the pair graph (:func:`component_roots`, :func:`components`, :func:`group_ids`). :func:`find_duplicates`
does all of it.

A library: every setting is an explicit keyword argument (folds.py passes its config's values), and every
function accepts zero images.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import cv2
import imagehash
import numpy as np
from PIL import Image
from scipy.sparse import coo_array
from scipy.sparse.csgraph import connected_components

from lib.common import progress
from lib.images import BadImage, decode

THUMB = 16  # side of the colour thumbnail that confirms a perceptual-hash match
PAIR_BLOCK = 512  # hashes per side of one tile of the pairwise search (2 MiB: fits in cache; fastest here)
PAIR_CHUNK = 16384  # candidate pairs whose thumbnails are compared at once (~200 MB of float32 at most)
BAND_RUN = 1024  # hashes sharing one band value above which their pairs are compared by tiles, not listed
SWEPT_COST = 8  # one pair compared in a band's run costs about this many tile comparisons (6-13 measured here)


class Hashes(NamedTuple):
    """What the duplicate search needs of one image."""

    digest: bytes  # 16-byte blake2b of the decoded pixels and their shape: equal only for exact copies
    phash: int  # 64-bit perceptual hash of the grayscale image: the candidate search
    thumb: np.ndarray  # THUMB x THUMB x 3 uint8 colour thumbnail, BGR order: confirms a candidate


def hash_image(path: str) -> Hashes | None:
    """The :class:`Hashes` of one image file, or None if it cannot be read or decoded.

    Decoded by :func:`lib.images.decode` like every reader, so its pixels are the ones training sees. The
    exact digest is over decoded pixels, not file bytes, so re-saved copies with other metadata match.
    """
    try:
        img = decode(Path(path).read_bytes())
    except (OSError, BadImage):
        return None
    digest = hashlib.blake2b(f"{img.shape}{img.dtype}".encode() + img.tobytes(), digest_size=16).digest()
    gray = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    bits = imagehash.phash(Image.fromarray(gray)).hash.ravel()
    colour = img if img.ndim == 3 else cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    # BGR, as when hashing decoded with OpenCV: the correlation's float sums depend on the element order, so
    # this keeps every thumb_correlation, hence every duplicate group and folds.csv, bit for bit the same.
    thumb = cv2.cvtColor(cv2.resize(colour, (THUMB, THUMB), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2BGR)
    return Hashes(digest, int(np.packbits(bits).view(">u8")[0]), thumb)


def hash_images(paths: Sequence[str], workers: int = 1) -> list[Hashes | None]:
    """:func:`hash_image` over many files, in ``workers`` processes (inline for one); in ``paths`` order."""
    if workers == 1 or len(paths) < 2:
        return list(progress(map(hash_image, paths), total=len(paths), desc="hashing"))
    chunk = max(1, min(256, len(paths) // (workers * 8)))
    with ProcessPoolExecutor(workers) as pool:
        return list(progress(pool.map(hash_image, paths, chunksize=chunk), total=len(paths), desc="hashing"))


def thumb_correlation(thumbs: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Pearson correlation of the thumbnails of each pair (i[k], j[k]): float32 [K] in [-1, 1].

    ``thumbs``: uint8 [N, THUMB, THUMB, 3]; ``i``, ``j``: int [K] indices into it (N and K may be 0).
    Brightness and contrast changes of a re-saved copy leave it near 1; two different pictures whose
    grayscale perceptual hashes collide (flat backgrounds, objects that differ only in colour) fall far
    below. Two flat thumbnails correlate 1 when their colours agree within 8 levels, else 0.
    Memory grows with PAIR_CHUNK, not N: each chunk converts only the thumbnails its pairs use (row by row
    as a conversion of all N would, so the values are the same bit for bit).
    """
    width = int(np.prod(thumbs.shape[1:]))
    out = np.empty(len(i), np.float32)
    for a in range(0, len(i), PAIR_CHUNK):
        ii, jj = i[a : a + PAIR_CHUNK], j[a : a + PAIR_CHUNK]
        rows, inverse = np.unique(np.concatenate([ii, jj]), return_inverse=True)
        u, v = inverse[: len(ii)], inverse[len(ii) :]
        unit = thumbs[rows].reshape(len(rows), width).astype(np.float32)
        unit -= unit.mean(axis=1, keepdims=True)
        norm = np.linalg.norm(unit, axis=1)
        unit /= np.maximum(norm, 1e-6)[:, None]
        is_flat = norm < np.sqrt(width)  # under one level of spread per pixel
        corr = np.einsum("kd,kd->k", unit[u], unit[v])
        flat = np.flatnonzero(is_flat[u] & is_flat[v])
        diff = np.abs(thumbs[ii[flat]].astype(np.int16) - thumbs[jj[flat]]).reshape(len(flat), width)
        corr[flat] = diff.max(axis=1, initial=0) <= 8
        out[a : a + len(ii)] = corr
    return out


def candidate_pairs(phashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image pairs (i < j) whose perceptual hashes are at most ``max_distance`` bits apart, with the
    distance: three int64 [K] arrays i, j, bits (K may be 0).

    ``phashes``: uint64 [N]. Every pair within a hash value's images, and across the images of near hash
    values (searched once per distinct value by :func:`near_pairs`, so a data set full of copies, or of flat
    images sharing one hash, costs the search no more than its distinct pictures).
    """
    unique, inverse = np.unique(phashes, return_inverse=True)
    order = np.argsort(inverse, kind="stable")  # images by hash value, ascending index within a value
    sizes = np.bincount(inverse, minlength=len(unique))
    starts = np.cumsum(sizes) - sizes
    multi = sizes > 1
    p, q = _pairs_within(starts[multi], sizes[multi])
    same_i, same_j = order[p], order[q]  # i < j: a value's images are in ascending order
    ui, uj = near_pairs(unique, max_distance)
    p, q = _pairs_across(starts[ui], sizes[ui], starts[uj], sizes[uj])
    near_i, near_j = np.minimum(order[p], order[q]), np.maximum(order[p], order[q])
    bits = np.repeat(np.bitwise_count(unique[ui] ^ unique[uj]).astype(np.int64), sizes[ui] * sizes[uj])
    return (
        np.concatenate([same_i, near_i]),
        np.concatenate([same_j, near_j]),
        np.concatenate([np.zeros(len(same_i), np.int64), bits]),
    )


def _pairs_within(starts: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every position pair p < q inside each run [starts[r], starts[r] + sizes[r]): two int64 arrays of
    sum(s (s - 1) / 2), run by run, p then q ascending (the order of np.triu_indices)."""
    starts, sizes = starts.astype(np.int64), sizes.astype(np.int64)
    first = np.repeat(starts, sizes)
    pos = first + np.arange(len(first)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    later = first + np.repeat(sizes, sizes) - pos - 1  # partners after each position in its run
    p = np.repeat(pos, later)
    return p, p + 1 + np.arange(len(p)) - np.repeat(np.cumsum(later) - later, later)


def _pairs_across(
    starts_a: np.ndarray, sizes_a: np.ndarray, starts_b: np.ndarray, sizes_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Every position pair (p in run a[k], q in run b[k]) for each k: two int64 arrays of
    sum(sizes_a * sizes_b), k by k, p-major."""
    counts = (sizes_a * sizes_b).astype(np.int64)
    k = np.repeat(np.arange(len(counts)), counts)
    local = np.arange(len(k)) - np.repeat(np.cumsum(counts) - counts, counts)
    return starts_a[k] + local // sizes_b[k], starts_b[k] + local % sizes_b[k]


def _bands(max_distance: int) -> list[tuple[int, int]]:
    """(shift, mask) of the max_distance + 1 bands cutting the 64 bits into nearly equal widths (at most 64)."""
    count = max_distance + 1
    widths = [64 // count + (k < 64 % count) for k in range(count)]
    shifts = np.cumsum([0, *widths[:-1]]).tolist()
    return [(s, (1 << w) - 1) for s, w in zip(shifts, widths, strict=True)]


def _runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and length (int64) of each run of equal neighbours longer than one in sorted ``values``."""
    starts = np.flatnonzero(np.concatenate([[True], values[1:] != values[:-1]]))
    sizes = np.diff(np.append(starts, len(values)))
    return starts[sizes > 1], sizes[sizes > 1]


def _first_band(xor: np.ndarray, earlier: list[tuple[int, int]], max_distance: int) -> np.ndarray:
    """Mask of the pairs (their hashes' XOR, uint64 [K]) within ``max_distance`` bits that agree on none of
    the ``earlier`` bands: a pair is kept only by the first band it agrees on, so none is reported twice."""
    keep = np.bitwise_count(xor) <= max_distance
    for shift, mask in earlier:
        keep &= ((xor >> shift) & mask) != 0
    return keep


def _band_pairs(
    ranked: np.ndarray, starts: np.ndarray, sizes: np.ndarray, earlier: list[tuple[int, int]], max_distance: int
) -> tuple[np.ndarray, np.ndarray]:
    """Position pairs (p < q) inside the runs [starts, starts + sizes) of ``ranked`` (uint64 hashes sorted by
    one band) within ``max_distance`` bits and first agreeing on this band: two int64 arrays.

    Swept by offset: step k compares every position with the one k places on while both are in its run,
    so each pair costs a few vectorised operations on neighbouring memory and no pair list is built.
    """
    end = np.repeat(starts + sizes, sizes)
    active = np.repeat(starts, sizes) + np.arange(len(end)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    found_p, found_q = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for step in itertools.count(1):
        alive = active + step < end
        active, end = active[alive], end[alive]
        if not len(active):
            break
        hit = active[_first_band(ranked[active] ^ ranked[active + step], earlier, max_distance)]
        found_p.append(hit)
        found_q.append(hit + step)
    return np.concatenate(found_p), np.concatenate(found_q)


def near_pairs(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) of uint64 hashes [N] at most ``max_distance`` bits apart: two int64 [K] arrays,
    sorted by i then j; exactly the pairs :func:`exhaustive_pairs` finds.

    Multi-index hashing (Norouzi, Punjani & Fleet, "Fast Search in Hamming Space with Multi-Index Hashing",
    CVPR 2012): the 64 bits are cut into max_distance + 1 bands, and two hashes within max_distance bits
    agree exactly on at least one band (pigeonhole). Each band's values are sorted; only hashes sharing a
    band value are compared (XOR + popcount), a pair being kept by the first band it agrees on. A band
    value shared by more than BAND_RUN hashes (clustered or near-flat images) is searched by tiles like the
    exhaustive search. On spread hashes that is about (d + 1) N²/2 / 2^(64 / (d + 1)) comparisons instead
    of N²/2 (d = 2, 200k hashes: 24k instead of 2e10; 0.15 s instead of 50 s here); when the bands are too
    narrow for that to pay (large d), or the hashes too clustered, the exhaustive search runs instead.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    n = len(hashes)
    if max_distance >= 64:  # every pair: no band can be shared
        return exhaustive_pairs(hashes, max_distance)
    bands = _bands(max_distance)
    orders = [np.argsort((hashes >> s) & m, kind="stable") for s, m in bands]
    runs = [_runs(((hashes >> s) & m)[o]) for (s, m), o in zip(bands, orders, strict=True)]
    listed = sum(int((z * (z - 1) // 2)[z <= BAND_RUN].sum()) for _, z in runs)
    tiled = sum(int((z * z // 2)[z > BAND_RUN].sum()) for _, z in runs)
    if listed * SWEPT_COST + tiled > n * (n - 1) // 2:
        return exhaustive_pairs(hashes, max_distance)
    found_i, found_j = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for b, (order, (starts, sizes)) in enumerate(zip(orders, runs, strict=True)):
        ranked, small = hashes[order], sizes <= BAND_RUN
        p, q = _band_pairs(ranked, starts[small], sizes[small], bands[:b], max_distance)
        found_i.append(order[p])  # order[p] < order[q]: the argsort is stable
        found_j.append(order[q])
        for start, size in zip(starts[~small].tolist(), sizes[~small].tolist(), strict=True):
            members = order[start : start + size]  # ascending: the argsort is stable
            a, c = _tile_pairs(hashes[members], max_distance, range(0, size, PAIR_BLOCK), PAIR_BLOCK)
            keep = _first_band(hashes[members[a]] ^ hashes[members[c]], bands[:b], max_distance)
            found_i.append(members[a[keep]])
            found_j.append(members[c[keep]])
    i, j = np.concatenate(found_i), np.concatenate(found_j)
    order = np.lexsort((j, i))
    return i[order], j[order]


def exhaustive_pairs(
    hashes: np.ndarray, max_distance: int, block: int = PAIR_BLOCK
) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) of uint64 hashes [N] at most ``max_distance`` bits apart: two int64 [K] arrays.

    Exhaustive, N²/2 comparisons whatever the threshold: :func:`near_pairs`'s reference, and its way out
    when bands cannot narrow the search.
    """
    starts = range(0, len(hashes), block)
    return _tile_pairs(hashes, max_distance, progress(starts, total=len(starts), desc="near duplicates"), block)


def _tile_pairs(
    hashes: np.ndarray, max_distance: int, starts: Iterable[int], block: int
) -> tuple[np.ndarray, np.ndarray]:
    """The exhaustive search for the tile rows beginning at ``starts`` (multiples of ``block``), vectorised:
    XOR + popcount over block x block tiles written into reused buffers, which keeps memory flat and the
    tiles in cache."""
    n = len(hashes)
    xor = np.empty((block, block), np.uint64)
    bits = np.empty((block, block), np.uint8)
    close = np.empty((block, block), bool)
    found_i, found_j = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for a in starts:
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


def component_roots(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """int64 [n]: for each of n items, the smallest item joined to it, transitively, by the pairs (i[k], j[k])
    (int arrays [K]): the connected components of that graph (scipy.sparse.csgraph), an item alone its own
    root."""
    if n == 0:
        return np.empty(0, np.int64)
    graph = coo_array((np.ones(len(i), np.int8), (i, j)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    _, smallest = np.unique(labels, return_index=True)  # first position of each component: its smallest
    return smallest[labels].astype(np.int64)


def components(roots: np.ndarray) -> list[np.ndarray]:
    """Positions (int64 arrays) of each set with more than one member, ordered by root, members ascending;
    ``roots`` is int64 [N] as :func:`component_roots` gives it."""
    if len(roots) == 0:
        return []
    multi = np.flatnonzero(np.bincount(roots)[roots] > 1)
    if not len(multi):
        return []
    order = multi[np.argsort(roots[multi], kind="stable")]
    return np.split(order, np.flatnonzero(np.diff(roots[order])) + 1)


def group_ids(*keys: Sequence[object]) -> np.ndarray:
    """Group id (int64 [N]) of N items joined, transitively, whenever they share a key in any of the key
    lists (each of length N; a None key joins nothing); groups are numbered 0.. in order of first item."""
    n = len(keys[0]) if keys else 0
    items = np.arange(n)
    first_i, first_j = [], []
    for key in keys:
        seen: dict[object, int] = {}
        first_i.append(items)
        first = [i if k is None else seen.setdefault(k, i) for i, k in enumerate(key)]
        first_j.append(np.array(first, np.int64))
    pairs = (np.concatenate(first_i), np.concatenate(first_j)) if keys else (items, items)
    _, ids = np.unique(component_roots(n, *pairs), return_inverse=True)
    return ids.astype(np.int64)


@dataclass(frozen=True)
class Duplicates:
    """Duplicate groups of N images, as component roots (int64 [N]: the smallest member of each image's
    group, an image alone its own root; :func:`component_roots`)."""

    copies: np.ndarray  # joined when within conflict_distance bits and confirmed: the same picture
    lookalikes: np.ndarray  # joined when within phash_distance bits and confirmed: possibly the same scene
    rejected: int  # candidate pairs whose thumbnails correlate below duplicate_correlation


def find_duplicates(
    hashes: Sequence[Hashes], *, phash_distance: int, conflict_distance: int, duplicate_correlation: float
) -> Duplicates:
    """Group images whose perceptual hashes are within ``phash_distance`` bits and whose thumbnails
    correlate at least ``duplicate_correlation`` (hashes of different pictures collide on flat backgrounds
    or when only colour differs); within ``conflict_distance`` bits (at most phash_distance) such a pair
    is also a copy. Two radii because copies with other labels are label noise, while look-alikes with
    other labels are legitimate but must not be split across folds."""
    phashes = np.array([h.phash for h in hashes], dtype=np.uint64)
    thumbs = np.stack([h.thumb for h in hashes]) if hashes else np.empty((0, THUMB, THUMB, 3), np.uint8)
    cand_i, cand_j, distance = candidate_pairs(phashes, phash_distance)
    confirmed = thumb_correlation(thumbs, cand_i, cand_j) >= duplicate_correlation
    i, j, bits = cand_i[confirmed], cand_j[confirmed], distance[confirmed]
    copy = bits <= conflict_distance
    return Duplicates(
        component_roots(len(hashes), i[copy], j[copy]),
        component_roots(len(hashes), i, j),
        int((~confirmed).sum()),
    )
