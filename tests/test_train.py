"""train.py: one fold end to end, OOF assembly, Ranger21 + SGDR correctness, resume after SIGKILL, DDP, errors.

Tiny everything: 36 coloured 40 px images, 3 classes, timm's test_efficientnet, 32 px, 1-3 epochs.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pytorch_optimizer import Ranger21
from timm.loss import SoftTargetCrossEntropy
from tiny import CLASSES, ROOT, base_cfg, fold_data, make_data, write_yaml
from torch import nn

import train
from folds import make_folds
from lib import models
from lib.config import Config, load_config
from lib.models import load_checkpoint
from lib.oof import read_oof
from lib.optim import build_optimizer, build_scheduler


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_data(root)
    return root


def cfg_for(root: Path, tmp_path: Path, **overrides) -> Config:
    """A config over the shared module data, writing its outputs under tmp_path."""
    return base_cfg(root, output_dir=str(tmp_path / "output"), **overrides)


def test_one_fold_writes_checkpoints_log_and_oof(data_root: Path, tmp_path: Path) -> None:
    cfg = cfg_for(data_root, tmp_path)
    result = train.train_fold(cfg, 1)
    out = cfg.exp_dir / "fold1"
    assert {"best.pt", "last.pt", "log.csv", "oof.npz"} <= {p.name for p in out.iterdir()}
    log = pd.read_csv(out / "log.csv")
    assert list(log.columns) == train.LOG_COLUMNS and log["epoch"].tolist() == [1, 2]
    assert log["ema_accuracy"].notna().all()  # the EMA weights are validated too
    best = load_checkpoint(out / "best.pt")
    assert best["classes"] == CLASSES and best["source"] in {"model", "ema"}
    assert best["epoch"] == result["best_epoch"] and best["data_config"]["mean"]
    folds = pd.read_csv(cfg.folds_csv)
    oof = read_oof(out / "oof.npz")
    val = folds[folds["fold"] == 1]
    assert oof["image"].tolist() == val["image"].tolist() and oof["logits"].shape == (len(val), 3)
    assert oof["classes"].tolist() == CLASSES
    assert load_config(cfg.exp_dir / "config.yaml") == cfg
    assert not (cfg.exp_dir / "oof.npz").exists()  # not every fold has run yet


def test_all_folds_assemble_oof_in_folds_order(data_root: Path, tmp_path: Path) -> None:
    cfg = cfg_for(data_root, tmp_path, epochs=3, ema=False, optimizer="adamw")
    yml = write_yaml(cfg, tmp_path / "c.yaml")
    assert train.main(["--config", str(yml), "--fold", "all"]) == 0
    oof = read_oof(cfg.exp_dir / "oof.npz")
    folds = pd.read_csv(cfg.folds_csv)
    assert oof["image"].tolist() == folds["image"].tolist()
    assert oof["fold"].tolist() == folds["fold"].tolist()
    acc = (np.array(CLASSES)[oof["logits"].argmax(1)] == folds["label"].to_numpy()).mean()
    assert acc > 0.6  # colour is trivially learnable: the loop really trains (chance is 1/3)


def test_every_fold_writes_its_oof_per_view_and_the_experiment_assembles_them(
    data_root: Path, tmp_path: Path
) -> None:
    """Each fold's best weights score its validation images under every test-time view (package.py reads
    these); once all folds have, oof_<view>.npz follows folds.csv. A resumed fold that is already complete
    writes a missing view file without training again, and keeps the one it has."""
    views = ["hflip", "vflip"]
    cfg = cfg_for(data_root, tmp_path, epochs=1, tta_views=views)
    yml = write_yaml(cfg, tmp_path / "c.yaml")
    assert train.main(["--config", str(yml), "--fold", "all"]) == 0
    folds = pd.read_csv(cfg.folds_csv)
    for k in range(3):
        val = folds[folds["fold"] == k]
        for view in views:
            part = read_oof(cfg.exp_dir / f"fold{k}" / f"oof_{view}.npz")
            assert part["image"].tolist() == val["image"].tolist() and part["logits"].shape == (len(val), 3)
    whole = {view: read_oof(cfg.exp_dir / f"oof_{view}.npz") for view in views}
    for oof in whole.values():
        assert oof["image"].tolist() == folds["image"].tolist()
        assert oof["fold"].tolist() == folds["fold"].tolist() and oof["classes"].tolist() == CLASSES
    assert not np.allclose(whole["hflip"]["logits"], whole["vflip"]["logits"], atol=1e-3)  # really two views

    fold0 = cfg.exp_dir / "fold0"
    kept, log_before = (fold0 / "oof_hflip.npz").stat().st_mtime_ns, (fold0 / "log.csv").read_text()
    (fold0 / "oof_vflip.npz").unlink()
    assert train.main(["--config", str(yml), "--fold", "0", "--resume"]) == 0
    assert (fold0 / "log.csv").read_text() == log_before  # nothing trained
    assert (fold0 / "oof_hflip.npz").stat().st_mtime_ns == kept
    refilled = read_oof(fold0 / "oof_vflip.npz")["logits"]
    before = whole["vflip"]["logits"][folds["fold"].to_numpy() == 0]
    np.testing.assert_allclose(refilled, before, rtol=1e-3, atol=1e-3)


def test_new_folds_retrained_one_by_one_assemble_only_at_the_end(tmp_path: Path) -> None:
    cfg = make_data(tmp_path, per_class=6, n_folds=2, epochs=1, ema=False)
    for fold in (0, 1):
        train.train_fold(cfg, fold)
    old = read_oof(cfg.exp_dir / "oof.npz")
    remade = dataclasses.replace(cfg, seed=cfg.seed + 1)
    make_folds(remade)  # new folds: every fold's OOF file is now stale
    new_folds = pd.read_csv(cfg.folds_csv)
    assert not np.array_equal(new_folds["fold"].to_numpy(), old["fold"])
    train.train_fold(remade, 0)  # fold 1's file is stale: no error, nothing assembled yet
    assert np.array_equal(read_oof(cfg.exp_dir / "oof.npz")["fold"], old["fold"])
    train.train_fold(remade, 1)
    assert read_oof(cfg.exp_dir / "oof.npz")["fold"].tolist() == new_folds["fold"].tolist()


def test_ranger21_weight_decay_reaches_every_parameter_tensor() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 8), nn.Linear(8, 3))
    cfg = Config(optimizer="ranger21", lr=0.1, weight_decay=0.5)
    after = {}
    for wd in (0.5, 0.0):
        m = [p.detach().clone() for p in model.parameters()]
        clone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 8), nn.Linear(8, 3))
        with torch.no_grad():
            for p, q in zip(clone.parameters(), m, strict=True):
                p.copy_(q)
        opt = build_optimizer(clone, name=cfg.optimizer, lr=cfg.lr, weight_decay=wd, total_steps=10)
        assert isinstance(opt, Ranger21)
        torch.manual_seed(1)
        clone(torch.randn(16, 4)).square().mean().backward()
        opt.step()
        after[wd] = dict(clone.named_parameters())
    decayed = {n for n, p in after[0.5].items() if p.ndim > 1}
    assert decayed == {"0.weight", "2.weight", "3.weight"}
    for name, p in after[0.5].items():
        changed = not torch.allclose(p, after[0.0][name])
        assert changed == (name in decayed), name  # every weight matrix decays; biases and norms do not


def test_applied_learning_rate_follows_sgdr_with_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    applied: list[float] = []
    original = Ranger21._step_per_param

    def spy(self, group, lr, *args, **kwargs):
        applied.append(lr)
        return original(self, group, lr, *args, **kwargs)

    monkeypatch.setattr(Ranger21, "_step_per_param", spy)
    monkeypatch.setattr(Ranger21, "can_use_foreach", lambda self, group, foreach=None: False)
    model = nn.Linear(3, 2)
    cfg = Config(lr=1.0, eta_min=0.0, sgdr_t0=2.0, sgdr_t_mult=2, warmup_epochs=1.0)
    steps_per_epoch = 5
    opt = build_optimizer(model, name=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, total_steps=60)
    sched = build_scheduler(
        opt, steps_per_epoch=steps_per_epoch, sgdr_t0=cfg.sgdr_t0, sgdr_t_mult=cfg.sgdr_t_mult, eta_min=cfg.eta_min,
        warmup_epochs=cfg.warmup_epochs,
    )
    for _ in range(5 + 10 + 20 + 3):
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    applied = applied[:: len(opt.param_groups)]  # one entry per group per step
    warm = [1e-3 + (1 - 1e-3) * i / 5 for i in range(5)]
    cycle1 = [0.5 * (1 + np.cos(np.pi * t / 10)) for t in range(10)]
    cycle2 = [0.5 * (1 + np.cos(np.pi * t / 20)) for t in range(20)]
    cycle3 = [0.5 * (1 + np.cos(np.pi * t / 40)) for t in range(3)]
    expected = warm + cycle1 + cycle2 + cycle3
    np.testing.assert_allclose(applied, expected, rtol=1e-6, atol=1e-9)
    assert applied[15] == pytest.approx(1.0)  # the restart after the first 10-step cycle


def _run_train(cfg_path: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "src" / "train.py"), "--config", str(cfg_path), "--fold", "0", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path: Path) -> None:
    cfg = make_data(tmp_path / "d", per_class=24, epochs=3, deterministic=True, workers=1)
    straight = write_yaml(dataclasses.replace(cfg, exp="straight"), tmp_path / "a.yaml")
    killed = write_yaml(dataclasses.replace(cfg, exp="killed"), tmp_path / "b.yaml")
    assert _run_train(straight).wait(timeout=600) == 0

    proc = _run_train(killed)
    last = cfg.exp_dir.parent / "killed" / "fold0" / "last.pt"
    deadline = time.time() + 600
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before it could be killed"
    time.sleep(0.3)  # inside epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert load_checkpoint(last)["epoch"] < 3

    resumed = _run_train(killed, "--resume")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "resumed from" in out
    a = load_checkpoint(cfg.exp_dir.parent / "straight" / "fold0" / "last.pt")
    b = load_checkpoint(last)
    assert b["epoch"] == 3
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    logs = [pd.read_csv(cfg.exp_dir.parent / e / "fold0" / "log.csv") for e in ("straight", "killed")]
    assert logs[1]["epoch"].tolist() == [1, 2, 3]
    np.testing.assert_allclose(logs[0]["val_loss"], logs[1]["val_loss"], rtol=1e-5)


def test_ddp_two_processes_match_one_process(data_root: Path, tmp_path: Path) -> None:
    """torchrun, 2 gloo processes x batch 4 == 1 process x batch 8 (same global batch, GroupNorm model)."""
    base = cfg_for(
        data_root, tmp_path, model="test_efficientnet_gn", epochs=1, hflip=0.0, rrc_scale=[1.0, 1.0],
        color_jitter=0.0, drop_rate=0.0, drop_path_rate=0.0, ema=False, optimizer="sgd", lr=0.05,
    )  # fmt: skip
    one = write_yaml(dataclasses.replace(base, exp="one", batch_size=8), tmp_path / "one.yaml")
    two = write_yaml(dataclasses.replace(base, exp="two", batch_size=4), tmp_path / "two.yaml")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, "src/train.py", "--config", str(one), "--fold", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    multi = subprocess.run(
        [*torchrun, "src/train.py", "--config", str(two), "--fold", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert multi.returncode == 0, multi.stderr[-3000:]
    a = load_checkpoint(Path(base.output_dir) / "one" / "fold0" / "last.pt")
    b = load_checkpoint(Path(base.output_dir) / "two" / "fold0" / "last.pt")
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    oa = read_oof(Path(base.output_dir) / "one" / "fold0" / "oof.npz")
    ob = read_oof(Path(base.output_dir) / "two" / "fold0" / "oof.npz")
    assert oa["image"].tolist() == ob["image"].tolist()  # OOF gathered from both ranks, in order
    np.testing.assert_allclose(oa["logits"], ob["logits"], rtol=1e-3, atol=1e-3)  # both rounded to float16


def test_mixup_and_the_balanced_sampler_act_in_the_training_loop(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CutMix/MixUp reach the loss as mixed soft rows, and the class-balanced sampler draws a rare class as
    often as the others (each assertion fails when its feature is switched off)."""
    cfg = cfg_for(
        data_root, tmp_path, epochs=1, cutmix_alpha=1.0, mixup_alpha=0.2, mix_prob=1.0, sampler="balanced"
    )
    data = fold_data(cfg, 0)
    rare = data.train.index[data.train["target"] == 0][2:]
    data = dataclasses.replace(data, train=data.train.drop(rare))  # class 0: 2 of the training images
    natural = float((data.train["target"] == 0).mean())
    targets: list[torch.Tensor] = []
    forward = SoftTargetCrossEntropy.forward

    def spy(self, x, target):
        targets.append(target.detach().clone())
        return forward(self, x, target)

    monkeypatch.setattr(SoftTargetCrossEntropy, "forward", spy)
    trainer = train.Trainer(cfg, 0, data, tmp_path / "t" / "fold0", 0, 1, torch.device("cpu"))
    trainer.train_one_epoch()
    mixed = torch.cat(targets)
    assert mixed.ndim == 2 and mixed.shape[1] == 3
    torch.testing.assert_close(mixed.sum(1), torch.ones(len(mixed)))
    assert ((mixed > 0.05).sum(1) >= 2).float().mean() > 0.25  # rows mixing two classes (pairs can share one)
    drawn = []
    for epoch in range(10):
        trainer.sampler.generator.manual_seed(epoch)
        drawn += list(trainer.sampler)
    share = float((data.train["target"].to_numpy()[drawn] == 0).mean())
    assert natural < 0.15 and share > 0.22  # balanced: ~1/3 of the draws, not the natural ~1/9


