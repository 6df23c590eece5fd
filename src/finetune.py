"""Fine-tune the classifier of a trained experiment at a higher resolution (FixRes, decoupled retraining).

``python src/finetune.py --config configs/X.yaml [--fold K|all] [--force]`` takes every fold's ``best.pt`` of
the experiment ``exp``, freezes its backbone and retrains the classifier at ``ft_img_size`` for ``ft_epochs``
with a class-balanced sampler (``ft_sampler``: or square-root, or natural). Training at a lower resolution
than the test resolution shifts the apparent object size and the pooled feature statistics (Touvron et al.,
"Fixing the train-test resolution discrepancy", 2019); retraining only the classifier on class-balanced
batches (Kang et al., "Decoupling representation and classifier", 2020) corrects the head's bias towards
frequent classes without disturbing the representation. Options: ``ft_bn recalibrate`` re-estimates
BatchNorm statistics at the new resolution first; ``ft_unfreeze N`` also trains the backbone's last N layer
groups (timm's coarse group matcher); ``ft_augment`` trains on augmented images.

The result is a new experiment ``<output_dir>/<ft_exp>/`` (default ``<exp>_ft<size>``) with the same layout as
a trained one (``config.yaml``, ``fold<k>/{best.pt,log.csv,oof.npz}`` and ``oof_<view>.npz`` for every
test-time view of ``tta_views``, written from best.pt as package.py would compute them; the experiment's
``oof.npz`` and ``oof_<view>.npz`` once every fold is done), so stacking, packaging and prediction use it like
any other. With a frozen backbone and no augmentation the pooled features are computed once and only the
classifier runs per step (path ``features``); otherwise the whole model runs each step (path ``full``). A fold whose outputs are complete and newer than its source is
skipped; a killed fold restarts from scratch.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.lr_scheduler import CosineAnnealingLR
from torch.utils.data import DataLoader, TensorDataset

from lib.bundle import write_view_oofs
from lib.common import PipelineError, atomic_path, get_logger, progress, seed_everything
from lib.config import Config, parse_config, save_config
from lib.data import SAMPLER_POWERS, ImageDataset, class_sampler, make_loader, train_transform
from lib.layout import (
    Experiment,
    FoldData,
    FoldId,
    assemble_oofs,
    experiment,
    fold_seed,
    load_fold,
    read_folds,
    select_folds,
)
from lib.metrics import is_better, val_scores
from lib.models import (
    autocast,
    autocast_dtype,
    best_checkpoint,
    frozen_modules,
    load_checkpoint,
    model_from_checkpoint,
    predict_logits,
    save_checkpoint,
    stage_groups,
)
from lib.oof import write_oof
from lib.preprocess import Preprocessing

log = get_logger("finetune")

LOG_COLUMNS = ["epoch", "lr", "train_loss", "val_loss", "accuracy", "macro_f1", "seconds", "path"]
# Keys that change what a fine-tune produces: a finished fold made with other values is redone (ft_exp names
# the folder and ft_img_size is compared once resolved).
FT_KEYS = tuple(
    f.name
    for f in dataclasses.fields(Config)
    if f.name.startswith("ft_") and f.name not in ("ft_exp", "ft_img_size")
)
# Keys the source checkpoint fixes: the fine-tune's config must agree, or its best.pt would not rebuild.
MODEL_KEYS = ("model", "in_chans")


class FinetuneError(PipelineError, RuntimeError):
    """A fine-tune cannot start or go on; the message names the file or setting and the fix."""


# ---------------------------------------------------------------------------------------------------------
# Names and sizes.


def fixres_size(train_size: int) -> int:
    """1.25 x the training size, rounded half up to a multiple of 32 (at least 32): FixRes's ratio."""
    return max(32, int(train_size * 1.25 / 32 + 0.5) * 32)


def ft_img_size(cfg: Config, data_cfg: dict) -> int:
    """The fine-tune resolution: ``ft_img_size``, else derived from the size the source trained at."""
    return cfg.ft_img_size or fixres_size(Preprocessing.of_checkpoint(dataclasses.asdict(cfg), data_cfg).size)


def ft_config(cfg: Config, size: int, pretrained: str) -> Config:
    """The fine-tune experiment's config: the source's, renamed, at the new size (what later stages read)."""
    return dataclasses.replace(
        cfg, exp=cfg.ft_exp or f"{cfg.exp}_ft{size}", img_size=size, pretrained=pretrained
    )


def source_checkpoint(cfg: Config, fold: FoldId) -> Path:
    return experiment(cfg.output_dir, cfg.exp).best(fold)


