"""Train one cross-validation fold of a timm backbone and keep its out-of-fold (OOF) logits.

``python src/train.py --config configs/demo.yaml --fold 0`` (``--fold all``: every fold; on a machine with
several GPUs the folds run concurrently, one per GPU). One fold on several GPUs or nodes:
``torchrun --nproc_per_node 4 src/train.py --fold 0`` (lib/launch.py).

Ranger21 or AdamW/SGD driven per step by SGDR after an optional linear warm-up (lib/optim.py); bf16/fp16
autocast, channels_last, frozen early stages (``freeze_stages``), gradient clipping and accumulation,
CutMix/MixUp, label smoothing, model EMA, early stopping, square-root or class-balanced sampling and a
logit-adjusted loss for long-tailed labels;
``--soft-labels`` (distill.py's file) trains on soft targets. Per fold it writes (lib/layout.py) ``best.pt``
(weights of the best validation epoch, EMA or raw), ``last.pt`` (everything ``--resume`` needs), ``log.csv``
and ``oof.npz``; at the end of the fold, ``oof_<view>.npz`` for every test-time view of ``tta_views`` (best.pt
run over the validation images as package.py and predict.py run it, so package.py need not); once every fold
has its file, the experiment's ``oof.npz`` and ``oof_<view>.npz`` aligned with folds.csv.

With ``full_fit`` (``--fold full``; ``--fold all`` trains it after the folds) the same recipe trains once more on
every image of folds.csv into ``full/``: no validation, so ``best.pt`` is the last epoch's weights (EMA where
on) and no OOF is written. The folds' OOF then stands for it in stacking and distillation, and package.py
ships it in place of the fold models (the usual Kaggle refit on all the training data once CV has fixed the
recipe).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DistributedSampler, Subset

from lib.bundle import write_view_oofs
from lib.common import PipelineError, atomic_path, get_logger, progress, seed_everything
from lib.config import Config, parse_config, save_config
from lib.data import SAMPLER_POWERS, ImageDataset, class_prior, class_sampler, make_loader, train_transform
from lib.launch import gather_rows, run_folds_in_parallel, setup_distributed, visible_gpus
from lib.layout import (
    BEST,
    FULL,
    LAST,
    LOG,
    OOF,
    Experiment,
    FoldData,
    FoldId,
    assemble_oofs,
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
    create_model,
    data_config,
    fp32_depthwise,
    freeze_stages,
    load_checkpoint,
    predict_logits,
    save_checkpoint,
)
from lib.oof import write_oof
from lib.optim import build_optimizer, build_scheduler
from lib.preprocess import Preprocessing

log = get_logger("train")

LOG_COLUMNS = [
    "epoch", "lr", "train_loss", "val_loss", "accuracy", "macro_f1",
    "ema_val_loss", "ema_accuracy", "ema_macro_f1", "images_per_s", "data_wait", "seconds",
]  # fmt: skip


class TrainError(PipelineError, RuntimeError):
    """Training cannot start or go on; the message names the file or setting and the fix."""


# ---------------------------------------------------------------------------------------------------------
# Reproducibility and resumable state.


def rng_state() -> dict:
    """RNG states as plain types, so checkpoints stay loadable with weights_only=True."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------------
# The training loss.


