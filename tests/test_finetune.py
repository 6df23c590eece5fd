"""finetune.py: frozen parameters stay bit-for-bit, the head (and only what was unfrozen) changes, the
features path computes what the full model computes, BatchNorm recalibration, resumability, errors.

A tiny source experiment (2 folds of 12 + 12 images, 1 epoch, timm's test_efficientnet at 32 px) fine-tuned
at 48 px.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
from tiny import eval_tf, fold_data, loader, make_data, write_yaml

import finetune
import train
from lib.config import Config, load_config
from lib.data import ImageDataset
from lib.layout import read_folds
from lib.models import load_checkpoint, model_from_checkpoint, predict_logits, stage_groups
from lib.oof import read_oof

FT_SIZE = 48
# One batch per fold half: loaded in-process, no worker start-up (the default fine-tune uses 4 and workers).
QUICK = 12


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Config:
    """A trained 2-fold experiment 't' and a config fine-tuning it for 2 epochs at 48 px (batches of QUICK)."""
    root = tmp_path_factory.mktemp("finetune")
    cfg = make_data(
        root, per_class=8, n_folds=2, epochs=1, batch_size=QUICK, ft_epochs=2, ft_img_size=FT_SIZE
    )
    for fold in (0, 1):
        train.train_fold(cfg, fold)
    return cfg


@pytest.fixture(scope="module")
def frozen(source: Config) -> Config:
    """The default fine-tune (frozen backbone and BatchNorm) of every fold, through the command line, in
    batches of 4 (several batches, loader workers)."""
    yml = write_yaml(dataclasses.replace(source, batch_size=4), Path(source.output_dir) / "source.yaml")
    assert finetune.main(["--config", str(yml)]) == 0
    return dataclasses.replace(source, exp=f"t_ft{FT_SIZE}")


def states(cfg: Config, fold: int) -> tuple[dict, dict]:
    """The state dicts of one fold's source best.pt (experiment cfg.exp) and fine-tuned best.pt (cfg.ft_exp)."""
    src = load_checkpoint(finetune.source_checkpoint(cfg, fold))["model"]
    return src, load_checkpoint(Path(cfg.output_dir) / cfg.ft_exp / f"fold{fold}" / "best.pt")["model"]


def is_head(key: str) -> bool:
    return key.startswith("classifier.")


def changed(a: dict, b: dict, keys) -> list[str]:
    return [k for k in keys if not torch.equal(a[k], b[k])]


def test_frozen_finetune_changes_only_the_head(source: Config, frozen: Config) -> None:
    for fold in (0, 1):
        src, ft = states(dataclasses.replace(source, ft_exp=frozen.exp), fold)
        assert src.keys() == ft.keys()
        backbone = [k for k in src if not is_head(k)]
        assert any(k.endswith("running_mean") for k in backbone)  # BN buffers are compared too
        assert changed(src, ft, backbone) == [], "a frozen parameter or BatchNorm buffer moved"
        assert changed(src, ft, [k for k in src if is_head(k)]) == ["classifier.weight", "classifier.bias"]
        log = pd.read_csv(frozen.exp_dir / f"fold{fold}" / "log.csv")
        assert list(log.columns) == finetune.LOG_COLUMNS
        assert log["epoch"].tolist() == [0, 1, 2] and set(log["path"]) == {"features"}
        assert log["lr"].isna().tolist() == [True, False, False]  # epoch 0: the untrained source head


