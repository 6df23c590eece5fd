"""Stratified group K-fold splits: every class spread evenly over the folds, no group ever split.

:func:`split_folds` picks the splitter: scikit-learn's ``StratifiedGroupKFold`` for small problems (its
folds are the reference, and the demo's folds.csv is made by it), :func:`stratified_group_folds` above
``dense_limit`` groups x classes. scikit-learn's builds a dense groups x classes float64 matrix (20 GB for
550k images in 5,000 classes) and, per group, scores every fold over all classes in a Python loop; ours keeps
each group's (class, count) pairs sparse, so memory grows with images + groups + folds x classes and time
with the images and groups.

A library: plain arrays and keyword arguments in, fold ids out.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold


def split_folds(
    *, labels: np.ndarray, groups: np.ndarray, n_folds: int, seed: int, dense_limit: int
) -> np.ndarray:
    """Fold id (int64 [N], 0..n_folds-1) of each row; classes stratified, groups kept whole.

    ``labels``, ``groups``: [N] arrays of any hashable values (class names, group ids). scikit-learn's
    ``StratifiedGroupKFold(shuffle=True, random_state=seed)`` when groups x classes is at most
    ``dense_limit``, :func:`stratified_group_folds` above it.
    """
    cells = len(np.unique(groups)) * len(np.unique(labels))
    if cells <= dense_limit:
        return sklearn_folds(labels=labels, groups=groups, n_folds=n_folds, seed=seed)
    return stratified_group_folds(labels=labels, groups=groups, n_folds=n_folds, seed=seed)


def sklearn_folds(*, labels: np.ndarray, groups: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold id (int64 [N]) of each row by scikit-learn's ``StratifiedGroupKFold`` (shuffled, seeded): the
    reference, dense in groups x classes. Its warning about classes rarer than the folds is silenced: the
    caller reports those classes by name."""
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold = np.empty(len(labels), dtype=np.int64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for k, (_, val) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
            fold[val] = k
    return fold


def stratified_group_folds(*, labels: np.ndarray, groups: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold id (int64 [N], 0..n_folds-1) of each row: groups never split, each class's images spread over
    the folds as evenly as the groups allow, fold sizes balanced.

    ``labels``, ``groups``: [N] arrays of any hashable values. Greedy like scikit-learn's
    ``StratifiedGroupKFold`` (itself from the Kaggle kernel "Stratified Group k-Fold Cross-Validation",
    kaggle.com/jakubwasikowski/stratified-group-k-fold-cross-validation): groups are
    taken largest first (ties in a ``seed``-shuffled order), each into the fold that most lacks its classes
    (least sum over its classes c of n_gc x n_fc / n_c², the growth of the folds' per-class variance that
    scikit-learn's mean standard deviation tracks), ties to the smallest fold. Single-image groups come
    last and are placed a class at a time: the fewest-of-that-class folds are filled up to one level and
    the remainder goes to the smallest of them, exactly what placing them one by one would do.
    Memory: O(N + groups + n_folds x classes), never groups x classes.

    Raises:
        ValueError: n_folds below 2, or fewer groups than folds.
    """
    _, y = np.unique(np.asarray(labels), return_inverse=True)
    _, g = np.unique(np.asarray(groups), return_inverse=True)
    n_classes, n_groups = int(y.max(initial=-1)) + 1, int(g.max(initial=-1)) + 1
    if n_folds < 2 or n_groups < n_folds:
        raise ValueError(f"need n_folds >= 2 and at least n_folds groups, got {n_folds} and {n_groups}")
    # Each group's (class, count) pairs, sorted by group: a CSR matrix without the matrix.
    pair, pair_count = np.unique(g.astype(np.int64) * n_classes + y, return_counts=True)
    pair_group, pair_class = np.divmod(pair, n_classes)
    group_start = np.searchsorted(pair_group, np.arange(n_groups + 1))
    group_size = np.bincount(g, minlength=n_groups)
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(n_groups)
    order = shuffled[np.argsort(-group_size[shuffled], kind="stable")]

    state = _Folds(n_folds, np.bincount(y, minlength=n_classes))
    group_fold = np.empty(n_groups, np.int64)
    for grp in order[group_size[order] > 1].tolist():
        span = slice(group_start[grp], group_start[grp + 1])
        group_fold[grp] = state.place_group(pair_class[span], pair_count[span])
    singles = order[group_size[order] == 1]  # in shuffled order
    single_class = pair_class[group_start[singles]]
    by_class = np.argsort(single_class, kind="stable")
    class_start = np.searchsorted(single_class[by_class], np.arange(n_classes + 1))
    for c in rng.permutation(n_classes).tolist():
        members = singles[by_class[class_start[c] : class_start[c + 1]]]
        if len(members):
            group_fold[members] = state.place_singles(c, len(members))
    return group_fold[g]


class _Folds:
    """Per-fold class counts (dense n_folds x classes) and sizes, while groups are placed."""

    def __init__(self, n_folds: int, class_total: np.ndarray) -> None:
        self.counts = np.zeros((n_folds, len(class_total)), np.int64)
        self.size = np.zeros(n_folds, np.int64)
        self.inverse_square = 1.0 / np.maximum(class_total, 1).astype(np.float64) ** 2

    def place_group(self, classes: np.ndarray, counts: np.ndarray) -> int:
        """Put a group of ``counts`` images of ``classes`` into the fold that most lacks them; its index."""
        lack = self.counts[:, classes] @ (counts * self.inverse_square[classes])
        tied = np.flatnonzero(np.isclose(lack, lack.min(), rtol=1e-9, atol=0.0))
        fold = int(tied[np.argmin(self.size[tied])])
        self.counts[fold, classes] += counts
        self.size[fold] += counts.sum()
        return fold

    def place_singles(self, c: int, m: int) -> np.ndarray:
        """Spread ``m`` single images of class ``c``: the fold of each (int64 [m], ascending).

        Water-filling: the folds with the fewest images of c are raised to a common level L, the r images
        left over (fewer than the folds at L) go one each to the smallest of those folds.
        """
        have = self.counts[:, c]
        ranked = np.sort(have)
        # Images needed to raise the k emptiest folds to the k-th one's level, for k = 1..n_folds.
        need = ranked * np.arange(1, len(have) + 1) - np.cumsum(ranked)
        k = int(np.searchsorted(need, m, side="right"))  # folds taking part: need[k - 1] <= m
        level, spare = divmod(m + int(ranked[:k].sum()), k)
        add = np.where(have <= ranked[k - 1], np.maximum(level - have, 0), 0)
        at_level = np.flatnonzero((have + add == level) & (have <= ranked[k - 1]))
        smallest = at_level[np.argsort(self.size[at_level] + add[at_level], kind="stable")[:spare]]
        add[smallest] += 1
        self.counts[:, c] += add
        self.size += add
        return np.repeat(np.arange(len(have)), add)
