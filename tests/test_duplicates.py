"""lib/duplicates.py's search below N²: multi-index hashing finds exactly the exhaustive search's pairs, the
thumbnail check is unchanged bit for bit, and groups are the connected components of the pairs."""

from __future__ import annotations

import numpy as np
import pytest

from lib import duplicates
from lib.duplicates import (
    THUMB,
    candidate_pairs,
    component_roots,
    exhaustive_pairs,
    group_ids,
    near_pairs,
    thumb_correlation,
)


def planted(n: int, max_distance: int, seed: int) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """n random hashes; hash 2k + 1 is hash 2k with 0..max_distance + 1 bits flipped (cycling), for k < n/4.
    Returns the hashes and the planted (i, j, bits)."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64, size=n, dtype=np.uint64)
    pairs = []
    for k in range(n // 4):
        bits = k % (max_distance + 2)  # up to one beyond the radius: that pair must not be found
        flips = rng.choice(64, size=bits, replace=False)
        hashes[2 * k + 1] = hashes[2 * k] ^ np.uint64(sum(1 << int(b) for b in flips))
        pairs.append((2 * k, 2 * k + 1, bits))
    return hashes, pairs


def clustered(n: int, centres: int, seed: int) -> np.ndarray:
    """n hashes around a few centres, each 0-3 random bits away from its centre: long runs of equal band
    values."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64, size=centres, dtype=np.uint64)[rng.integers(0, centres, n)]
    for _ in range(3):
        bit = np.uint64(1) << rng.integers(0, 64, n).astype(np.uint64)
        hashes ^= np.where(rng.random(n) < 0.7, bit, np.uint64(0))
    return hashes


def as_set(pairs: tuple[np.ndarray, np.ndarray]) -> set[tuple[int, int]]:
    return set(zip(pairs[0].tolist(), pairs[1].tolist(), strict=True))


def brute_force(hashes: np.ndarray, max_distance: int) -> set[tuple[int, int]]:
    return {
        (i, j)
        for i in range(len(hashes))
        for j in range(i + 1, len(hashes))
        if int(hashes[i] ^ hashes[j]).bit_count() <= max_distance
    }


def no_exhaustive(*args, **kwargs):
    raise AssertionError("the exhaustive search ran")


