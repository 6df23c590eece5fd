"""The GPU recipes in configs/ (EfficientNet-B4 AdvProp, ResNeSt-101): every key they set works together on
the real architecture. Only what a CPU test cannot afford is shrunk (data, image sizes, epochs, no download);
the model, optimizer, accumulation, CutMix, EMA, SGDR, precision and fine-tune settings stay the recipe's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tiny import ROOT, base_cfg, make_data

import finetune
import train
from lib import models
from lib.common import seed_everything
from lib.config import Config, load_config
from lib.oof import read_oof

RECIPES = sorted((ROOT / "configs").glob("gpu_*.yaml"))
# What a recipe may not keep on a CPU test: where the data lives, how big it is, how long it runs.
SHRUNK = {
    "exp", "output_dir", "train_csv", "train_images", "folds_csv", "resize", "n_folds", "min_side",
    "phash_distance", "conflict_distance", "workers", "pretrained", "img_size", "ft_img_size", "epochs",
    "ft_epochs", "batch_size", "sgdr_t0", "warmup_epochs",
}  # fmt: skip


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("recipes")
    make_data(root, per_class=6, n_folds=2)
    return root


def test_there_are_gpu_recipes_for_both_backbones() -> None:
    names = {load_config(p).model.partition(".")[0] for p in RECIPES}
    assert {"tf_efficientnet_b4", "resnest101e"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_trains_and_finetunes_on_its_real_architecture(
    recipe: Path, data_root: Path, tmp_path: Path
) -> None:
    shipped = load_config(recipe)
    models._check_model_name(shipped.model)  # the architecture and its pretrained tag exist in timm
    assert shipped.pretrained == "hub" or Path(shipped.pretrained).suffix
    assert shipped.ft_img_size > shipped.img_size and shipped.n_folds == 5
    tiny = base_cfg(data_root, n_folds=2, output_dir=str(tmp_path / "output"), img_size=64, ft_img_size=80)
    keep = {f.name: getattr(shipped, f.name) for f in dataclasses.fields(Config) if f.name not in SHRUNK}
    cfg = dataclasses.replace(tiny, **keep, epochs=1, ft_epochs=1, batch_size=4, sgdr_t0=1.0)

    seed_everything(cfg.seed)  # as train_fold seeds fold 0 before building its model: the same initial weights
    initial = models.create_model(
        cfg.model, num_classes=3, in_chans=cfg.in_chans, drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate
    ).state_dict()
    train.train_fold(cfg, 0)
    best = models.load_checkpoint(cfg.exp_dir / "fold0" / "best.pt")
    assert best["config"]["model"] == shipped.model  # the recipe's architecture, not a stand-in
    log = pd.read_csv(cfg.exp_dir / "fold0" / "log.csv")
    assert log["epoch"].tolist() == [1] and np.isfinite(log[["train_loss", "val_loss"]].to_numpy()).all()
    last = models.load_checkpoint(cfg.exp_dir / "fold0" / "last.pt")
    assert last["step"] >= 1 and last["optimizer"]["state"]  # the recipe's optimizer took real steps
    moved = [k for k, v in best["model"].items() if v.is_floating_point() and not torch.equal(v, initial[k])]
    assert moved, "no weight changed: nothing was trained"

    done = finetune.finetune_fold(cfg, 0)
    assert done is not None
    ft_dir = Path(cfg.output_dir) / finetune.ft_config(cfg, 80, "none").exp / "fold0"
    oof = read_oof(ft_dir / "oof.npz")
    assert oof["logits"].shape[1] == 3 and len(oof["image"]) > 0
