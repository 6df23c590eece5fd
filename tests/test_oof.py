"""lib/oof.py, the prediction store: dense float16 and top-k files round-trip, the size threshold picks the
format, large arrays are memory-mapped rather than read, files that do not match folds.csv are refused in
either format, and the computations on top-k rows (softmax, scores, mean over views) equal those on their
dense form. No images, no torch."""

from __future__ import annotations

import gc
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib import oof
from lib.config import Config
from lib.layout import Experiment, assemble_oof
from lib.metrics import index_scores, softmax
from lib.oof import OOFError, TopK

TOPK_STORE = {"dense_max_cells": 0, "topk": 4}  # every file top-4


def folds_table(n: int, n_folds: int = 3) -> pd.DataFrame:
    return pd.DataFrame({"image": [f"img {i}.png" for i in range(n)], "fold": np.arange(n) % n_folds})


def logits_of(n: int, c: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, (n, c)).astype(np.float32)


def names(c: int) -> list[str]:
    return [f"class {j}" for j in range(c)]


def rss_bytes() -> int:
    """This process's resident set (Linux /proc), file-backed pages of memory maps included."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


# ---------------------------------------------------------------------------------------------------------
# Format and round trips.


def test_dense_round_trip_is_float16_memory_mapped(tmp_path: Path) -> None:
    folds, x = folds_table(30), logits_of(30, 6)
    oof.write_oof(tmp_path / "oof.npz", folds, x, names(6))
    with zipfile.ZipFile(tmp_path / "oof.npz") as z:
        assert sorted(z.namelist()) == ["classes.npy", "fold.npy", "image.npy", "logits.npy"]
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_STORED}
    stored = oof.open_oof(tmp_path / "oof.npz")
    assert isinstance(stored.dense, np.memmap) and stored.dense.dtype == np.float16 and stored.topk is None
    np.testing.assert_array_equal(stored.take(slice(None)), x.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(stored.take(slice(None)), x, rtol=2**-11)  # float16's rounding, no more
    assert stored.classes == names(6) and stored.image.tolist() == folds["image"].tolist()
    assert oof.read_oof(tmp_path / "oof.npz")["logits"].dtype == np.float32  # read_oof hands back float32


def test_topk_round_trip_keeps_the_kept_classes_probabilities(tmp_path: Path) -> None:
    folds, x = folds_table(40), logits_of(40, 12)
    oof.write_oof(tmp_path / "oof.npz", folds, x, names(12), **TOPK_STORE)
    with zipfile.ZipFile(tmp_path / "oof.npz") as z:
        assert "logits.npy" not in z.namelist() and "logits_index.npy" in z.namelist()
    stored = oof.open_oof(tmp_path / "oof.npz")
    top = stored.topk
    assert stored.dense is None and isinstance(top.index, np.memmap) and isinstance(top.values, np.memmap)
    assert top.values.dtype == np.float16 and top.k == 4 and top.n_classes == 12
    want = TopK.from_logits(x, 4)
    np.testing.assert_array_equal(top.index, want.index)
    np.testing.assert_allclose(top.values, want.values, rtol=2**-11)
    np.testing.assert_allclose(top.rest, want.rest, rtol=1e-6)
    # Each row's softmax over all 12 classes gives the kept 4 their probabilities under the full logits
    # (the kept logits as stored, rounded to float16).
    rows = np.arange(40)[:, None]
    p = softmax(stored.take(slice(None)).dense())
    x16 = x.copy()
    x16[rows, want.index] = want.values.astype(np.float16)
    np.testing.assert_allclose(p[rows, want.index], softmax(x16)[rows, want.index], rtol=1e-5)
    np.testing.assert_allclose(p.sum(1), 1, rtol=1e-9)


@pytest.mark.parametrize(
    ("n", "c", "store", "topk"),
    [
        (10, 5, {"dense_max_cells": 50, "topk": 2}, False),  # exactly at the threshold: dense
        (11, 5, {"dense_max_cells": 50, "topk": 2}, True),  # one row more: top-k
        (11, 5, {"dense_max_cells": 50, "topk": 5}, False),  # k >= C: top-k would save nothing
        (11, 5, {}, False),  # the defaults keep small files dense
    ],
)
def test_the_threshold_switches_the_format(tmp_path: Path, n: int, c: int, store: dict, topk: bool) -> None:
    assert oof.uses_topk(n, c, **{"dense_max_cells": oof.DENSE_MAX_CELLS, "topk": oof.TOPK} | store) is topk
    oof.write_oof(tmp_path / "f.npz", folds_table(n), logits_of(n, c), names(c), **store)
    stored = oof.open_oof(tmp_path / "f.npz")
    assert (stored.topk is not None, stored.dense is None) == (topk, topk)


def test_config_defaults_are_the_stores() -> None:
    assert Config().store_options() == {"dense_max_cells": oof.DENSE_MAX_CELLS, "topk": oof.TOPK}


def test_values_beyond_float16_are_refused_at_writing(tmp_path: Path) -> None:
    x = logits_of(6, 3)
    x[2, 1] = 1e5
    with pytest.raises(OOFError, match=r"f.npz.*does not fit float16.*retrain"):
        oof.write_oof(tmp_path / "f.npz", folds_table(6), x, names(3))
    assert not (tmp_path / "f.npz").exists()


def test_a_compressed_file_is_still_read(tmp_path: Path) -> None:
    folds, x = folds_table(9), logits_of(9, 3)
    np.savez_compressed(
        tmp_path / "old.npz", logits=x, image=folds["image"].to_numpy(dtype=str),
        fold=folds["fold"].to_numpy(np.int16), classes=np.array(names(3)),
    )  # fmt: skip
    stored = oof.open_oof(tmp_path / "old.npz")
    assert not isinstance(stored.dense, np.memmap)  # read whole: a compressed member cannot be mapped
    np.testing.assert_array_equal(stored.take(slice(None)), x)


def test_memory_mapped_reading_pages_in_only_the_rows_read(tmp_path: Path) -> None:
    n, c = 2000, 5000  # 10M cells, 20 MB as float16: dense under this threshold
    x = np.random.default_rng(0).standard_normal((n, c), dtype=np.float32)
    oof.write_oof(tmp_path / "big.npz", folds_table(n), x, names(c), dense_max_cells=n * c)
    del x
    gc.collect()
    before = rss_bytes()
    stored = oof.open_oof(tmp_path / "big.npz")
    opened = rss_bytes()
    first = stored.take(slice(0, 20))  # 20 rows: 200 kB
    read = rss_bytes()
    assert isinstance(stored.dense, np.memmap) and first.shape == (20, c)
    assert opened - before < 4 << 20, "opening read the 20 MB array"
    assert read - before < 6 << 20, "reading 20 rows paged in far more"
    # Streaming in folds.csv order goes chunk by chunk, each of about CHUNK_CELLS cells.
    view = oof.open_aligned(tmp_path / "big.npz", folds_table(n), names(c))
    sizes = [part.shape[0] for _, part in view.chunks()]
    assert sum(sizes) == n and max(sizes) == oof.rows_per_chunk(c) < n


# ---------------------------------------------------------------------------------------------------------
# Alignment with folds.csv, in either format.


@pytest.mark.parametrize("store", [{}, TOPK_STORE], ids=["dense", "topk"])
def test_alignment_reorders_and_refuses_leaked_or_mismatched_files(tmp_path: Path, store: dict) -> None:
    folds, x = folds_table(30), logits_of(30, 8)
    order = np.random.default_rng(1).permutation(30)
    path = tmp_path / "oof.npz"
    oof.write_oof(path, folds.iloc[order], x[order], names(8), **store)
    got = oof.aligned_predictions(path, folds, names(8))
    assert isinstance(got, TopK) == bool(store)
    want = TopK.from_logits(x, 4).dense() if store else x
    dense = oof.aligned_logits(path, folds, names(8))
    np.testing.assert_allclose(dense, want, rtol=2e-3, atol=1e-6)  # folds.csv order, whatever the file's

    leaked = folds.copy()
    leaked.loc[[0, 1], "fold"] = leaked.loc[[1, 0], "fold"].to_numpy()
    oof.write_oof(path, leaked, x, names(8), **store)
    with pytest.raises(OOFError, match=r"2 image\(s\) carry another fold id.*'img 0.png'.*trained on them"):
        oof.aligned_predictions(path, folds, names(8))
    oof.write_oof(path, folds.iloc[1:], x[1:], names(8), **store)
    with pytest.raises(OOFError, match=r"1 missing \('img 0.png'\)"):
        oof.aligned_predictions(path, folds, names(8))
    oof.write_oof(path, folds, x, names(8)[::-1], **store)
    with pytest.raises(OOFError, match=r"other classes than folds.csv.*other order"):
        oof.aligned_predictions(path, folds, names(8))
    x[3, 2:] = np.nan
    oof.write_oof(path, folds, x, names(8), **store)
    with pytest.raises(OOFError, match="holds NaN or inf values"):
        oof.aligned_predictions(path, folds, names(8))
    np.savez(path, logits=x)
    with pytest.raises(OOFError, match="lacks the arrays 'logits', 'image' and 'fold'"):
        oof.aligned_predictions(path, folds, names(8))
    with pytest.raises(OOFError, match="not found: train every fold"):
        oof.aligned_predictions(tmp_path / "none.npz", folds, names(8))


def test_soft_labels_must_be_distributions(tmp_path: Path) -> None:
    folds = folds_table(12)
    p = softmax(logits_of(12, 6))
    oof.write_oof(tmp_path / "soft.npz", folds, np.log(p), names(6), oof.SOFT_KEY, **TOPK_STORE)
    soft = oof.load_soft_labels(tmp_path / "soft.npz", folds, names(6))
    assert isinstance(soft, TopK)
    np.testing.assert_allclose(soft.probs().sum(1), 1, rtol=1e-6)
    oof.write_oof(tmp_path / "soft.npz", folds, np.log(p), names(6), oof.SOFT_KEY)
    # float16 log-probabilities: a probability p is kept within a relative |log p| x 2^-11.
    np.testing.assert_allclose(oof.load_soft_labels(tmp_path / "soft.npz", folds, names(6)), p, rtol=1e-2)
    oof.write_oof(tmp_path / "soft.npz", folds, np.log(2 * p), names(6), oof.SOFT_KEY)
    with pytest.raises(OOFError, match="summing to 1"):
        oof.load_soft_labels(tmp_path / "soft.npz", folds, names(6))


@pytest.mark.parametrize("store", [{}, TOPK_STORE], ids=["dense", "topk"])
def test_assemble_streams_fold_files_into_folds_order(tmp_path: Path, store: dict) -> None:
    folds, x = folds_table(31), logits_of(31, 9)
    exp = Experiment(tmp_path / "exp")
    for k in range(3):
        rows = np.flatnonzero(folds["fold"] == k)[::-1]  # each fold file in its own order
        oof.write_oof(exp.fold_oof(k), folds.iloc[rows], x[rows], names(9), **store)
    assert assemble_oof(exp, folds, **store) == exp.oof
    got = oof.aligned_predictions(exp.oof, folds, names(9))
    stored = oof.open_oof(exp.oof)
    assert stored.image.tolist() == folds["image"].tolist() and stored.fold.tolist() == folds["fold"].tolist()
    if store:
        want = TopK.from_logits(x, 4)
        np.testing.assert_array_equal(got.index, want.index)
        np.testing.assert_allclose(got.rest, want.rest, rtol=1e-6)
    else:
        np.testing.assert_array_equal(got, x.astype(np.float16).astype(np.float32))
    # Fold files of an older, narrower store_topk assemble at their width.
    oof.write_oof(exp.fold_oof(0), folds[folds["fold"] == 0], x[folds["fold"] == 0], names(9), dense_max_cells=0, topk=3)
    assemble_oof(exp, folds, **TOPK_STORE)
    assert oof.open_oof(exp.oof).topk.k == 3


# ---------------------------------------------------------------------------------------------------------
# Computing on top-k rows.


def test_topk_softmax_log_prob_and_truncation_match_the_dense_form() -> None:
    x = logits_of(50, 20)
    top = TopK.from_logits(x, 6)
    dense = top.dense()
    y = np.random.default_rng(2).integers(0, 20, 50)
    np.testing.assert_allclose(top.probs(), softmax(dense), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(top.log_prob(y), np.log(softmax(dense))[np.arange(50), y], rtol=1e-6)
    np.testing.assert_allclose(top.log_norm(), np.log(np.exp(x.astype(np.float64)).sum(1)), rtol=1e-6)
    three = top.truncate(3)
    want = TopK.from_logits(x, 3)
    np.testing.assert_array_equal(three.index, want.index)
    np.testing.assert_allclose(three.rest, want.rest, rtol=1e-6)
    keep = np.full(50, 19)
    kept = TopK.from_logits(x, 6, keep=keep)
    assert (kept.index == 19).any(1).all() and (np.diff(kept.values, axis=1) <= 0).all()
    np.testing.assert_allclose(kept.log_norm(), top.log_norm(), rtol=1e-6)  # nothing lost, only moved


def test_prediction_scores_equal_index_scores() -> None:
    x = logits_of(60, 7)
    y = np.random.default_rng(3).integers(0, 7, 60)
    assert oof.prediction_scores(x, y, 7) == pytest.approx(index_scores(x, y, names(7)), rel=1e-9)
    top = TopK.from_logits(x, 3)
    assert oof.prediction_scores(top, y, 7) == pytest.approx(index_scores(top.dense(), y, names(7)), rel=1e-6)


def test_mean_over_views_on_the_union_of_their_top_k() -> None:
    views = [logits_of(40, 30, seed) for seed in range(3)]
    np.testing.assert_allclose(oof.mean_predictions(views), np.mean(views, axis=0), rtol=1e-6)
    tops = [TopK.from_logits(v, 5) for v in views]
    got = oof.mean_predictions(tops)
    want = TopK.from_logits(np.mean([t.dense() for t in tops], axis=0), 5)
    np.testing.assert_array_equal(got.index, want.index)
    np.testing.assert_allclose(got.values, want.values, rtol=1e-5)
    np.testing.assert_allclose(got.rest, want.rest, rtol=1e-5)


def test_the_collector_fills_rows_in_any_order_in_the_stores_format() -> None:
    x = logits_of(20, 10)
    for store, kind in (({"dense_max_cells": 1000, "topk": 4}, np.ndarray), (TOPK_STORE, TopK)):
        out = oof.Collector(20, 10, **store)
        for rows in (np.arange(1, 20, 2), np.arange(0, 20, 2)[::-1]):
            out.put(rows, x[rows] if kind is np.ndarray else TopK.from_logits(x[rows], 6))
        got = out.result()
        assert isinstance(got, kind)
        want = x.astype(np.float16) if kind is np.ndarray else TopK.from_logits(x, 4).dense()
        np.testing.assert_allclose(got if kind is np.ndarray else got.dense(), want, rtol=1e-6)
