"""Train one cross-validation fold of a timm backbone and keep its out-of-fold (OOF) logits.

``python src/train.py --config configs/demo.yaml --fold 0`` (``--fold all``: every fold; on a machine with
several GPUs the folds run concurrently, one per GPU). One fold on several GPUs or nodes:
``torchrun --nproc_per_node 4 src/train.py --fold 0``.

Ranger21 (pytorch-optimizer's maintained implementation; its own warm-up/warm-down off) or AdamW/SGD, driven
per iteration by SGDR (cosine annealing with warm restarts) after an optional linear warm-up; bf16/fp16
autocast, channels_last, gradient clipping and accumulation, CutMix/MixUp, label smoothing, model EMA,
early stopping. Per fold it writes ``best.pt`` (weights of the best validation epoch, EMA or raw), ``last.pt``
(everything needed by ``--resume``), ``log.csv`` and ``oof.npz``; once every fold has one, the experiment's
``oof.npz`` aligned with folds.csv.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import subprocess
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
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.utils import ModelEmaV3
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingWarmRestarts, LinearLR, LRScheduler, SequentialLR
from torch.utils.data import DistributedSampler, Subset

from distill import load_soft_labels
from folds import read_csv_strings, read_folds
from lib.common import atomic_path, get_logger, progress
from lib.config import Config, parse_config, save_config
from lib.data import (
    ImageDataset,
    class_balanced_sampler,
    eval_transform,
    image_size,
    make_loader,
    train_transform,
)
from lib.metrics import logit_scores
from lib.models import (
    ModelError,
    autocast_dtype,
    create_model,
    data_config,
    load_checkpoint,
    predict_logits,
    save_checkpoint,
)
from lib.oof import OOFError, read_oof, write_oof

log = get_logger("train")

LOG_COLUMNS = [
    "epoch", "lr", "train_loss", "val_loss", "accuracy", "macro_f1",
    "ema_val_loss", "ema_accuracy", "ema_macro_f1", "images_per_s", "data_wait", "seconds",
]  # fmt: skip


class TrainError(RuntimeError):
    """Training cannot start or go on; the message names the file or setting and the fix."""


# ---------------------------------------------------------------------------------------------------------
# Data of one fold.


@dataclass
class FoldData:
    """The rows of folds.csv split for one fold, with resized file paths and class indices."""

    train: pd.DataFrame
    val: pd.DataFrame
    classes: list[str]
    soft: np.ndarray | None = None  # soft-label rows of the training images (src/distill.py), or None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def train_targets(self) -> np.ndarray:
        """What the training images are fitted to: their soft labels, else their class indices."""
        return self.soft if self.soft is not None else self.train["target"].to_numpy()


def load_fold(cfg: Config, fold: int) -> FoldData:
    """folds.csv split into this fold's training and validation rows, each with its resized file."""
    path = Path(cfg.folds_csv)
    if not path.is_file():
        raise TrainError(f"{path} not found: run python src/folds.py --config <your config> first")
    df = read_folds(path)
    present = sorted(df["fold"].unique().tolist())
    if fold not in present:
        raise TrainError(f"fold {fold} out of range: {path} has folds {present}")
    index_path = cfg.resized_images / "_index.csv"
    if not index_path.is_file():
        raise TrainError(f"{index_path} not found: run python src/resize.py with the same config")
    files = read_csv_strings(index_path).set_index("image")["file"]
    missing = ~df["image"].isin(files.index)
    if missing.any():
        raise TrainError(
            f"{missing.sum()} image(s) of {path} are not in {index_path} (e.g. {df['image'][missing].iloc[0]!r}):"
            " re-run python src/resize.py and python src/folds.py with the same config"
        )
    df["path"] = [str(cfg.resized_images / f) for f in files.loc[df["image"]]]
    classes = sorted(df["label"].unique().tolist())
    df["target"] = df["label"].map({c: i for i, c in enumerate(classes)})
    is_train = (df["fold"] != fold).to_numpy()
    soft = load_soft_labels(Path(cfg.soft_labels), df)[is_train] if cfg.soft_labels else None
    return FoldData(df[is_train], df[~is_train], classes, soft)


# ---------------------------------------------------------------------------------------------------------
# Optimiser, schedule, precision.