# ---------------------------------------------------------------------------------------------------------
# Freezing.


def freeze(model: nn.Module, unfreeze: int) -> list[str]:
    """Make only the classifier and the last ``unfreeze`` layer groups trainable; their names in order."""
    head = {id(p) for p in model.get_classifier().parameters()}
    if not head:
        raise FinetuneError(f"{type(model).__name__} has no classifier parameters to fine-tune")
    names = {n for n, p in model.named_parameters() if id(p) in head}
    if unfreeze:
        groups = stage_groups(model)  # the stem first, then each stage; the head left out
        if unfreeze > len(groups):
            raise FinetuneError(
                f"ft_unfreeze {unfreeze} exceeds the {len(groups)} layer groups of {type(model).__name__}"
            )
        names |= {n for g in groups[-unfreeze:] for n in g}
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
    return [n for n, _ in model.named_parameters() if n in names]


def train_mode(model: nn.Module) -> None:
    """Training mode for the trainable part only: a module whose parameters are all frozen is evaluated.

    Its BatchNorm then keeps (and uses) its running statistics, and its dropout and stochastic depth are
    off: a frozen backbone is a fixed feature extractor, exactly what the features path computes once.
    The dropout timm applies before the classifier stays on (the model itself holds trainable parameters).
    """
    model.train()
    for module in frozen_modules(model).values():
        module.eval()