def test_clear_errors(data_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = cfg_for(data_root, tmp_path, epochs=1)
    yml = write_yaml(cfg, tmp_path / "c.yaml")
    assert train.main(["--config", str(yml), "--fold", "7"]) == 2
    assert "fold 7 out of range" in caplog.text
    missing = write_yaml(dataclasses.replace(cfg, folds_csv=str(tmp_path / "none.csv")), tmp_path / "m.yaml")
    assert train.main(["--config", str(missing), "--fold", "0"]) == 2
    assert "run python src/folds.py" in caplog.text

    train.train_fold(cfg, 0)
    folds = pd.read_csv(cfg.folds_csv)
    other = tmp_path / "folds_other.csv"
    folds.assign(label=folds["label"].replace("red", "crimson")).to_csv(other, index=False)
    changed = write_yaml(dataclasses.replace(cfg, folds_csv=str(other)), tmp_path / "x.yaml")
    assert train.main(["--config", str(changed), "--fold", "0", "--resume"]) == 2
    assert "trained on classes" in caplog.text

    moved = tmp_path / "folds_moved.csv"
    swap = folds["fold"].to_numpy().copy()
    first0, first1 = np.flatnonzero(swap == 0)[0], np.flatnonzero(swap == 1)[0]
    swap[first0], swap[first1] = 1, 0
    folds.assign(fold=swap).to_csv(moved, index=False)
    resplit = write_yaml(dataclasses.replace(cfg, folds_csv=str(moved)), tmp_path / "y.yaml")
    assert train.main(["--config", str(resplit), "--fold", "0", "--resume"]) == 2
    assert "another split of fold 0" in caplog.text


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_root: Path, tmp_path: Path, monkeypatch) -> None:
    cfg = cfg_for(data_root, tmp_path, epochs=1)
    train.train_fold(cfg, 0)
    last = cfg.exp_dir / "fold0" / "last.pt"
    before = last.read_bytes()
    monkeypatch.setattr(nn.CrossEntropyLoss, "forward", lambda self, x, y: x.sum() * float("nan"))
    with pytest.raises(train.TrainError, match="loss is nan"):
        train.train_fold(dataclasses.replace(cfg, epochs=2), 0, resume=True)
    assert last.read_bytes() == before