def build_optimizer(model: nn.Module, cfg: Config, total_steps: int) -> torch.optim.Optimizer:
    """Ranger21, AdamW or SGD; no weight decay on biases and norm weights (timm's grouping)."""
    if cfg.optimizer == "ranger21":
        from pytorch_optimizer import Ranger21

        groups = param_groups_weight_decay(model, cfg.weight_decay)
        # The external SGDR schedule owns the learning rate: Ranger21's warm-up/warm-down are switched off.
        return Ranger21(
            groups, num_iterations=max(total_steps, 1), lr=cfg.lr, weight_decay=cfg.weight_decay,
            disable_lr_scheduler=True, num_warm_up_iterations=0, num_warm_down_iterations=0,
        )  # fmt: skip
    opt = "adamw" if cfg.optimizer == "adamw" else "nesterov"
    return create_optimizer_v2(model, opt, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int) -> LRScheduler:
    """SGDR stepped per optimizer step: cosine cycles of sgdr_t0 epochs growing by sgdr_t_mult, after a
    linear warm-up of warmup_epochs."""
    cycle = max(1, round(cfg.sgdr_t0 * steps_per_epoch))
    sgdr = CosineAnnealingWarmRestarts(optimizer, T_0=cycle, T_mult=cfg.sgdr_t_mult, eta_min=cfg.eta_min)
    warm = round(cfg.warmup_epochs * steps_per_epoch)
    if warm <= 0:
        return sgdr
    ramp = LinearLR(optimizer, start_factor=1e-3, end_factor=1.0, total_iters=warm)
    return SequentialLR(optimizer, [ramp, sgdr], milestones=[warm])


