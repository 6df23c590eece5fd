"""lib/plan.py's scoring of candidate selections: exact on small sets, a fixed subsample on large ones."""

from __future__ import annotations

import numpy as np
import pytest

from lib.oof import TopK
from lib.plan import Member, quick_loss
from lib.preprocess import Preprocessing
from lib.stacker import Stacker

PRE = Preprocessing(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def members(n: int, c: int, seed: int = 0) -> tuple[dict[str, Member], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    folds = np.arange(n) % 3
    out = {}
    for j, name in enumerate(("a", "b")):
        logits = (2 + j) * np.eye(c)[y] + rng.normal(size=(n, c))
        out[name] = Member(name, [0, 1, 2], [], [str(i) for i in range(c)], {}, PRE, oof={"orig": logits})
    return out, y, folds


def test_quick_loss_above_max_rows_scores_the_same_fixed_subsample() -> None:
    ms, y, folds = members(600, 5)
    sel = {"a": ["orig"], "b": ["orig"]}
    blend = Stacker("blend", nthread=1)
    full = quick_loss(ms, sel, y, folds, blend, max_rows=10_000)
    small = quick_loss(ms, sel, y, folds, blend, max_rows=200)
    assert small == quick_loss(ms, sel, y, folds, blend, max_rows=200)  # the same rows every call
    rows = np.sort(np.random.default_rng(0).choice(600, size=200, replace=False))
    sub = {n: Member(n, m.folds, [], m.classes, {}, PRE, oof={"orig": m.oof["orig"][rows]}) for n, m in ms.items()}
    assert small == pytest.approx(quick_loss(sub, sel, y[rows], folds[rows], blend, max_rows=10_000))
    assert small != pytest.approx(full)


def test_a_top_k_member_is_subsampled_by_rows() -> None:
    ms, y, folds = members(400, 30)
    top = {n: Member(n, m.folds, [], m.classes, {}, PRE, oof={"orig": TopK.from_logits(m.oof["orig"], 5)})
           for n, m in ms.items()}  # fmt: skip
    loss = quick_loss(top, {"a": ["orig"]}, y, folds, Stacker("blend", nthread=1), max_rows=150)
    assert np.isfinite(loss) and 0 < loss < np.log(30)