class LogitAdjustedLoss(nn.Module):
    """``base(logits + offset, target)`` with ``offset`` = tau x log(class prior), float32 [C].

    The logit-adjusted loss of Menon et al., "Long-tail learning via logit adjustment" (ICLR 2021): a
    frequent class must win by a margin of tau x log(prior ratio) during training, so the plain logits the
    model predicts favour rare classes as a balanced error wants. Any base loss of (logits [N, C], target):
    cross-entropy on int [N] targets, or SoftTargetCrossEntropy on [N, C] soft rows (MixUp, soft labels).
    """

    def __init__(self, base: nn.Module, offset: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("offset", offset)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.base(logits + self.offset, target)


def training_loss(*, soft: bool, label_smoothing: float, prior: np.ndarray, tau: float) -> nn.Module:
    """The loss train.py minimises on (logits [N, C], targets).

    ``soft``: SoftTargetCrossEntropy on [N, C] float target rows (MixUp/CutMix or soft labels, already
    smoothed); otherwise cross-entropy with ``label_smoothing`` on int [N] class indices. ``tau`` != 0 makes
    it logit-adjusted (:class:`LogitAdjustedLoss`) with ``prior`` float [C] (all > 0, e.g.
    lib/data.class_prior of the training fold's targets).
    """
    base = SoftTargetCrossEntropy() if soft else nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    if tau == 0:
        return base
    return LogitAdjustedLoss(base, torch.from_numpy(tau * np.log(prior)).float())


# ---------------------------------------------------------------------------------------------------------
# One fold's training loop.


@dataclass
class Trainer:
    """Everything one fold's training loop touches, so resume can save and restore it as one unit.

    It writes best.pt, last.pt, log.csv and oof.npz (lib/layout.py's names) into ``out_dir``.
    """

    cfg: Config
    fold: FoldId
    data: FoldData
    out_dir: Path
    rank: int
    world: int
    device: torch.device

    def __post_init__(self) -> None:
        self._build_model()
        self._build_loaders()
        self._build_optimisation()
        self.epoch = 0
        self.step = 0
        self.best: float | None = None
        self.best_epoch = 0
        self.log_rows: list[dict] = []

    def _build_model(self) -> None:
        """The model (with the pretrained weights the config names), its preprocessing, frozen stages,
        precision, EMA."""
        cfg = self.cfg
        self.model = create_model(
            cfg.model, num_classes=self.data.num_classes, pretrained=cfg.pretrained, in_chans=cfg.in_chans,
            drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate,
        )  # fmt: skip
        self.data_cfg = data_config(self.model)
        self.prep = Preprocessing.of_checkpoint(asdict(cfg), self.data_cfg)  # what validation and predict see
        self.img_size = self.prep.size
        self.memory = self.prep.memory_format
        self.model.to(self.device, memory_format=self.memory)
        if self.world > 1 and cfg.sync_bn:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        # After the SyncBatchNorm swap, so the modules kept in eval mode are the ones the model runs; before
        # the optimiser and DDP are built: both then take only the parameters that still require grad.
        self.frozen = freeze_stages(self.model, cfg.freeze_stages)
        if self.frozen and self.rank == 0:
            self._log_frozen()
        self.dtype = autocast_dtype(cfg.precision, self.device)
        if cfg.depthwise_fp32 and self.dtype == torch.bfloat16 and self.device.type == "cpu":
            layers = fp32_depthwise(self.model)
            if layers and self.rank == 0:
                log.info(f"fold {self.fold}: {layers} depthwise convolutions train in fp32 (depthwise_fp32)")
        self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay) if cfg.ema else None

    def _log_frozen(self) -> None:
        """One line naming what freeze_stages froze and its share of the parameters."""
        params = list(self.model.parameters())
        total, fixed = sum(p.numel() for p in params), sum(p.numel() for p in params if not p.requires_grad)
        n = self.cfg.freeze_stages
        log.info(
            f"fold {self.fold}: freeze_stages {n}: stem + {n} stage(s) frozen ({', '.join(self.frozen)}), "
            f"{fixed / 1e6:.2f}M of {total / 1e6:.2f}M parameters; their BatchNorm statistics are kept"
        )

    def _build_loaders(self) -> None:
        """Augmented training images (sampler: shuffled or class-balanced); this rank's validation shard."""
        cfg, prep = self.cfg, self.prep
        augment = train_transform(
            size=prep.size, mean=prep.mean, std=prep.std, interpolation=prep.interpolation,
            in_chans=cfg.in_chans, **cfg.options("augment"),
        )  # fmt: skip
        self.train_ds = ImageDataset(self.data.train["path"].tolist(), self.data.train_targets, augment, cfg.in_chans)
        val_ds = ImageDataset(
            self.data.val["path"].tolist(), self.data.val["target"].to_numpy(), prep.transform(), cfg.in_chans
        )
        self.val_indices = np.arange(len(val_ds))[self.rank :: self.world]
        loader = {"batch_size": cfg.batch_size, "workers": cfg.workers, "seed": cfg.seed}
        self.val_loader = make_loader(Subset(val_ds, self.val_indices.tolist()), train=False, **loader)
        self.sampler = self._train_sampler()
        self.train_loader = make_loader(self.train_ds, train=True, sampler=self.sampler, **loader)
        self.steps_per_epoch = len(self.train_loader) // cfg.accum_steps
        if self.steps_per_epoch == 0:
            raise TrainError(
                f"fold {self.fold}: {len(self.train_ds)} training images make no full step of batch "
                f"{cfg.batch_size} x accumulation {cfg.accum_steps} x {self.world} process(es): lower --batch-size"
            )

    def _build_optimisation(self) -> None:
        """Optimiser, SGDR schedule, grad scaler (fp16), MixUp/CutMix, the loss, and the wrapped network."""
        cfg = self.cfg
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.optimizer = build_optimizer(
            self.model, name=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
            total_steps=cfg.epochs * self.steps_per_epoch,
        )  # fmt: skip
        self.scheduler = build_scheduler(
            self.optimizer, steps_per_epoch=self.steps_per_epoch, sgdr_t0=cfg.sgdr_t0,
            sgdr_t_mult=cfg.sgdr_t_mult, eta_min=cfg.eta_min, warmup_epochs=cfg.warmup_epochs,
        )  # fmt: skip
        self.mixup = self._mixup()
        soft = self.mixup is not None or self.data.soft is not None
        # The prior the loss adjusts for is the class distribution the sampler actually feeds the model.
        targets, power = self.data.train["target"].to_numpy(), SAMPLER_POWERS[cfg.sampler]
        prior = class_prior(targets, num_classes=self.data.num_classes, power=power)
        self.criterion = training_loss(
            soft=soft, label_smoothing=cfg.label_smoothing, prior=prior, tau=cfg.logit_adjust_tau
        ).to(self.device)
        self.net: nn.Module = torch.compile(self.model) if cfg.compile else self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.net, device_ids=ids)

    def _train_sampler(self):
        """Square-root or class-balanced draws (lib/data.class_sampler), or a natural shuffle seeded by
        (seed, epoch) that DDP ranks split: the same global batches whatever the number of processes."""
        cfg = self.cfg
        if cfg.sampler != "natural":
            if self.world > 1:
                raise TrainError(
                    f"sampler {cfg.sampler} is not supported with DDP: train one fold per GPU instead "
                    "(or use sampler natural)"
                )
            generator = torch.Generator().manual_seed(cfg.seed)
            targets = self.data.train["target"].to_numpy()
            return class_sampler(targets, power=SAMPLER_POWERS[cfg.sampler], generator=generator)
        return DistributedSampler(
            self.train_ds, self.world, self.rank, shuffle=True, seed=cfg.seed, drop_last=True
        )

    def _mixup(self) -> Mixup | None:
        cfg = self.cfg
        if (cfg.mixup_alpha <= 0 and cfg.cutmix_alpha <= 0) or cfg.mix_prob <= 0:
            return None
        if cfg.batch_size % 2:
            raise TrainError(f"CutMix/MixUp need an even --batch-size, got {cfg.batch_size}")
        # Soft labels are already smoothed; timm mixes dense target rows (lam·t + (1-lam)·t.flip(0)) on its
        # multi-label path, which with zero smoothing is exactly the mix of two soft labels.
        soft = self.data.soft is not None
        return Mixup(
            mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, prob=cfg.mix_prob,
            label_smoothing=0.0 if soft else cfg.label_smoothing, num_classes=self.data.num_classes,
            multi_label=soft,
        )  # fmt: skip

    # -- resumable state ----------------------------------------------------------------------------------

    def state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "log": self.log_rows,
            "rng": rng_state(),
            "classes": self.data.classes,
            "config": asdict(self.cfg),
            "data_config": self.data_cfg,
            "fold": self.fold,
            "split": self.split_digest(),
        }

    def split_digest(self) -> str:
        """A digest of this fold's validation images (the full fit's: its training images): resuming on a
        changed split would leak."""
        names = "\n".join(sorted((self.data.val if self.data.validates else self.data.train)["image"])).encode()
        return hashlib.blake2b(names, digest_size=16).hexdigest()

    def load_state(self, ckpt: dict, path: Path) -> None:
        if ckpt.get("classes") != self.data.classes:
            raise TrainError(
                f"{path} was trained on classes {ckpt.get('classes')} but folds.csv now has {self.data.classes}:"
                " train afresh without --resume (or restore the old folds.csv)"
            )
        if ckpt.get("split") != self.split_digest():
            raise TrainError(
                f"{path} was trained on another split of fold {self.fold} than {self.cfg.folds_csv} now holds:"
                " train afresh without --resume (or restore the old folds.csv)"
            )
        frozen = ckpt["config"].get("freeze_stages", 0)
        if frozen != self.cfg.freeze_stages:  # the optimiser state holds only the parameters that trained
            raise TrainError(
                f"{path} was trained with freeze_stages {frozen}, the config now says {self.cfg.freeze_stages}: "
                f"resume with freeze_stages {frozen} or train afresh without --resume"
            )
        self.model.load_state_dict(ckpt["model"])
        if self.ema and ckpt.get("ema") is not None:
            self.ema.module.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.step = ckpt["epoch"], ckpt["step"]
        self.best, self.best_epoch, self.log_rows = ckpt["best"], ckpt["best_epoch"], list(ckpt["log"])
        set_rng_state(ckpt["rng"])

    # -- loops ---------------------------------------------------------------------------------------------

    def open_epoch(self) -> None:
        """Training mode (frozen stages excepted), this epoch's sampling seeds, cleared gradients."""
        self.net.train()
        for module in self.frozen.values():  # frozen stages stay a fixed feature extractor (freeze_stages)
            module.eval()
        # Sampling and augmentation seeds come from (seed, epoch): a resumed run replays the epoch exactly.
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(self.epoch)
        else:
            self.sampler.generator.manual_seed(self.cfg.seed * 1000 + self.epoch)
        self.train_loader.generator.manual_seed(self.cfg.seed * 1000 + self.epoch)
        self.optimizer.zero_grad(set_to_none=True)

    def train_one_epoch(self) -> dict[str, float]:
        cfg = self.cfg
        self.open_epoch()
        losses: deque[float] = deque(maxlen=50)
        total_loss, seen, wait = 0.0, 0, 0.0
        usable = self.steps_per_epoch * cfg.accum_steps
        start = tick = time.perf_counter()
        bar = progress(self.train_loader, total=usable, desc=f"fold {self.fold} epoch {self.epoch + 1}")
        for i, (x, y) in enumerate(bar):
            if i >= usable:
                break
            wait += time.perf_counter() - tick
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory)
            y = y.to(self.device, non_blocking=True)
            if self.mixup:
                x, y = self.mixup(x, y)
            with autocast(self.device, self.dtype):
                loss = self.criterion(self.net(x), y)
            if not torch.isfinite(loss):
                raise TrainError(
                    f"fold {self.fold} epoch {self.epoch + 1}: loss is {loss.item()} — stopping; last.pt keeps the "
                    "last good epoch. Lower --lr, use --precision fp32 or a smaller --grad-clip"
                )
            self.scaler.scale(loss / cfg.accum_steps).backward()
            if (i + 1) % cfg.accum_steps == 0:
                self._optimizer_step()
            total_loss += loss.item() * len(x)
            seen += len(x)
            losses.append(loss.item())
            if hasattr(bar, "set_postfix"):
                rate = seen * self.world / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{np.mean(losses):.4f}", lr=f"{self.lr():.2e}", img_s=f"{rate:.0f}")
            tick = time.perf_counter()
        seconds = time.perf_counter() - start
        return {
            "train_loss": total_loss / max(seen, 1),
            "images_per_s": seen * self.world / seconds,
            "data_wait": wait / seconds,
        }

    def _optimizer_step(self) -> None:
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        if self.ema:
            self.ema.update(self.model, step=self.step)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def validate(self, model: nn.Module) -> np.ndarray:
        """Logits of the whole validation set (each rank scores a shard; gathered in folds.csv order)."""
        logits = predict_logits(model, self.val_loader, self.device, self.dtype, self.cfg.channels_last)
        return gather_rows(self.val_indices, logits, self.world)[1]

    def fit(self) -> dict:
        cfg = self.cfg
        while self.epoch < cfg.epochs and self.patience_left():
            start = time.perf_counter()
            lr = self.lr()
            row: dict[str, float] = {"epoch": self.epoch + 1, "lr": lr, **self.train_one_epoch()}
            # The full fit keeps the last epoch: the averaged weights where EMA is on, as folds usually pick.
            source, logits, value = (
                self.score_epoch(row) if self.data.validates else ("ema" if self.ema else "model", None, None)
            )
            row["seconds"] = time.perf_counter() - start
            self.epoch += 1
            self.log_rows.append(row)
            # The full fit writes best.pt once, at its last epoch (before last.pt: a kill in between redoes it).
            improved = is_better(cfg.val_metric, value, self.best) if self.data.validates else self.epoch == cfg.epochs
            if improved:
                self.best, self.best_epoch = value, self.epoch
            if self.rank == 0:
                if improved:
                    self._save_best(source, logits)
                save_checkpoint(self.out_dir / LAST, self.state())
                self._write_log()
            log.info(self._epoch_line(row, lr, improved))
        if not self.patience_left():
            stale = self.epoch - self.best_epoch
            log.info(f"fold {self.fold}: no better {cfg.val_metric} for {stale} epochs: early stop")
        return {"best": self.best, "best_epoch": self.best_epoch}

    def score_epoch(self, row: dict[str, float]) -> tuple[str, np.ndarray, float]:
        """Validate the weights and their EMA into ``row``; returns the better one's source, its validation
        logits and its ``val_metric`` value."""
        targets = self.data.val["target"].to_numpy()
        candidates = {"model": self.validate(self.model)}
        row.update(val_scores(candidates["model"], targets, self.data.classes))
        if self.ema:
            candidates["ema"] = self.validate(self.ema.module)
            ema_scores = val_scores(candidates["ema"], targets, self.data.classes)
            row.update({f"ema_{k}": v for k, v in ema_scores.items()})
        key = "val_loss" if self.cfg.val_metric == "loss" else self.cfg.val_metric
        pick = min if key == "val_loss" else max
        source = pick(candidates, key=lambda s: row[_col(s, key)])
        return source, candidates[source], row[_col(source, key)]

    def _epoch_line(self, row: dict[str, float], lr: float, improved: bool) -> str:
        if self.data.validates:
            scores = f"val {row['val_loss']:.4f} acc {row['accuracy']:.4f} f1 {row['macro_f1']:.4f}" + (
                f" | ema acc {row['ema_accuracy']:.4f} f1 {row['ema_macro_f1']:.4f}" if self.ema else ""
            )
        else:
            scores = "no validation (full fit)"
        return (
            f"fold {self.fold} epoch {self.epoch}/{self.cfg.epochs}: lr {lr:.2e} train {row['train_loss']:.4f} "
            f"{scores} | {row['images_per_s']:.0f} img/s, data wait {row['data_wait']:.0%}, {row['seconds']:.0f} s"
            + (" *" if improved and self.data.validates else "")
        )

    def patience_left(self) -> bool:
        """Early stopping, derived from the epoch of the best metric so a resumed fold keeps its count."""
        return (
            not self.cfg.early_stop
            or not self.data.validates
            or self.epoch - self.best_epoch < self.cfg.early_stop
        )

    def _save_best(self, source: str, logits: np.ndarray | None) -> None:
        weights = self.ema.module if source == "ema" else self.model
        state = best_checkpoint(
            weights, source=source, epoch=self.epoch, metric=self.best, classes=self.data.classes,
            config=asdict(self.cfg), data_config=self.data_cfg, fold=self.fold,
        )  # fmt: skip
        save_checkpoint(self.out_dir / BEST, state)
        if logits is not None:
            write_oof(
                self.out_dir / OOF, self.data.val, logits, self.data.classes, **self.cfg.store_options()
            )

    def _write_log(self) -> None:
        with atomic_path(self.out_dir / LOG) as tmp:
            pd.DataFrame(self.log_rows).reindex(columns=LOG_COLUMNS).to_csv(tmp, index=False)