# ---------------------------------------------------------------------------------------------------------
# Distributed helpers (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE).


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group under torchrun (NCCL on GPUs, else gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, device


def gather_rows(indices: np.ndarray, logits: np.ndarray, world: int) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's (indices, logits) shard, concatenated on all ranks, ordered by index."""
    if world > 1:
        shards: list = [None] * world
        dist.all_gather_object(shards, (indices, logits))
        indices = np.concatenate([s[0] for s in shards])
        logits = np.concatenate([s[1] for s in shards])
    order = np.argsort(indices, kind="stable")
    return indices[order], logits[order]


# ---------------------------------------------------------------------------------------------------------
# Reproducibility and resumable state.


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
# Training and evaluation loops.


def evaluate(logits: np.ndarray, targets: np.ndarray, classes: list[str]) -> dict[str, float]:
    """Validation loss, accuracy and macro-F1 of logits against hard targets (score.logit_scores)."""
    s = logit_scores(logits, [classes[t] for t in targets], classes)
    return {"val_loss": s["log_loss"], "accuracy": s["accuracy"], "macro_f1": s["macro_f1"]}


def is_better(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if metric == "loss" else value > best


@dataclass
class Trainer:
    """Everything one fold's training loop touches, so resume can save and restore it as one unit."""

    cfg: Config
    fold: int
    data: FoldData
    out_dir: Path
    rank: int
    world: int
    device: torch.device

    def __post_init__(self) -> None:
        cfg = self.cfg
        self.model = create_model(cfg, self.data.num_classes)
        self.data_cfg = data_config(self.model)
        self.img_size = image_size(cfg, self.data_cfg)
        self.memory = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model.to(self.device, memory_format=self.memory)
        if self.world > 1 and cfg.sync_bn:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.dtype = autocast_dtype(cfg.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay) if cfg.ema else None

        self.train_ds = ImageDataset(
            self.data.train["path"].tolist(), self.data.train_targets,
            train_transform(cfg, self.data_cfg, self.img_size), cfg.in_chans,
        )  # fmt: skip
        val_ds = ImageDataset(
            self.data.val["path"].tolist(), self.data.val["target"].to_numpy(),
            eval_transform(cfg, self.data_cfg, self.img_size), cfg.in_chans,
        )  # fmt: skip
        self.val_indices = np.arange(len(val_ds))[self.rank :: self.world]
        self.val_loader = make_loader(Subset(val_ds, self.val_indices.tolist()), cfg, train=False)
        self.sampler = self._train_sampler()
        self.train_loader = make_loader(self.train_ds, cfg, train=True, sampler=self.sampler)
        self.steps_per_epoch = len(self.train_loader) // cfg.accum_steps
        if self.steps_per_epoch == 0:
            raise TrainError(
                f"fold {self.fold}: {len(self.train_ds)} training images make no full step of batch "
                f"{cfg.batch_size} x accumulation {cfg.accum_steps} x {self.world} process(es): lower --batch-size"
            )
        self.optimizer = build_optimizer(self.model, cfg, cfg.epochs * self.steps_per_epoch)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.steps_per_epoch)
        self.mixup = self._mixup()
        soft = self.mixup is not None or self.data.soft is not None
        self.criterion = SoftTargetCrossEntropy() if soft else nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.net: nn.Module = self.model
        if cfg.compile:
            self.net = torch.compile(self.net)
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.net, device_ids=ids)
        self.epoch = 0
        self.step = 0
        self.best: float | None = None
        self.best_epoch = 0
        self.log_rows: list[dict] = []

    def _train_sampler(self):
        """Class-balanced, or a shuffle seeded by (seed, epoch) that DDP ranks split: the same global
        batches whatever the number of processes."""
        cfg = self.cfg
        if cfg.balanced_sampler:
            if self.world > 1:
                raise TrainError("balanced_sampler is not supported with DDP: train one fold per GPU instead")
            generator = torch.Generator().manual_seed(cfg.seed)
            return class_balanced_sampler(self.data.train["target"].to_numpy(), generator=generator)
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
        """A digest of this fold's validation images: resuming on a changed split would leak."""
        names = "\n".join(sorted(self.data.val["image"])).encode()
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

    def train_one_epoch(self) -> dict[str, float]:
        cfg = self.cfg
        self.net.train()
        # Sampling and augmentation seeds come from (seed, epoch): a resumed run replays the epoch exactly.
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(self.epoch)
        else:
            self.sampler.generator.manual_seed(cfg.seed * 1000 + self.epoch)
        self.train_loader.generator.manual_seed(cfg.seed * 1000 + self.epoch)
        self.optimizer.zero_grad(set_to_none=True)
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
            with torch.autocast(
                self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None
            ):
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
        targets = self.data.val["target"].to_numpy()
        while self.epoch < cfg.epochs and self.patience_left():
            start = time.perf_counter()
            lr = self.lr()
            row: dict[str, float] = {"epoch": self.epoch + 1, "lr": lr, **self.train_one_epoch()}
            candidates = {"model": self.validate(self.model)}
            row.update(evaluate(candidates["model"], targets, self.data.classes))
            if self.ema:
                candidates["ema"] = self.validate(self.ema.module)
                row.update(
                    {
                        f"ema_{k}": v
                        for k, v in evaluate(candidates["ema"], targets, self.data.classes).items()
                    }
                )
            row["seconds"] = time.perf_counter() - start
            key = "val_loss" if cfg.val_metric == "loss" else cfg.val_metric
            pick = min if key == "val_loss" else max
            source = pick(candidates, key=lambda s: row[_col(s, key)])
            value = row[_col(source, key)]
            self.epoch += 1
            self.log_rows.append(row)
            improved = is_better(cfg.val_metric, value, self.best)
            if improved:
                self.best, self.best_epoch = value, self.epoch
            if self.rank == 0:
                if improved:
                    self._save_best(source, candidates[source])
                save_checkpoint(self.out_dir / "last.pt", self.state())
                self._write_log()
            log.info(
                f"fold {self.fold} epoch {self.epoch}/{cfg.epochs}: lr {lr:.2e} train {row['train_loss']:.4f} "
                f"val {row['val_loss']:.4f} acc {row['accuracy']:.4f} f1 {row['macro_f1']:.4f}"
                + (f" | ema acc {row['ema_accuracy']:.4f} f1 {row['ema_macro_f1']:.4f}" if self.ema else "")
                + f" | {row['images_per_s']:.0f} img/s, data wait {row['data_wait']:.0%}, {row['seconds']:.0f} s"
                + (" *" if improved else "")
            )
        if not self.patience_left():
            stale = self.epoch - self.best_epoch
            log.info(f"fold {self.fold}: no better {cfg.val_metric} for {stale} epochs: early stop")
        return {"best": self.best, "best_epoch": self.best_epoch}

    def patience_left(self) -> bool:
        """Early stopping, derived from the epoch of the best metric so a resumed fold keeps its count."""
        return not self.cfg.early_stop or self.epoch - self.best_epoch < self.cfg.early_stop

    def _save_best(self, source: str, logits: np.ndarray) -> None:
        weights = self.ema.module if source == "ema" else self.model
        save_checkpoint(
            self.out_dir / "best.pt",
            {
                "model": weights.state_dict(), "source": source, "epoch": self.epoch, "metric": self.best,
                "classes": self.data.classes, "config": asdict(self.cfg), "data_config": self.data_cfg,
                "fold": self.fold,
            },
        )  # fmt: skip
        write_oof(self.out_dir / "oof.npz", self.data.val, logits, self.data.classes)

    def _write_log(self) -> None:
        with atomic_path(self.out_dir / "log.csv") as tmp:
            pd.DataFrame(self.log_rows).reindex(columns=LOG_COLUMNS).to_csv(tmp, index=False)


def _col(source: str, key: str) -> str:
    return key if source == "model" else f"ema_{key}"


# ---------------------------------------------------------------------------------------------------------
# OOF files (format: oof.py).