def test_precision_auto_picks_bf16_only_where_native(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: False)
    assert models.autocast_dtype("auto", cpu) is None  # emulated bf16 is far slower
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: True)
    assert models.autocast_dtype("auto", cpu) == torch.bfloat16
    assert models.autocast_dtype("bf16", cpu) == torch.bfloat16
    assert models.autocast_dtype("fp32", cpu) is None
    with pytest.raises(models.ModelError, match="fp16 needs a CUDA GPU"):
        models.autocast_dtype("fp16", cpu)
    # Inference: fp32 stays fp32; anything else is the predicting machine's own auto (fp16 included).
    assert models.inference_dtype("fp32", cpu) is None
    assert models.inference_dtype("fp16", cpu) == models.inference_dtype("bf16", cpu) == torch.bfloat16
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: False)
    assert models.inference_dtype("bf16", cpu) is None


@pytest.mark.parametrize(
    ("precision", "depthwise_fp32", "changed"), [("bf16", True, True), ("bf16", False, False), ("fp32", True, False)]
)
def test_depthwise_convolutions_train_in_fp32_only_under_bf16_on_cpu(
    data_root: Path, tmp_path: Path, precision: str, depthwise_fp32: bool, changed: bool
) -> None:
    """depthwise_fp32 (lib/models.fp32_depthwise) is applied by the Trainer exactly when it trains under bf16
    autocast on the CPU and the key is on: the depthwise layers then carry their own fp32 forward."""
    cfg = cfg_for(data_root, tmp_path, precision=precision, depthwise_fp32=depthwise_fp32, epochs=1)
    trainer = train.Trainer(cfg, 0, fold_data(cfg, 0), tmp_path / "fold0", 0, 1, torch.device("cpu"))
    layers = [m for m in trainer.model.modules() if isinstance(m, nn.Conv2d) and 1 < m.groups == m.in_channels]
    assert layers
    assert all(("forward" in m.__dict__) == changed for m in layers)


