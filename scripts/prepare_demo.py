"""Build the competition layout from the embedded ELPV data (PyPI package ``elpv-dataset``).

ELPV: 2,624 solar-cell electroluminescence images (300x300, grayscale), each labelled with a defect
probability of 0, 1/3, 2/3 or 1: four classes. A fixed, stratified 25% (656 cells) is held out as the
test set, so the training part has 1,968 cells as in Deitsch et al., Solar Energy 185 (2019), whose CNN
reached 88.42% average accuracy: our held-out score sits beside theirs.

Writes ``train.csv`` (image, label, cell type) and ``train_images/`` where the config points, and
``test_images/`` + ``test_labels.csv`` beside them. The CSVs are written last and atomically, so an
interrupted run is simply redone.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lib.common import atomic_path, get_logger
from lib.config import parse_config

log = get_logger("prepare_demo")

# Defect probability -> class name (kept as strings end to end).
CLASS_NAMES = {0.0: "defect_0", 1 / 3: "defect_1of3", 2 / 3: "defect_2of3", 1.0: "defect_1"}
TEST_FRACTION = 0.25
SPLIT_SEED = 2019


def elpv_table() -> tuple[pd.DataFrame, Path]:
    """The package's label table (path, class, cell type) and its image folder."""
    try:
        import elpv_dataset
    except ImportError as e:
        raise SystemExit(
            "prepare_demo: the embedded demo data needs the PyPI package elpv-dataset: "
            "pip install -r requirements.txt"
        ) from e
    data_dir = Path(elpv_dataset.__file__).parent / "data"
    raw = pd.read_csv(data_dir / "labels.csv", sep=r"\s+", header=None, names=["path", "prob", "type"])
    names = {round(p, 3): n for p, n in CLASS_NAMES.items()}
    raw["label"] = raw["prob"].round(3).map(names)
    if raw["label"].isna().any():
        raise SystemExit(f"prepare_demo: unexpected defect probabilities in {data_dir / 'labels.csv'}")
    raw["image"] = raw["path"].map(lambda p: Path(p).name)
    return raw[["image", "path", "label", "type"]], data_dir


def split(table: pd.DataFrame, seed: int = SPLIT_SEED) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stratified train/test split on class x cell type, fixed seed."""
    strata = table["label"] + "/" + table["type"]
    train, test = train_test_split(table, test_size=TEST_FRACTION, stratify=strata, random_state=seed)
    return train.sort_values("image"), test.sort_values("image")


def copy_images(rows: pd.DataFrame, src_dir: Path, dst_dir: Path) -> None:
    dst_dir.mkdir(parents=True, exist_ok=True)
    for path, name in zip(rows["path"], rows["image"], strict=True):
        target = dst_dir / name
        if not target.exists():
            with atomic_path(target) as tmp:
                shutil.copyfile(src_dir / path, tmp)


def prepare(train_csv: Path, train_images: Path) -> None:
    table, data_dir = elpv_table()
    train, test = split(table)
    root = train_csv.parent
    copy_images(train, data_dir, train_images)
    copy_images(test, data_dir, root / "test_images")
    with atomic_path(root / "test_labels.csv") as tmp:
        test[["image", "label"]].to_csv(tmp, index=False)
    with atomic_path(train_csv) as tmp:
        train[["image", "label", "type"]].to_csv(tmp, index=False)
    counts = ", ".join(f"{k} {v}" for k, v in train["label"].value_counts().sort_index().items())
    log.info(f"{len(train)} training images ({counts}) -> {train_csv}, {train_images}/")
    log.info(f"{len(test)} held-out test images -> {root / 'test_images'}/, {root / 'test_labels.csv'}")


def main(argv: list[str] | None = None) -> int:
    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--force", action="store_true", help="rebuild even if train.csv exists")

    cfg, args = parse_config(argv, __doc__.splitlines()[0], extra, stage="prepare_demo")
    train_csv = Path(cfg.train_csv)
    if train_csv.exists() and not args.force:
        log.info(f"{train_csv} exists: nothing to do (--force rebuilds the demo data)")
        return 0
    prepare(train_csv, Path(cfg.train_images))
    return 0


if __name__ == "__main__":
    sys.exit(main())