def assemble_oof(cfg: Config) -> Path | None:
    """The experiment's OOF logits in folds.csv row order, once every fold has written its own.

    A fold whose file holds other images than folds.csv gives it (folds remade since it trained) counts as
    not trained yet: retraining the folds one by one after new folds must not stop at the first one.
    """
    folds = read_folds(Path(cfg.folds_csv))
    fold_ids = sorted(folds["fold"].unique())
    parts = [cfg.exp_dir / f"fold{k}" / "oof.npz" for k in fold_ids]
    if not all(p.is_file() for p in parts):
        return None
    pieces = [read_oof(p) for p in parts]
    stale = [
        k
        for k, piece in zip(fold_ids, pieces, strict=True)
        if set(piece["image"].astype(str)) != set(folds.loc[folds["fold"] == k, "image"].astype(str))
    ]
    if stale:
        log.info(
            "OOF of fold(s) %s predates the current %s: the experiment's OOF is assembled once they are retrained",
            ", ".join(map(str, stale)),
            cfg.folds_csv,
        )
        return None
    classes = pieces[0]["classes"]
    if any(not np.array_equal(p["classes"], classes) for p in pieces):
        raise TrainError(f"the folds of {cfg.exp_dir} were trained on different classes: retrain them")
    logits = pd.DataFrame(np.concatenate([p["logits"] for p in pieces]))
    logits.index = np.concatenate([p["image"] for p in pieces])
    if not logits.index.is_unique or set(logits.index) != set(folds["image"]):
        raise TrainError(f"the OOF files of {cfg.exp_dir} do not cover folds.csv exactly: retrain the folds")
    out = cfg.exp_dir / "oof.npz"
    rows = folds.assign(image=folds["image"].astype(str))
    write_oof(out, rows, logits.loc[rows["image"]].to_numpy(), classes.tolist())
    return out


# ---------------------------------------------------------------------------------------------------------
# Entry points.


def train_fold(cfg: Config, fold: int, resume: bool = False) -> dict:
    """Train one fold (under torchrun: this process's share of it); returns its best metric and epoch."""
    rank, world, device = setup_distributed()
    seed_everything(cfg.seed + fold)
    torch.backends.cudnn.benchmark = not cfg.deterministic
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    data = load_fold(cfg, fold)
    out_dir = cfg.exp_dir / f"fold{fold}"
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, cfg.exp_dir / "config.yaml")
    trainer = Trainer(cfg, fold, data, out_dir, rank, world, device)
    last = out_dir / "last.pt"
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
    if rank == 0:
        oof = assemble_oof(cfg)
        if oof:
            log.info(f"all folds done: OOF logits -> {oof}")
    return result


def visible_gpus() -> list[str]:
    """GPU ids this process may use, as CUDA_VISIBLE_DEVICES names them (empty on a CPU machine)."""
    count = torch.cuda.device_count()
    named = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g]
    return named[:count] if named else [str(i) for i in range(count)]


def run_folds_in_parallel(folds: list[int], gpus: list[str], argv: list[str]) -> int:
    """One subprocess per GPU (CUDA_VISIBLE_DEVICES), the remaining folds queued; returns the worst exit code."""
    queue, running, worst = list(folds), {}, 0
    base = _strip_fold(argv)
    while queue or running:
        for gpu in gpus:
            if queue and gpu not in running:
                fold = queue.pop(0)
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
                cmd = [sys.executable, __file__, *base, "--fold", str(fold)]
                log.info(f"fold {fold} -> GPU {gpu}")
                running[gpu] = (fold, subprocess.Popen(cmd, env=env))
        time.sleep(1)
        for gpu, (fold, proc) in list(running.items()):
            if proc.poll() is not None:
                if proc.returncode:
                    log.error(f"fold {fold} on GPU {gpu} failed with exit code {proc.returncode}")
                worst = max(worst, proc.returncode)
                del running[gpu]
    return worst


def _strip_fold(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--fold":
            skip = True
        elif not a.startswith("--fold="):
            out.append(a)
    return out


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fold", default="0", help="fold index to train, or 'all' (default: 0)")
    parser.add_argument("--resume", action="store_true", help="continue from the fold's last.pt if present")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg, args = parse_config(argv, __doc__.splitlines()[0], _add_arguments, stage="train")
    try:
        if args.fold != "all":
            try:
                fold = int(args.fold)
            except ValueError:
                raise TrainError(f"--fold must be an integer or 'all', got {args.fold!r}") from None
            train_fold(cfg, fold, args.resume)
            return 0
        if not Path(cfg.folds_csv).is_file():
            raise TrainError(
                f"{cfg.folds_csv} not found: run python src/folds.py --config <your config> first"
            )
        folds = sorted(read_folds(Path(cfg.folds_csv))["fold"].unique().tolist())
        gpus = visible_gpus()
        if len(gpus) > 1 and "WORLD_SIZE" not in os.environ:
            return run_folds_in_parallel(folds, gpus, argv)
        for fold in folds:
            train_fold(cfg, fold, args.resume)
        return 0
    except (TrainError, OOFError, ModelError) as e:
        log.error(str(e))
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
