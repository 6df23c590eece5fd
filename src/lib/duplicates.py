"""Duplicate search over image files: exact copies, re-saved copies and look-alikes, below N² time.

Each image is reduced to its :class:`Hashes` (a digest of its decoded pixels, a 64-bit perceptual hash and a
small colour thumbnail). Pairs of images whose perceptual hashes are within a few bits are candidates
(:func:`candidate_pairs`, exhaustive but vectorised over distinct hash values); a candidate is confirmed when
the two thumbnails correlate (:func:`thumb_correlation`); confirmed pairs are joined into groups by
union-find (:class:`UnionFind`, :func:`components`, :func:`group_ids`). :func:`find_duplicates` does all of it.

A library: every setting is an explicit keyword argument (folds.py passes its config's values), and every
function accepts zero images.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import cv2
import imagehash
import numpy as np
from PIL import Image

from lib.common import progress
from lib.images import BadImage, decode

THUMB = 16  # side of the colour thumbnail that confirms a perceptual-hash match
PAIR_BLOCK = 512  # hashes per side of one tile of the pairwise search (2 MiB: fits in cache; fastest here)
PAIR_CHUNK = 65536  # candidate pairs whose thumbnails are compared at once (2 x 200 MB of float32 at most)


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
    """
    # An explicit width: reshape(0, -1) cannot infer it when there are no thumbnails.
    flat = thumbs.reshape(len(thumbs), int(np.prod(thumbs.shape[1:]))).astype(np.float32)
    centred = flat - flat.mean(axis=1, keepdims=True)
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
    distance: three int64 [K] arrays i, j, bits (K may be 0).

    ``phashes``: uint64 [N]. Every pair within a hash value's images, and across the images of near hash
    values (searched once per distinct value, so a data set full of copies costs no more than its distinct
    pictures).
    """
    empty = np.empty(0, np.int64)
    if len(phashes) == 0:
        return empty, empty.copy(), empty.copy()
    unique, inverse = np.unique(phashes, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    members = np.split(order, np.flatnonzero(np.diff(inverse[order])) + 1)
    ui, uj = near_pairs(unique, max_distance)
    pairs_i, pairs_j, dist = [empty], [empty], [empty]
    for m in members:
        if len(m) > 1:
            a, b = np.triu_indices(len(m), 1)
            pairs_i.append(m[a])
            pairs_j.append(m[b])
            dist.append(np.zeros(len(a), np.int64))
    for u, v, d in zip(
        ui.tolist(), uj.tolist(), np.bitwise_count(unique[ui] ^ unique[uj]).tolist(), strict=True
    ):
        a, b = np.meshgrid(members[u], members[v], indexing="ij")
        pairs_i.append(np.minimum(a, b).ravel())
        pairs_j.append(np.maximum(a, b).ravel())
        dist.append(np.full(a.size, d, np.int64))
    return np.concatenate(pairs_i), np.concatenate(pairs_j), np.concatenate(dist)


def near_pairs(
    hashes: np.ndarray, max_distance: int, block: int = PAIR_BLOCK
) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) of uint64 hashes [N] at most ``max_distance`` bits apart: two int64 [K] arrays.

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
    """Disjoint sets over 0..n-1, with path halving; a set's root is its smallest member."""

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
        """int64 [n]: the root of each position's set."""
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


def components(roots: np.ndarray) -> list[np.ndarray]:
    """Positions (int64 arrays) of each set with more than one member, ordered by root, members ascending;
    ``roots`` is int64 [N] as :meth:`UnionFind.roots` gives it."""
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
    groups = UnionFind(len(keys[0]) if keys else 0)
    for k in keys:
        groups.union_keys(k)
    _, ids = np.unique(groups.roots(), return_inverse=True)
    return ids.astype(np.int64)


@dataclass(frozen=True)
class Duplicates:
    """Duplicate groups of N images, as union-find roots (int64 [N]; an image alone is its own root)."""

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
    copies, lookalikes = UnionFind(len(hashes)), UnionFind(len(hashes))
    pairs = zip(
        cand_i[confirmed].tolist(), cand_j[confirmed].tolist(), distance[confirmed].tolist(), strict=True
    )
    for i, j, d in pairs:
        lookalikes.union(i, j)
        if d <= conflict_distance:
            copies.union(i, j)
    return Duplicates(copies.roots(), lookalikes.roots(), int((~confirmed).sum()))
