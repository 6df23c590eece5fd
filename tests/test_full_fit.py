"""The full fit (config full_fit): train.py --fold all trains every fold and then one model on every image,
finetune.py fine-tunes that one too, package.py ships it in place of the fold models (their OOF logits still
fit the stacker) and predict.py runs it.

Tiny data (2 folds of 12 + 12 images, timm's test_efficientnet at 32 px, 2 epochs), trained once.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tiny import make_data, make_test_images, write_yaml

import finetune
import package
import predict
import train
from lib import bundle
from lib.config import Config
from lib.layout import FULL, LayoutError, experiment, load_fold, read_folds, select_folds
from lib.models import load_checkpoint
from lib.oof import read_oof

FT_SIZE = 40


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> Config:
    """Experiment 't' trained by ``train.py --fold all`` with full_fit on, then fine-tuned at 40 px."""
    root = tmp_path_factory.mktemp("full_fit")
    cfg = make_data(
        root, per_class=8, n_folds=2, epochs=2, full_fit=True, ft_epochs=1, ft_img_size=FT_SIZE,
        tta_views=["hflip"], bundle_dir=str(root / "bundle"), test_images=str(root / "test_images"),
    )  # fmt: skip
    make_test_images(root)
    yml = write_yaml(cfg, root / "c.yaml")
    assert train.main(["--config", str(yml), "--fold", "all"]) == 0
    assert finetune.main(["--config", str(yml)]) == 0
    return cfg


def test_select_folds_adds_the_full_fit_only_when_asked(cfg: Config) -> None:
    assert select_folds("all", cfg.folds_csv) == [0, 1]
    assert select_folds("all", cfg.folds_csv, full_fit=True) == [0, 1, FULL]
    assert select_folds("full", cfg.folds_csv) == [FULL]
    with pytest.raises(LayoutError, match="'full' or 'all'"):
        select_folds("every", cfg.folds_csv)
    data = load_fold(folds_csv=cfg.folds_csv, resized=cfg.resized_images, fold=FULL)
    assert len(data.train) == len(read_folds(cfg.folds_csv)) and data.val.empty


def test_fold_all_trains_the_folds_then_one_model_on_every_image(cfg: Config) -> None:
    exp = experiment(cfg.output_dir, cfg.exp)
    full = exp.fold(FULL)
    assert full.name == "full" and {p.name for p in full.iterdir()} == {"best.pt", "last.pt", "log.csv"}
    log = pd.read_csv(exp.log(FULL))
    assert log["epoch"].tolist() == [1, 2] and log["val_loss"].isna().all()  # nothing held out
    best, last = load_checkpoint(exp.best(FULL)), load_checkpoint(exp.last(FULL))
    # The last epoch's weights, averaged (EMA is on by default): nothing could choose another epoch.
    assert best["fold"] == FULL and best["epoch"] == 2 and best["source"] == "ema" and best["metric"] is None
    for key, value in last["ema"].items():
        assert torch.equal(best["model"][key], value), key
    fold0 = load_checkpoint(exp.best(0))["model"]
    assert any(not torch.equal(fold0[k], v) for k, v in best["model"].items())
    # The experiment's OOF is the folds' alone, in folds.csv order.
    oof = read_oof(exp.oof)
    assert oof["image"].tolist() == read_folds(cfg.folds_csv)["image"].astype(str).tolist()


def test_a_finished_full_fit_resumes_to_nothing(cfg: Config) -> None:
    best = experiment(cfg.output_dir, cfg.exp).best(FULL)
    before = best.stat().st_mtime_ns
    result = train.train_fold(cfg, FULL, resume=True)
    assert result == {"best": None, "best_epoch": 2} and best.stat().st_mtime_ns == before


def test_finetune_fine_tunes_the_full_fit_too(cfg: Config) -> None:
    ft = experiment(cfg.output_dir, f"{cfg.exp}_ft{FT_SIZE}")
    log = pd.read_csv(ft.log(FULL))
    assert log["epoch"].tolist() == [1] and not ft.fold_oof(FULL).exists()  # no untrained epoch 0: no val
    ckpt = load_checkpoint(ft.best(FULL))
    assert ckpt["config"]["img_size"] == FT_SIZE and ckpt["fold"] == FULL
    source = load_checkpoint(experiment(cfg.output_dir, cfg.exp).best(FULL))["model"]
    head = [k for k in source if k.startswith("classifier.")]
    assert head and all(not torch.equal(ckpt["model"][k], source[k]) for k in head)
    assert all(torch.equal(ckpt["model"][k], source[k]) for k in source if k not in head)
    assert read_oof(ft.oof)["logits"].shape[0] == len(read_folds(cfg.folds_csv))  # the folds' OOF


def test_package_ships_the_full_fits_and_predict_runs_them(cfg: Config, tmp_path: Path) -> None:
    manifest = package.package(cfg)
    members = {m["name"]: m for m in manifest["members"]}
    assert set(members) == {"t", f"t_ft{FT_SIZE}"}
    for name, m in members.items():
        assert m["files"] == [f"members/{name}/full.pt"] and m["folds"] == [FULL]
        shipped = load_checkpoint(Path(cfg.bundle_dir) / m["files"][0])["model"]
        trained = load_checkpoint(experiment(cfg.output_dir, name).best(FULL))["model"]
        assert all(torch.equal(shipped[k], v) for k, v in trained.items())
    assert not list(Path(cfg.bundle_dir).rglob("fold*.pt"))

    test_dir, out = Path(cfg.test_images), tmp_path / "sub.csv"
    assert predict.main([str(test_dir), "--bundle", cfg.bundle_dir, "--out", str(out), "--probs"]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["image"] for r in rows) == sorted(p.name for p in test_dir.iterdir())
    predictor = bundle.Predictor(Path(cfg.bundle_dir), bundle.verify_bundle(cfg.bundle_dir), torch.device("cpu"), None)
    assert {n for n in predictor.needs(predictor.levels[0]) if n != "stacker"} == {("t", 0), (f"t_ft{FT_SIZE}", 0)}
    probs = np.array([[float(r[c]) for c in manifest["classes"]] for r in rows])
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)


def test_package_without_the_full_fit_says_how_to_make_it(cfg: Config, tmp_path: Path) -> None:
    other = dataclasses.replace(cfg, output_dir=str(tmp_path / "output"), bundle_dir=str(tmp_path / "bundle"))
    source = experiment(cfg.output_dir, cfg.exp)
    for fold in (0, 1):
        dest = experiment(other.output_dir, cfg.exp).fold(fold)
        dest.mkdir(parents=True)
        for f in source.fold(fold).iterdir():
            (dest / f.name).write_bytes(f.read_bytes())
    experiment(other.output_dir, cfg.exp).oof.write_bytes(source.oof.read_bytes())
    with pytest.raises(package.PackageError, match=r"--fold full .* full_fit false"):
        package.package(dataclasses.replace(other, package_members=[cfg.exp]))
    manifest = package.package(dataclasses.replace(other, package_members=[cfg.exp], full_fit=False))
    assert manifest["members"][0]["files"] == ["members/t/fold0.pt", "members/t/fold1.pt"]
