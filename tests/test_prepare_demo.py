"""The embedded demo data: the stated counts, classes and a reproducible, disjoint split."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("prepare_demo", ROOT / "scripts" / "prepare_demo.py")
prepare_demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prepare_demo)


def test_demo_layout_counts_and_classes(tmp_path: Path) -> None:
    train_csv, images = tmp_path / "input" / "train.csv", tmp_path / "input" / "train_images"
    assert prepare_demo.main(["--train-csv", str(train_csv), "--train-images", str(images)]) == 0
    train = pd.read_csv(train_csv, dtype=str, keep_default_na=False)
    test = pd.read_csv(tmp_path / "input" / "test_labels.csv", dtype=str, keep_default_na=False)
    assert (len(train), len(test)) == (1968, 656)  # Deitsch et al. 2019 trained on 1,968 cells
    classes = {"defect_0", "defect_1of3", "defect_2of3", "defect_1"}
    assert set(train["label"]) == set(test["label"]) == classes
    assert not set(train["image"]) & set(test["image"])
    assert sorted(p.name for p in images.iterdir()) == sorted(train["image"])
    assert len(list((tmp_path / "input" / "test_images").iterdir())) == 656
    # Stratified: every class keeps its share in the held-out part (within one image).
    full = pd.concat([train, test])
    for c in classes:
        share = (full["label"] == c).sum() * 0.25
        assert abs((test["label"] == c).sum() - share) <= 1.5, c
    # A second call leaves the existing data alone.
    mtime = train_csv.stat().st_mtime_ns
    assert prepare_demo.main(["--train-csv", str(train_csv), "--train-images", str(images)]) == 0
    assert train_csv.stat().st_mtime_ns == mtime


def test_split_is_reproducible() -> None:
    table, _ = prepare_demo.elpv_table()
    a, b = prepare_demo.split(table), prepare_demo.split(table)
    assert a[1]["image"].tolist() == b[1]["image"].tolist()
