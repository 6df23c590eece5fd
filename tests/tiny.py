"""Tiny training data and settings shared by the stage tests: 3 classes of coloured 40 px images, timm's
test_efficientnet at 32 px, no pretrained weights. Built with the real resize and folds stages."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from folds import make_folds
from lib.config import Config, save_config
from lib.data import eval_transform, make_loader
from lib.layout import FoldData, load_fold
from resize import resize_folder

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["blue sky", "green/grass", "red"]  # names with spaces and slashes stay strings


def base_cfg(root: Path, **overrides) -> Config:
    """Tiny settings over the data under ``root``: 32 px, timm's test model, no pretrained weights."""
    settings = {
        "exp": "t", "output_dir": str(root / "output"), "train_csv": str(root / "train.csv"),
        "train_images": str(root / "train_images"), "folds_csv": str(root / "folds.csv"), "resize": 40,
        "n_folds": 3, "min_side": 8, "phash_distance": 0, "conflict_distance": 0, "workers": 1,
        "model": "test_efficientnet", "pretrained": "none", "img_size": 32, "epochs": 2, "batch_size": 4,
        "lr": 3e-3, "sgdr_t0": 1.0, "warmup_epochs": 0.0, "cutmix_alpha": 0.0, "ema_decay": 0.9,
        "rotate": 0.0, "noise_p": 0.0, "blur_p": 0.0, "dropout_p": 0.0, "precision": "fp32",
    }  # fmt: skip
    return Config(**(settings | overrides))


def make_data(root: Path, per_class: int = 12, **overrides) -> Config:
    """Images whose dominant colour is the class, resized and folded by the real stages."""
    rng = np.random.default_rng(0)
    rows = []
    for c, name in enumerate(CLASSES):
        for k in range(per_class):
            img = rng.integers(0, 90, (40, 48, 3), dtype=np.uint8)
            img[..., 2 - c] += 150  # BGR: class 0 blue, 1 green, 2 red
            cv2.circle(img, (int(rng.integers(8, 40)), int(rng.integers(8, 32))), 6, (255, 255, 255), -1)
            path = root / "train_images" / f"{c}_{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), img)
            rows.append({"image": path.name, "label": name})
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    cfg = base_cfg(root, **overrides)
    resize_folder(Path(cfg.train_images), cfg.resized_images, cfg)
    make_folds(cfg)
    return cfg


def make_test_images(root: Path, per_class: int = 3) -> int:
    """Held-out images drawn like the training ones under ``root/test_images``, with their labels in
    ``root/test_labels.csv`` (image,label: the demo's layout); the number of images."""
    rng = np.random.default_rng(7)
    rows = []
    for c, name in enumerate(CLASSES):
        for k in range(per_class):
            img = rng.integers(0, 90, (44, 36, 3), dtype=np.uint8)
            img[..., 2 - c] += 150
            path = root / "test_images" / f"t{c}_{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), img)
            rows.append({"image": path.name, "label": name})
    pd.DataFrame(rows).to_csv(root / "test_labels.csv", index=False)
    return len(rows)


def write_yaml(cfg: Config, path: Path) -> Path:
    save_config(cfg, path)
    return path


def fold_data(cfg: Config, fold: int) -> FoldData:
    """Fold ``fold`` of the config's folds.csv, as train.py loads it (its soft labels included)."""
    return load_fold(
        folds_csv=cfg.folds_csv, resized=cfg.resized_images, fold=fold, soft_labels=cfg.soft_labels or None
    )


def eval_tf(cfg: Config, data_config: dict, size: int):
    """The validation transform of a model trained with ``cfg`` (crop, channels) at ``size``."""
    return eval_transform(
        size=size, mean=data_config["mean"], std=data_config["std"], interpolation=data_config["interpolation"],
        in_chans=cfg.in_chans, crop=cfg.crop,
    )  # fmt: skip


def loader(dataset, cfg: Config, *, train: bool = False, **kwargs):
    """make_loader with the config's batch size, workers and seed."""
    options = {"batch_size": cfg.batch_size, "workers": cfg.workers, "seed": cfg.seed} | kwargs
    return make_loader(dataset, train=train, **options)