class PreLogits(nn.Module):
    """The model up to its classifier's input (pooled features), for predict_logits to batch over."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    dtype: torch.dtype | None,
    memory: torch.memory_format,
) -> int:
    """Re-estimate every BatchNorm's running statistics over ``loader`` (FixRes); returns how many.

    The statistics are reset and accumulated as an equal-weight average over the batches (momentum None);
    only BatchNorm runs in training mode, so dropout and stochastic depth do not disturb the estimate. A
    last batch of one image is left out: BatchNorm over pooled 1x1 maps (ResNeSt's split attention) has no
    batch statistics to give for it.
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    for x, _ in progress(loader, desc="BatchNorm statistics"):
        if len(x) < 2:
            continue
        x = x.to(device, non_blocking=True).contiguous(memory_format=memory)
        with autocast(device, dtype):
            model(x)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.eval()
    return len(norms)


# ---------------------------------------------------------------------------------------------------------
# The two training paths: each trains for one epoch and scores the validation images.


class _TrainingPath(Protocol):
    name: str
    steps_per_epoch: int

    def train_epoch(self, optimizer: torch.optim.Optimizer, scheduler: CosineAnnealingLR) -> float:
        """Train one epoch; the mean training loss."""
        ...

    def val_logits(self) -> np.ndarray:
        """Logits of the validation images, in folds.csv order."""
        ...


class FeaturesPath:
    """Frozen backbone, no augmentation: pooled features computed once; each step runs the classifier only."""

    name = "features"

    def __init__(self, run: FoldRun, train_loader: DataLoader, val_loader: DataLoader) -> None:
        self.run = run
        pre = PreLogits(run.model)
        self.train_x = torch.from_numpy(
            predict_logits(pre, train_loader, run.device, run.dtype, run.cfg.channels_last)
        )
        self.val_x = torch.from_numpy(
            predict_logits(pre, val_loader, run.device, run.dtype, run.cfg.channels_last)
        )
        targets = torch.tensor(run.data.train["target"].to_numpy(), dtype=torch.long)
        self.loader = DataLoader(
            TensorDataset(self.train_x, targets), batch_size=run.cfg.batch_size, sampler=run.sampler,
            shuffle=run.sampler is None, generator=torch.Generator().manual_seed(run.cfg.seed),
        )  # fmt: skip
        self.steps_per_epoch = len(self.loader)
        # The dropout timm applies before the classifier, which the full path's model.train() also applies.
        self.drop_rate = float(getattr(run.model, "drop_rate", 0.0) or 0.0)

    def train_epoch(self, optimizer: torch.optim.Optimizer, scheduler: CosineAnnealingLR) -> float:
        head = self.run.model.get_classifier()
        head.train()
        total, seen = 0.0, 0
        for x, y in progress(self.loader, desc=f"fold {self.run.fold} head"):
            x, y = x.to(self.run.device), y.to(self.run.device)
            loss = self.run.criterion(head(F.dropout(x, self.drop_rate, training=True)), y)
            total += self.run.step(loss, optimizer, scheduler) * len(x)
            seen += len(x)
        return total / max(seen, 1)

    @torch.no_grad()
    def val_logits(self) -> np.ndarray:
        head = self.run.model.get_classifier().eval()
        return torch.cat([head(x.to(self.run.device)).float().cpu() for x in self.val_x.split(1024)]).numpy()


class FullPath:
    """Unfrozen groups or augmentation: the whole model runs each step (frozen modules in eval mode)."""

    name = "full"

    def __init__(self, run: FoldRun, train_ds: ImageDataset, val_loader: DataLoader) -> None:
        self.run = run
        self.loader = make_loader(train_ds, train=True, sampler=run.sampler, **run.loader_options)
        self.val_loader = val_loader
        self.steps_per_epoch = len(self.loader)

    def train_epoch(self, optimizer: torch.optim.Optimizer, scheduler: CosineAnnealingLR) -> float:
        run = self.run
        train_mode(run.model)
        total, seen = 0.0, 0
        for x, y in progress(self.loader, desc=f"fold {run.fold} fine-tune"):
            x = x.to(run.device, non_blocking=True).contiguous(memory_format=run.memory)
            y = y.to(run.device, non_blocking=True)
            with autocast(run.device, run.dtype):
                loss = run.criterion(run.model(x), y)
            total += run.step(loss, optimizer, scheduler) * len(x)
            seen += len(x)
        return total / max(seen, 1)

    def val_logits(self) -> np.ndarray:
        return predict_logits(
            self.run.model, self.val_loader, self.run.device, self.run.dtype, self.run.cfg.channels_last
        )


# ---------------------------------------------------------------------------------------------------------
# One fold.


@dataclasses.dataclass
class FoldRun:
    """One fold's fine-tune: the source model made trainable where asked, its data at the new size."""

    cfg: Config
    fold: FoldId
    source: Path

    def __post_init__(self) -> None:
        cfg = self.cfg
        self.data: FoldData = load_fold(folds_csv=cfg.folds_csv, resized=cfg.resized_images, fold=self.fold)
        self.model, self.ckpt = model_from_checkpoint(self.source, ema=False)
        if self.ckpt["classes"] != self.data.classes:
            raise FinetuneError(
                f"{self.source} was trained on classes {self.ckpt['classes']} but {cfg.folds_csv} now has "
                f"{self.data.classes}: retrain fold {self.fold} of {cfg.exp} on the current folds.csv"
            )
        for key in MODEL_KEYS:
            if self.ckpt["config"].get(key) != getattr(cfg, key):
                raise FinetuneError(
                    f"{self.source} holds a model with {key}={self.ckpt['config'].get(key)!r} but the config says "
                    f"{getattr(cfg, key)!r}: pass the config experiment {cfg.exp} was trained with"
                )
        self.size = ft_img_size(cfg, self.ckpt["data_config"])
        self.ft_cfg = ft_config(cfg, self.size, self.ckpt["config"].get("pretrained", cfg.pretrained))
        if self.ft_cfg.exp_dir.resolve() == cfg.exp_dir.resolve():
            raise FinetuneError(
                f"ft_exp {cfg.ft_exp!r} is the source experiment: name another (or leave it empty)"
            )
        self.exp = Experiment(self.ft_cfg.exp_dir)
        self.out_dir = self.exp.fold(self.fold)
        self.loader_options = {"batch_size": cfg.batch_size, "workers": cfg.workers, "seed": cfg.seed}
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = autocast_dtype(cfg.precision, self.device)
        self.memory = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model.to(self.device, memory_format=self.memory)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        targets, power = self.data.train["target"].to_numpy(), SAMPLER_POWERS[cfg.ft_sampler]
        generator = torch.Generator().manual_seed(cfg.seed)
        self.sampler = (  # natural: none, the loaders shuffle (each image once per epoch)
            class_sampler(targets, power=power, generator=generator) if cfg.ft_sampler != "natural" else None
        )

    def complete(self) -> str | None:
        """Why this fold's fine-tune is already done (None when it must run)."""
        best, oof, log_csv = self.exp.best(self.fold), self.exp.fold_oof(self.fold), self.exp.log(self.fold)
        if not (best.is_file() and (oof.is_file() or not self.data.validates) and log_csv.is_file()):
            return None
        if self.source.stat().st_mtime_ns > best.stat().st_mtime_ns:
            log.info(f"fold {self.fold}: {self.source} is newer than {best}: fine-tuning again")
            return None
        trained = (pd.read_csv(log_csv)["epoch"] > 0).sum()
        if trained != self.cfg.ft_epochs:
            return None
        saved = load_checkpoint(best)["config"]
        if saved.get("img_size") != self.size or any(saved.get(k) != getattr(self.cfg, k) for k in FT_KEYS):
            log.info(f"fold {self.fold}: {best} was made with other ft_* settings: fine-tuning again")
            return None
        return f"{trained} epochs at {self.size} px already in {self.out_dir}"

    def step(
        self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler: CosineAnnealingLR
    ) -> float:
        """One optimizer step on ``loss``; its value."""
        if not torch.isfinite(loss):
            raise FinetuneError(
                f"fold {self.fold}: fine-tune loss is {loss.item()}: lower --ft-lr or use --precision fp32"
            )
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return loss.item()

    def _loaders(self) -> tuple[ImageDataset, DataLoader, DataLoader]:
        """The training images (augmented when ft_augment), plus eval-transform loaders of train and val."""
        cfg = self.cfg
        prep = Preprocessing.of_checkpoint(dataclasses.asdict(cfg), self.ckpt["data_config"])
        prep = dataclasses.replace(prep, size=self.size)
        plain = prep.transform()
        train_tf = plain
        if cfg.ft_augment:
            train_tf = train_transform(
                size=self.size, mean=prep.mean, std=prep.std, interpolation=prep.interpolation,
                in_chans=cfg.in_chans, **cfg.options("augment"),
            )  # fmt: skip
        paths, targets = self.data.train["path"].tolist(), self.data.train["target"].to_numpy()
        train_ds = ImageDataset(paths, targets, train_tf, cfg.in_chans)
        train_plain = make_loader(ImageDataset(paths, targets, plain, cfg.in_chans), train=False, **self.loader_options)
        val_ds = ImageDataset(
            self.data.val["path"].tolist(), self.data.val["target"].to_numpy(), plain, cfg.in_chans
        )
        return train_ds, train_plain, make_loader(val_ds, train=False, **self.loader_options)

    def fit(self) -> dict:
        cfg = self.cfg
        trainable = freeze(self.model, cfg.ft_unfreeze)
        trained = "classifier" + (f" + backbone from {trainable[0]} on" if cfg.ft_unfreeze else "")
        total = sum(p.numel() for p in self.model.parameters())
        count = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        train_ds, train_plain, val_loader = self._loaders()
        if cfg.ft_bn == "recalibrate":
            n = recalibrate_bn(self.model, train_plain, self.device, self.dtype, self.memory)
            log.info(f"fold {self.fold}: {n} BatchNorm layers re-estimated at {self.size} px, then frozen")
        use_features = cfg.ft_unfreeze == 0 and not cfg.ft_augment
        why = (
            "frozen backbone, no augmentation: pooled features computed once, the classifier trains on them"
            if use_features
            else f"{'augmentation' if cfg.ft_augment else f'last {cfg.ft_unfreeze} layer group(s) trainable'}: "
            "the whole model runs each step"
        )
        log.info(
            f"fold {self.fold}: path {'features' if use_features else 'full'} ({why}); {len(self.data.train)} "
            f"train / {len(self.data.val)} val images at {self.size} px, {count:,} of {total:,} parameters "
            f"trainable ({trained}), {cfg.ft_sampler} sampling"
        )
        start = time.perf_counter()
        path: _TrainingPath
        if use_features:
            path = FeaturesPath(self, train_plain, val_loader)
            log.info(f"fold {self.fold}: pooled features computed in {time.perf_counter() - start:.1f} s")
        else:
            path = FullPath(self, train_ds, val_loader)
        groups = [g for g in param_groups_weight_decay(self.model, cfg.weight_decay) if g["params"]]
        optimizer = torch.optim.AdamW(groups, lr=cfg.ft_lr)
        scheduler = CosineAnnealingLR(optimizer, T_max=max(1, cfg.ft_epochs * path.steps_per_epoch))
        return self._epochs(path, optimizer, scheduler)

    def _epochs(
        self, path: _TrainingPath, optimizer: torch.optim.Optimizer, scheduler: CosineAnnealingLR
    ) -> dict:
        cfg, targets = self.cfg, self.data.val["target"].to_numpy()
        key = "val_loss" if cfg.val_metric == "loss" else cfg.val_metric
        rows: list[dict] = []
        best: float | None = None
        best_epoch = 0
        # Epoch 0 scores the source head at the new size, untrained; the full fit has nothing to score it on.
        for epoch in range(0 if self.data.validates else 1, cfg.ft_epochs + 1):
            start = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"] if epoch else float("nan")
            loss = path.train_epoch(optimizer, scheduler) if epoch else float("nan")
            logits = path.val_logits() if self.data.validates else None
            scores = val_scores(logits, targets, self.data.classes) if logits is not None else {}
            row = {"epoch": epoch, "lr": lr, "train_loss": loss, **scores}
            row.update(seconds=time.perf_counter() - start, path=path.name)
            improved = epoch > 0 and (
                is_better(cfg.val_metric, row[key], best) if self.data.validates else epoch == cfg.ft_epochs
            )
            if improved:
                best, best_epoch = row.get(key), epoch
                self._save_best(epoch, best, logits)
            rows.append(row)
            # Written after best.pt and oof.npz: a log with every epoch means a finished fold.
            with atomic_path(self.exp.log(self.fold)) as tmp:
                pd.DataFrame(rows).reindex(columns=LOG_COLUMNS).to_csv(tmp, index=False)
            log.info(
                f"fold {self.fold} epoch {epoch}/{cfg.ft_epochs}"
                + (f": lr {lr:.2e} train {loss:.4f}" if epoch else " (source head, untrained)")
                + (
                    f" val {row['val_loss']:.4f} acc {row['accuracy']:.4f} f1 {row['macro_f1']:.4f}"
                    if scores
                    else " no validation (full fit)"
                )
                + f" | {row['seconds']:.1f} s"
                + (" *" if improved and self.data.validates else "")
            )
        return {"best": best, "best_epoch": best_epoch, "path": path.name, "exp": self.ft_cfg.exp}

    def _save_best(self, epoch: int, metric: float | None, logits: np.ndarray | None) -> None:
        state = best_checkpoint(
            self.model, epoch=epoch, metric=metric, classes=self.data.classes,
            config=dataclasses.asdict(self.ft_cfg), data_config=self.ckpt["data_config"], fold=self.fold,
        )  # fmt: skip
        save_checkpoint(self.exp.best(self.fold), state)
        if logits is not None:
            write_oof(self.exp.fold_oof(self.fold), self.data.val, logits, self.data.classes, **self.cfg.store_options())


def finetune_fold(cfg: Config, fold: FoldId, force: bool = False) -> dict | None:
    """Fine-tune one fold of ``cfg.exp`` into the fine-tune experiment; None when it was already done."""
    source = source_checkpoint(cfg, fold)
    if not source.is_file():
        raise FinetuneError(_missing_message(cfg, [fold]))
    seed_everything(fold_seed(cfg.seed, fold))
    run = FoldRun(cfg, fold, source)
    done = None if force else run.complete()
    if done:
        log.info(f"fold {fold}: skipped, {done} (--force redoes it)")
        result = None
    else:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        run.exp.log(fold).unlink(missing_ok=True)  # a killed redo must not look complete
        save_config(run.ft_cfg, run.exp.config)
        result = run.fit()
    if run.data.validates:  # under each test-time view too, while the fold is at hand (package reads them)
        write_view_oofs(
            run.exp.best(fold), val=run.data.val, classes=run.data.classes,
            files=run.exp.fold_view_oofs(fold, cfg.tta_views), device=run.device, workers=cfg.workers,
            seed=cfg.seed, **cfg.store_options(),
        )  # fmt: skip
    assemble_oofs(run.exp, read_folds(cfg.folds_csv), views=cfg.tta_views, **cfg.store_options())
    return result


def _missing_message(cfg: Config, folds: list[FoldId]) -> str:
    paths = ", ".join(str(source_checkpoint(cfg, k)) for k in folds)
    which = "--fold all" if len(folds) > 1 else f"--fold {folds[0]}"
    return (
        f"{paths} not found: the fine-tune starts from the trained fold(s) of experiment {cfg.exp!r}; train them "
        f"first (python src/train.py --config <your config> {which}) or set --exp to a trained experiment"
    )


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fold", default="all",
        help="fold index to fine-tune, 'full' (the full fit), or 'all' (every fold, then full with full_fit) "
        "(default: all)",
    )  # fmt: skip
    parser.add_argument("--force", action="store_true", help="redo folds whose fine-tune is already complete")


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(argv, __doc__.splitlines()[0], _add_arguments, stage="finetune")
    try:
        folds = select_folds(args.fold, cfg.folds_csv, full_fit=cfg.full_fit)
        missing = [k for k in folds if not source_checkpoint(cfg, k).is_file()]
        if missing:  # before any work: a run that would stop half-way says so at once
            raise FinetuneError(_missing_message(cfg, missing))
        for fold in folds:
            finetune_fold(cfg, fold, args.force)
    except PipelineError as e:
        log.error(str(e))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