def _col(source: str, key: str) -> str:
    return key if source == "model" else f"ema_{key}"


# ---------------------------------------------------------------------------------------------------------
# OOF logits per test-time view (package.py reads them instead of running every fold over the training set).


def write_fold_oofs(cfg: Config, exp: Experiment, fold: int, data: FoldData, device: torch.device) -> None:
    """Fold ``fold``'s validation logits under every view of ``tta_views`` but orig (oof.npz is that one)
    from its best.pt, then the experiment's OOF files once every fold has its own."""
    write_view_oofs(
        exp.best(fold), val=data.val, classes=data.classes, files=exp.fold_view_oofs(fold, cfg.tta_views),
        device=device, workers=cfg.workers, seed=cfg.seed, **cfg.store_options(),
    )  # fmt: skip
    assemble_oofs(exp, read_folds(cfg.folds_csv), views=cfg.tta_views, **cfg.store_options())


# ---------------------------------------------------------------------------------------------------------
# Entry points.


def train_fold(cfg: Config, fold: FoldId, resume: bool = False) -> dict:
    """Train one fold, or the full fit (under torchrun: this process's share of it); returns its best metric
    and epoch (the full fit's: None and its last epoch)."""
    rank, world, device = setup_distributed()
    seed_everything(fold_seed(cfg.seed, fold))
    torch.backends.cudnn.benchmark = not cfg.deterministic
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    data = load_fold(
        folds_csv=cfg.folds_csv, resized=cfg.resized_images, fold=fold, soft_labels=cfg.soft_labels or None
    )
    exp = Experiment(cfg.exp_dir)
    if rank == 0:
        exp.fold(fold).mkdir(parents=True, exist_ok=True)
        save_config(cfg, exp.config)
    trainer = Trainer(cfg, fold, data, exp.fold(fold), rank, world, device)
    last = exp.last(fold)
    if resume and last.is_file():
        trainer.load_state(load_checkpoint(last), last)
        log.info(f"fold {fold}: resumed from {last} at epoch {trainer.epoch}")
    log.info(
        f"fold {fold}: {len(data.train)} train / {len(data.val)} val images, {data.num_classes} classes, "
        f"{cfg.model} at {trainer.img_size} px on {device}"
        + (f" x {world} processes" if world > 1 else "")
        + f", {'fp32' if trainer.dtype is None else str(trainer.dtype).removeprefix('torch.')} precision"
    )
    result = trainer.fit()
    if rank == 0 and fold != FULL:
        write_fold_oofs(cfg, exp, fold, data, device)
    return result


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fold", default="0",
        help="fold index to train, 'full' (every image, config full_fit), or 'all' (every fold, then full with "
        "full_fit) (default: 0)",
    )  # fmt: skip
    parser.add_argument("--resume", action="store_true", help="continue from the fold's last.pt if present")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg, args = parse_config(argv, __doc__.splitlines()[0], _add_arguments, stage="train")
    try:
        folds = select_folds(args.fold, cfg.folds_csv, full_fit=cfg.full_fit)
        gpus = visible_gpus()
        if len(folds) > 1 and len(gpus) > 1 and "WORLD_SIZE" not in os.environ:
            return run_folds_in_parallel(Path(__file__), folds, gpus, argv)
        for fold in folds:
            train_fold(cfg, fold, args.resume)
        return 0
    except PipelineError as e:
        log.error(str(e))
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