def test_finetune_is_an_experiment_later_stages_can_use(frozen: Config) -> None:
    folds = read_folds(Path(frozen.folds_csv))
    model, ckpt = model_from_checkpoint(frozen.exp_dir / "fold1" / "best.pt")
    assert ckpt["config"]["img_size"] == FT_SIZE and ckpt["config"]["exp"] == frozen.exp
    assert ckpt["source"] == "model" and ckpt["fold"] == 1 and ckpt["epoch"] >= 1
    assert ckpt["classes"] == sorted(folds["label"].unique())
    saved = load_config(frozen.exp_dir / "config.yaml")
    assert (saved.exp, saved.img_size, saved.model) == (frozen.exp, FT_SIZE, frozen.model)
    oof = read_oof(frozen.exp_dir / "oof.npz")
    assert oof["image"].tolist() == folds["image"].tolist()
    assert oof["fold"].tolist() == folds["fold"].tolist()
    # The OOF logits came from cached features; predicting the images with the saved model gives the same.
    val = fold_data(frozen, 1).val
    ds = ImageDataset(
        val["path"].tolist(), val["target"].to_numpy(), eval_tf(frozen, ckpt["data_config"], FT_SIZE)
    )
    logits = predict_logits(
        model, loader(ds, frozen), torch.device("cpu"), None, True
    )
    fold_oof = read_oof(frozen.exp_dir / "fold1" / "oof.npz")
    assert fold_oof["image"].tolist() == val["image"].tolist()
    torch.testing.assert_close(  # the file holds float16 (lib/oof.py): equal within one float16 step
        torch.from_numpy(fold_oof["logits"]), torch.from_numpy(logits), rtol=1e-3, atol=1e-3
    )
    # Each test-time view's OOF is written too (package reads it instead of running the folds again): the
    # saved model on the mirrored images, per fold and for the experiment.
    assert frozen.tta_views == ["hflip"]
    flipped = ImageDataset(
        val["path"].tolist(), val["target"].to_numpy(), eval_tf(frozen, ckpt["data_config"], FT_SIZE)
    )
    with torch.no_grad():
        batch = torch.stack([flipped[i][0] for i in range(len(flipped))])
        mirrored = model.eval()(torch.flip(batch, [3])).numpy()
    fold_view = read_oof(frozen.exp_dir / "fold1" / "oof_hflip.npz")
    assert fold_view["image"].tolist() == val["image"].tolist()
    torch.testing.assert_close(
        torch.from_numpy(fold_view["logits"]), torch.from_numpy(mirrored), rtol=1e-3, atol=1e-3
    )
    assert read_oof(frozen.exp_dir / "oof_hflip.npz")["image"].tolist() == folds["image"].tolist()


def test_features_path_gives_the_full_models_logits(source: Config) -> None:
    model, _ = model_from_checkpoint(finetune.source_checkpoint(source, 0), ema=False)
    x = torch.randn(5, 3, FT_SIZE, FT_SIZE)
    with torch.no_grad():
        pre = finetune.PreLogits(model.eval())(x)
        assert pre.shape == (5, model.num_features)
        torch.testing.assert_close(model.get_classifier()(pre), model(x), rtol=1e-5, atol=1e-5)


def test_recalibrate_changes_bn_statistics_only(source: Config, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="finetune")
    cfg = dataclasses.replace(source, ft_bn="recalibrate", ft_exp="recal", ft_epochs=1)
    finetune.finetune_fold(cfg, 0)
    assert "BatchNorm layers re-estimated at 48 px" in caplog.text and "path features" in caplog.text
    src, ft = states(cfg, 0)
    stats = [k for k in src if k.endswith(("running_mean", "running_var"))]
    assert stats and changed(src, ft, stats) == stats  # every BatchNorm re-estimated
    model, ckpt = model_from_checkpoint(finetune.source_checkpoint(cfg, 0))
    params = dict(model.named_parameters())
    assert changed(src, ft, [k for k in params if not is_head(k)]) == []  # weights bit-for-bit
    assert changed(src, ft, [k for k in params if is_head(k)])
    # The first BatchNorm's new statistics are those of the stem's output over the training images at 48 px
    # (one batch of QUICK images here), not a blend with the old ones.
    rows = fold_data(cfg, 0).train
    tf = eval_tf(cfg, ckpt["data_config"], FT_SIZE)
    x = torch.stack(
        [ImageDataset(rows["path"].tolist(), rows["target"].to_numpy(), tf)[i][0] for i in range(len(rows))]
    )
    with torch.no_grad():
        stem = model.conv_stem(x)
    torch.testing.assert_close(ft["bn1.running_mean"], stem.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        ft["bn1.running_var"], stem.transpose(0, 1).flatten(1).var(1), rtol=1e-4, atol=1e-5
    )


def test_layer_groups_follow_timm_and_leave_out_the_classifier() -> None:
    lite0 = stage_groups(timm.create_model("tf_efficientnet_lite0", num_classes=3))
    # stem, blocks.0 .. blocks.6; timm merges conv_head/bn2 into the last block's group.
    assert len(lite0) == 8 and lite0[0][0] == "conv_stem.weight"
    assert {"blocks.6.0.conv_pw.weight", "conv_head.weight", "bn2.weight"} <= set(lite0[-1])
    assert not any(n.startswith("classifier.") for g in lite0 for n in g)