@pytest.mark.parametrize("max_distance", [0, 1, 2, 3, 5])
def test_near_pairs_are_the_exhaustive_pairs_on_planted_neighbours(
    max_distance: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashes, pairs = planted(4000, max_distance, seed=max_distance)
    want = exhaustive_pairs(hashes, max_distance)
    monkeypatch.setattr(duplicates, "exhaustive_pairs", no_exhaustive)  # the banded search, not its fallback
    i, j = near_pairs(hashes, max_distance)
    assert as_set((i, j)) == as_set(want)
    assert len(i) == len(want[0])  # each pair once
    assert (i < j).all() and (np.lexsort((j, i)) == np.arange(len(i))).all()  # sorted by i, then j
    planted_near = {(a, b) for a, b, bits in pairs if bits <= max_distance}
    assert planted_near <= as_set((i, j)) and len(planted_near) >= 100
    assert not {(a, b) for a, b, bits in pairs if bits > max_distance} & as_set((i, j))


@pytest.mark.parametrize("band_run", [8, duplicates.BAND_RUN])
@pytest.mark.parametrize("max_distance", [1, 2, 4])
def test_near_pairs_are_the_exhaustive_pairs_on_clustered_hashes(
    band_run: int, max_distance: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs of one band value longer than BAND_RUN are searched by tiles (8: every cluster's runs)."""
    hashes = np.unique(clustered(3000, 30, seed=max_distance))  # distinct, as candidate_pairs passes them
    want = exhaustive_pairs(hashes, max_distance)
    monkeypatch.setattr(duplicates, "BAND_RUN", band_run)
    monkeypatch.setattr(duplicates, "exhaustive_pairs", no_exhaustive)
    i, j = near_pairs(hashes, max_distance)
    assert as_set((i, j)) == as_set(want) and len(i) == len(want[0]) > 1000


def test_near_pairs_falls_back_to_the_exhaustive_search_when_bands_are_too_narrow(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hashes, _ = planted(300, 20, seed=1)
    want = brute_force(hashes, 20)
    calls = []
    exhaustive = duplicates.exhaustive_pairs
    monkeypatch.setattr(duplicates, "exhaustive_pairs", lambda *a, **k: calls.append(1) or exhaustive(*a, **k))
    assert as_set(near_pairs(hashes, 20)) == want and len(want) > 50
    assert calls == [1]  # 21 bands of 3 bits: listing them would cost more than comparing everything


def test_exhaustive_pairs_match_brute_force() -> None:
    hashes, _ = planted(150, 6, seed=0)
    for distance in (0, 2, 6, 64):
        want = brute_force(hashes, distance)
        assert as_set(exhaustive_pairs(hashes, distance, block=16)) == want and len(want) >= 1
        assert as_set(near_pairs(hashes, distance)) == want


def test_candidate_pairs_cover_copies_and_neighbours_of_every_image() -> None:
    """Many images per hash value (copies, flat images) and near values: every image pair within the radius,
    once, with its distance."""
    rng = np.random.default_rng(3)
    values, _ = planted(60, 2, seed=3)
    phashes = values[rng.integers(0, len(values), 400)]  # ~7 images per value
    i, j, bits = candidate_pairs(phashes, 2)
    got = {(a, b): d for a, b, d in zip(i.tolist(), j.tolist(), bits.tolist(), strict=True)}
    want = {(a, b): int(phashes[a] ^ phashes[b]).bit_count() for a, b in brute_force(phashes, 2)}
    assert got == want and len(got) == len(i)
    assert sum(d == 0 for d in want.values()) > 500 and sum(d > 0 for d in want.values()) > 100


def reference_correlation(thumbs: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """The correlation as first written: every thumbnail normalised at once (the values folds.csv was made with)."""
    flat = thumbs.reshape(len(thumbs), -1).astype(np.float32)
    centred = flat - flat.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(centred, axis=1)
    unit = centred / np.maximum(norm, 1e-6)[:, None]
    is_flat = norm < np.sqrt(flat.shape[1])
    same = np.abs(flat[i] - flat[j]).max(axis=1) <= 8
    return np.where(is_flat[i] & is_flat[j], same.astype(np.float32), np.einsum("kd,kd->k", unit[i], unit[j]))


@pytest.mark.parametrize("chunk", [7, duplicates.PAIR_CHUNK])
def test_thumb_correlation_is_unchanged_bit_for_bit(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    thumbs = rng.integers(0, 256, (400, THUMB, THUMB, 3), dtype=np.uint8)
    thumbs[:40] = rng.integers(0, 250, (40, 1, 1, 1)) + rng.integers(0, 2, (40, THUMB, THUMB, 3))  # flat
    thumbs[20:40] = thumbs[:20]  # flat copies: correlate 1
    noise = rng.integers(-3, 4, (40, THUMB, THUMB, 3))
    thumbs[40:80] = np.clip(thumbs[80:120] + noise, 0, 255)  # re-saved copies: correlate nearly 1
    i = np.concatenate([rng.integers(0, 400, 3000), np.arange(40), np.arange(40, 80)])
    j = np.concatenate([rng.integers(0, 400, 3000), (np.arange(40) + 20) % 40, np.arange(80, 120)])
    monkeypatch.setattr(duplicates, "PAIR_CHUNK", chunk)
    got = thumb_correlation(thumbs, i, j)
    want = reference_correlation(thumbs, i, j)
    assert got.dtype == np.float32 and np.array_equal(got.view(np.int32), want.view(np.int32))
    assert (got[3000:3040] == 1).all() and (got[3040:] > 0.9).all() and (got[:3000] < 0.5).mean() > 0.9


def reference_roots(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Smallest member of each item's component, by propagating minima along the edges until stable."""
    roots = np.arange(n)
    while True:
        low = np.minimum(roots[i], roots[j])
        new = roots.copy()
        np.minimum.at(new, i, low)
        np.minimum.at(new, j, low)
        new = new[new]
        if np.array_equal(new, roots):
            return roots
        roots = new


def test_component_roots_are_the_smallest_member_of_each_component() -> None:
    rng = np.random.default_rng(2)
    i, j = rng.integers(0, 500, 300), rng.integers(0, 500, 300)
    roots = component_roots(500, i, j)
    assert roots.dtype == np.int64 and np.array_equal(roots, reference_roots(500, i, j))
    assert 1 < len(np.unique(roots)) < 500
    assert np.array_equal(component_roots(3, np.array([2]), np.array([1])), [0, 1, 1])


def test_group_ids_join_shared_keys_transitively_numbered_by_first_item() -> None:
    lookalike = [5, 5, 7, 8, 9, 9]
    user = [None, "a", "a", None, "b", None]  # None joins nothing
    assert group_ids(lookalike, user).tolist() == [0, 0, 0, 1, 2, 2]
    assert group_ids([None, None, 1, 1]).tolist() == [0, 1, 2, 2]
    assert group_ids(["x", "y", "x"]).tolist() == [0, 1, 0]
