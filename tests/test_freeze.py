"""freeze_stages: the stem and first N stages of the backbone stay fixed (weights and BatchNorm statistics),
the optimiser never sees them, checkpoints still load into an unfrozen model, resume works, and a stage
count the model lacks is a clear error. Tiny data and timm's test models, as in test_train.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from tiny import base_cfg, fold_data, make_data, write_yaml

import train
from lib import models
from lib.config import Config, ConfigError
from lib.models import ModelError, load_checkpoint

# What freeze_stages 2 freezes, spelled out per architecture (stem + 2 stages of timm's coarse groups).
FROZEN_2 = {
    "test_efficientnet": ("conv_stem.", "bn1.", "blocks.0.", "blocks.1."),
    "test_resnet": ("conv1.", "bn1.", "layer1.", "layer2."),
}
FROZEN = FROZEN_2["test_efficientnet"]  # base_cfg's model


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_data(root)
    return root


def cfg_for(root: Path, tmp_path: Path, **overrides) -> Config:
    """base_cfg over the shared module data with freeze_stages 2, one epoch, outputs under tmp_path."""
    settings = {"output_dir": str(tmp_path / "output"), "freeze_stages": 2, "epochs": 1, "tta_views": []}
    return base_cfg(root, **(settings | overrides))


def trainer_for(cfg: Config, tmp_path: Path) -> train.Trainer:
    return train.Trainer(cfg, 0, fold_data(cfg, 0), tmp_path / "t" / "fold0", 0, 1, torch.device("cpu"))


def test_frozen_stages_and_their_batchnorm_statistics_do_not_move(data_root: Path, tmp_path: Path) -> None:
    """An epoch under bf16 autocast, channels_last and EMA: the stem, blocks.0 and blocks.1 (weights and
    BatchNorm running statistics) are bit-identical in the model and its EMA, every other parameter moved."""
    cfg = cfg_for(data_root, tmp_path, precision="bf16", channels_last=True, ema=True)
    trainer = trainer_for(cfg, tmp_path)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train_one_epoch()
    assert trainer.step > 0
    for which, state in (("model", trainer.model.state_dict()), ("ema", trainer.ema.module.state_dict())):
        frozen = [k for k in state if k.startswith(FROZEN)]
        assert "bn1.running_mean" in frozen and "blocks.1.0.bn1.running_var" in frozen
        for key in frozen:
            assert torch.equal(state[key], before[key]), f"{which} {key} moved"
        assert not torch.equal(state["bn2.running_mean"], before["bn2.running_mean"]), which
    trained = dict(trainer.model.named_parameters())
    unchanged = [n for n, p in trained.items() if not n.startswith(FROZEN) and torch.equal(p, before[n])]
    assert not unchanged, f"trainable parameters that did not move: {unchanged}"


@pytest.mark.parametrize("optimizer", ["ranger21", "adamw", "sgd"])
def test_the_optimizer_holds_no_frozen_parameter(data_root: Path, tmp_path: Path, optimizer: str) -> None:
    """Exactly the unfrozen parameters, for every optimiser (sgd without weight decay too)."""
    cfg = cfg_for(data_root, tmp_path, optimizer=optimizer, weight_decay=0.0 if optimizer == "sgd" else 1e-4)
    trainer = trainer_for(cfg, tmp_path)
    held = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    names = {n for n, p in trainer.model.named_parameters() if id(p) in held}
    every = [n for n, _ in trainer.model.named_parameters()]
    assert names == {n for n in every if not n.startswith(FROZEN)}
    assert all(p.requires_grad == (n in names) for n, p in trainer.model.named_parameters())


def test_a_frozen_run_loads_into_an_unfrozen_model_and_resumes(data_root: Path, tmp_path: Path) -> None:
    """best.pt loads strictly into create_model's unfrozen network (what package.py, predict.py and
    finetune.py build); --resume keeps the stages frozen; resuming with another freeze_stages is refused."""
    cfg = cfg_for(data_root, tmp_path)
    train.train_fold(cfg, 0)
    fold = cfg.exp_dir / "fold0"
    best = load_checkpoint(fold / "best.pt")
    models.create_model(cfg.model, num_classes=3).load_state_dict(best["model"], strict=True)
    models.model_from_checkpoint(fold / "best.pt")
    first = load_checkpoint(fold / "last.pt")

    train.train_fold(dataclasses.replace(cfg, epochs=2), 0, resume=True)
    second = load_checkpoint(fold / "last.pt")
    assert second["epoch"] == 2 and [row["epoch"] for row in second["log"]] == [1, 2]
    for part in ("model", "ema"):
        for key, value in first[part].items():
            assert torch.equal(value, second[part][key]) == key.startswith(FROZEN), f"{part} {key}"
    with pytest.raises(train.TrainError, match="trained with freeze_stages 2, the config now says 1"):
        train.train_fold(dataclasses.replace(cfg, epochs=3, freeze_stages=1), 0, resume=True)


@pytest.mark.parametrize(("arch", "stages"), [("test_efficientnet", 5), ("test_resnet", 4)])
def test_stages_are_timm_groups_and_too_many_is_a_clear_error(arch: str, stages: int) -> None:
    """A stage is one of timm's coarse layer groups after the stem, whatever the architecture; the last
    stage always trains, so N = the model's stage count is refused with the key and the valid range."""
    model = models.create_model(arch, num_classes=3)
    outer = models.freeze_stages(model, 2)
    assert set(outer) == {prefix.rstrip(".") for prefix in FROZEN_2[arch]}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith(FROZEN_2[arch])}
    assert models.freeze_stages(models.create_model(arch, num_classes=3), stages - 1)  # the most allowed
    with pytest.raises(ModelError, match=rf"freeze_stages {stages} is out of range .*: 0\.\.{stages - 1} "):
        models.freeze_stages(models.create_model(arch, num_classes=3), stages)


def test_a_negative_or_too_large_freeze_stages_stops_the_stage(
    data_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ConfigError, match="freeze_stages must be >= 0"):
        cfg_for(data_root, tmp_path, freeze_stages=-1)
    yml = write_yaml(cfg_for(data_root, tmp_path, freeze_stages=9), tmp_path / "c.yaml")
    assert train.main(["--config", str(yml), "--fold", "0"]) == 2
    assert "freeze_stages 9 is out of range for EfficientNet: 0..4" in caplog.text