def test_unfreeze_trains_only_the_last_group(source: Config, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="finetune")
    cfg = dataclasses.replace(source, ft_unfreeze=1, ft_exp="unfrozen", ft_epochs=1)
    finetune.finetune_fold(cfg, 0)
    assert "path full" in caplog.text
    log = pd.read_csv(Path(cfg.output_dir) / "unfrozen" / "fold0" / "log.csv")
    assert set(log["path"]) == {"full"}
    src, ft = states(cfg, 0)
    groups = stage_groups(model_from_checkpoint(finetune.source_checkpoint(cfg, 0))[0])
    last = groups[-1]
    assert "conv_head.weight" in last
    assert changed(src, ft, last) == last  # every parameter of the unfrozen group trained
    earlier = [n for g in groups[:-1] for n in g]
    modules = {n.rpartition(".")[0] for n in earlier}
    buffers = [k for k in src if k.rpartition(".")[0] in modules and k not in earlier]
    assert earlier and buffers
    assert changed(src, ft, earlier + buffers) == []  # earlier groups and their BatchNorm untouched
    last_modules = {n.rpartition(".")[0] for n in last}
    assert changed(src, ft, [k for k in src if k.rpartition(".")[0] in last_modules and "running_" in k])


def test_rerun_skips_complete_folds_and_redoes_stale_ones(
    source: Config, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="finetune")
    cfg = dataclasses.replace(source, ft_exp="rerun", ft_epochs=1)
    yml = write_yaml(cfg, tmp_path / "c.yaml")
    best = Path(cfg.output_dir) / "rerun" / "fold0" / "best.pt"

    def run(*extra: str) -> int:
        caplog.clear()
        assert finetune.main(["--config", str(yml), "--fold", "0", *extra]) == 0
        return best.stat().st_mtime_ns

    first = run()
    assert run() == first and "fold 0: skipped" in caplog.text
    forced = run("--force")
    assert forced != first and "skipped" not in caplog.text
    assert run("--ft-lr", "0.01") != forced and "other ft_* settings" in caplog.text

    log_csv = best.parent / "log.csv"
    pd.read_csv(log_csv).head(1).to_csv(log_csv, index=False)  # as if killed after epoch 0
    assert run("--ft-lr", "0.01") != forced and "skipped" not in caplog.text
    assert pd.read_csv(log_csv)["epoch"].tolist() == [0, 1]

    src = finetune.source_checkpoint(cfg, 0)
    stat = src.stat()
    os.utime(src, ns=(stat.st_atime_ns, best.stat().st_mtime_ns + 10**9))  # the source was retrained
    try:
        before = best.stat().st_mtime_ns
        assert run("--ft-lr", "0.01") != before and "is newer than" in caplog.text
    finally:
        os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_clear_errors(source: Config, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    untrained = write_yaml(dataclasses.replace(source, exp="untrained"), tmp_path / "u.yaml")
    assert finetune.main(["--config", str(untrained)]) == 2
    assert str(Path(source.output_dir) / "untrained" / "fold0" / "best.pt") in caplog.text
    assert "python src/train.py" in caplog.text
    assert not (Path(source.output_dir) / f"untrained_ft{FT_SIZE}").exists()

    folds = pd.read_csv(source.folds_csv)
    other = tmp_path / "folds.csv"
    folds.assign(label=folds["label"].replace("red", "crimson")).to_csv(other, index=False)
    relabelled = write_yaml(dataclasses.replace(source, folds_csv=str(other)), tmp_path / "r.yaml")
    assert finetune.main(["--config", str(relabelled), "--fold", "0"]) == 2
    assert "was trained on classes" in caplog.text

    with pytest.raises(finetune.FinetuneError, match="is the source experiment"):
        finetune.finetune_fold(dataclasses.replace(source, ft_exp=source.exp), 0)
    with pytest.raises(finetune.FinetuneError, match="exceeds the 6 layer groups"):
        finetune.finetune_fold(dataclasses.replace(source, ft_unfreeze=7, ft_exp="x"), 0)


def test_default_size_and_name() -> None:
    assert [finetune.fixres_size(s) for s in (448, 384, 160, 24)] == [576, 480, 192, 32]
    cfg = finetune.ft_config(Config(exp="b4", img_size=448), 576, "hub")
    assert (cfg.exp, cfg.img_size, cfg.pretrained) == ("b4_ft576", 576, "hub")
    assert finetune.ft_config(Config(exp="b4", ft_exp="mine"), 512, "none").exp == "mine"