def test_fold_all_queues_folds_over_visible_gpus(data_root: Path, tmp_path: Path, monkeypatch) -> None:
    """The multi-GPU launcher, exercised on CPU: 3 folds over 2 'GPUs', one subprocess each, the third queued."""
    cfg = cfg_for(data_root, tmp_path, epochs=1, ema=False)
    yml = write_yaml(cfg, tmp_path / "c.yaml")
    monkeypatch.setattr(train, "visible_gpus", lambda: ["0", "1"])
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "src"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert train.main(["--config", str(yml), "--fold", "all"]) == 0
    for k in range(3):
        assert (cfg.exp_dir / f"fold{k}" / "best.pt").is_file()
    oof = read_oof(cfg.exp_dir / "oof.npz")
    assert oof["image"].tolist() == pd.read_csv(cfg.folds_csv)["image"].tolist()


def test_early_stop_count_is_derived_from_the_best_epoch() -> None:
    """No separate counter: a fold resumed after its best epoch keeps counting from there."""
    from types import SimpleNamespace

    def left(epoch: int, best_epoch: int, patience: int, validates: bool = True) -> bool:
        state = SimpleNamespace(
            cfg=Config(early_stop=patience),
            epoch=epoch,
            best_epoch=best_epoch,
            data=SimpleNamespace(validates=validates),
        )
        return train.Trainer.patience_left(state)

    assert left(0, 0, 1)  # nothing trained yet
    assert left(3, 3, 2) and left(4, 3, 2) and not left(5, 3, 2)
    assert left(50, 1, 0)  # 0: off
    assert left(50, 1, 2, validates=False)  # the full fit has no metric to wait for: it runs every epoch
