"""Datasets, augmentation and loaders for training, validation and prediction.

Every stage that feeds images to a model (train.py, finetune.py, predict.py) builds its inputs here, so
training and inference share one decoder (images.read_rgb), one resize policy and one normalisation.

- Training augmentation is the strong published set (random resized crop or letterbox + random crop,
  flips, rotation, colour jitter, noise, blur, cutout); each piece is a config key and a piece whose
  probability or strength is 0 is left out of the pipeline, not run with p=0.
- Evaluation is deterministic: resize + centre crop (rrc) or letterbox, then normalise
  (:func:`eval_transform`; a member's whole inference preprocessing and its test-time views are
  lib/preprocess.py's, built on it).
- Loaders are reproducible for a given ``seed`` with or without worker processes (see
  :func:`make_loader` for why albumentations 2 needs help with that).

Functions take keyword arguments; the stages pass their config keys (``Config.options("augment")``).
"""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import DataLoader, Dataset, Sampler, WeightedRandomSampler, get_worker_info

from lib.common import get_logger, num_workers
from lib.images import BadImage, read_rgb
from lib.oof import TopK

log = get_logger("predict")  # its only messages are prediction's unreadable images

# timm's interpolation names (pretrained_cfg["interpolation"]) as OpenCV flags.
INTERPOLATIONS = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}
# Letterbox training pads to a square this much larger than img_size, so the random crop translates.
LETTERBOX_MARGIN = 1.15
# Side of the black stand-in for an unreadable prediction image; the eval transform resizes it anyway.
_BLANK_SIDE = 16


def _interpolation(name: str) -> int:
    if name not in INTERPOLATIONS:
        raise ValueError(
            f"unknown interpolation {name!r} in the model's data config: one of {list(INTERPOLATIONS)}"
        )
    return INTERPOLATIONS[name]


def _to_tensor(mean: Sequence[float], std: Sequence[float], in_chans: int) -> list[A.BasicTransform]:
    """Normalize with the model's statistics, then CHW float32.

    For ``in_chans`` 1 the three channel statistics are averaged: timm adapts a pretrained RGB stem to one
    channel by summing its filters, so a gray image normalised with the average statistics is the closest
    single-channel equivalent of the replicated gray RGB input (exact when the channels share them).
    """
    mean_a = np.asarray(mean, dtype=np.float64)
    std_a = np.asarray(std, dtype=np.float64)
    if in_chans == 1:
        mean_a, std_a = mean_a.mean(keepdims=True), std_a.mean(keepdims=True)
    return [
        A.Normalize(mean=tuple(mean_a.tolist()), std=tuple(std_a.tolist()), max_pixel_value=255.0),
        ToTensorV2(),
    ]


def _letterbox(side: int, interpolation: int) -> list[A.BasicTransform]:
    """Fit the long side to ``side`` and pad to a centred black square: the aspect ratio is kept."""
    return [
        A.LongestMaxSize(max_size=side, interpolation=interpolation, area_for_downscale="image"),
        A.PadIfNeeded(
            min_height=side, min_width=side, position="center", border_mode=cv2.BORDER_CONSTANT, fill=0
        ),
    ]


def train_transform(
    *,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
    in_chans: int = 3,
    crop: Literal["rrc", "letterbox"] = "rrc",
    rrc_scale: Sequence[float] = (0.35, 1.0),
    hflip: float = 0.5,
    vflip: float = 0.0,
    rotate: float = 15.0,
    color_jitter: float = 0.2,
    noise_p: float = 0.1,
    blur_p: float = 0.1,
    dropout_p: float = 0.3,
) -> A.Compose:
    """The training augmentation to ``size`` x ``size``; a piece whose probability or strength is 0 is left
    out. ``mean``/``std``/``interpolation``: the model's (models.data_config); the rest are the config's
    augment keys (see its --help).

    Shrinking uses INTER_AREA (``area_for_downscale``), enlarging ``interpolation``, so small training
    sizes do not alias. The pipeline gets no ``seed``: :func:`make_loader` seeds it per worker.
    """
    flag = _interpolation(interpolation)
    steps: list[A.BasicTransform] = []
    if crop == "rrc":
        steps.append(
            A.RandomResizedCrop(
                size=(size, size), scale=(rrc_scale[0], rrc_scale[1]), interpolation=flag,
                area_for_downscale="image",
            )
        )  # fmt: skip
    else:
        steps += _letterbox(round(size * LETTERBOX_MARGIN), flag)
        steps.append(A.RandomCrop(height=size, width=size))
    if hflip > 0:
        steps.append(A.HorizontalFlip(p=hflip))
    if vflip > 0:
        steps.append(A.VerticalFlip(p=vflip))
    if rotate > 0:
        steps.append(A.Rotate(limit=rotate, interpolation=flag, border_mode=cv2.BORDER_CONSTANT, fill=0, p=0.5))
    if color_jitter > 0:
        saturation = color_jitter if in_chans == 3 else 0.0  # a gray image has no saturation
        steps.append(
            A.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=saturation, hue=0.0, p=1.0)
        )
    if noise_p > 0:
        # std_range is a fraction of 255 in albumentations 2; its default (0.2, 0.44) would drown the image.
        steps.append(A.GaussNoise(std_range=(0.01, 0.05), p=noise_p))
    if blur_p > 0:
        steps.append(A.GaussianBlur(blur_limit=(3, 5), p=blur_p))
    if dropout_p > 0:
        steps.append(
            A.CoarseDropout(
                num_holes_range=(1, 8), hole_height_range=(0.05, 0.125), hole_width_range=(0.05, 0.125),
                fill=0, p=dropout_p,
            )
        )  # fmt: skip
    return A.Compose([*steps, *_to_tensor(mean, std, in_chans)])


def eval_transform(
    *,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
    in_chans: int = 3,
    crop: Literal["rrc", "letterbox"] = "rrc",
) -> A.Compose:
    """Deterministic validation/prediction preprocessing to ``size`` x ``size`` matching the training crop
    policy: rrc: shorter side to ``size`` and centre crop (the whole image when it is square, as rrc's
    largest crops see it); letterbox: the whole image padded to a square. Then normalise (CHW float32)."""
    flag = _interpolation(interpolation)
    if crop == "rrc":
        steps: list[A.BasicTransform] = [
            A.SmallestMaxSize(max_size=size, interpolation=flag, area_for_downscale="image"),
            A.CenterCrop(height=size, width=size),
        ]
    else:
        steps = _letterbox(size, flag)
    return A.Compose([*steps, *_to_tensor(mean, std, in_chans)])


def _target_tensor(targets: np.ndarray | TopK, n: int) -> torch.Tensor | TopK:
    """Class indices as int64 [N], soft label rows as float32 [N, C], or a top-k soft-label file's TopK of
    log-probabilities (kept as it is: a row is made dense only when its image is drawn); anything else is
    refused."""
    if isinstance(targets, TopK):
        if len(targets) != n:
            raise ValueError(f"{len(targets)} targets for {n} files")
        return targets
    array = np.asarray(targets)
    if len(array) != n:
        raise ValueError(f"{len(array)} targets for {n} files")
    if array.ndim == 1 and np.issubdtype(array.dtype, np.integer):
        return torch.from_numpy(array.astype(np.int64))
    if array.ndim == 2 and np.issubdtype(array.dtype, np.floating):
        return torch.from_numpy(array.astype(np.float32))
    raise ValueError(
        "targets must be class indices (integers, shape [N]) or soft labels (floats, shape [N, C]), "
        f"got {array.dtype} with shape {array.shape}"
    )


class ImageDataset(Dataset):
    """Image files with their targets, decoded by images.read_rgb and transformed.

    Items are ``(image, target)``: image a CHW float32 tensor with ``in_chans`` channels (1: converted to
    gray before the transform); target an int64 scalar (class index), a float32 [C] row (soft labels; for
    a TopK of log-probabilities, the softmax of the image's row, :meth:`lib.oof.TopK.probs`: only one row
    per image is ever dense) or, without targets (prediction), the int64 index of the file.

    An unreadable file raises :class:`images.BadImage` naming it (training data was cleaned by folds.py,
    so one is a real problem). Prediction must still answer for every file: with ``on_error="blank"``
    (only without targets) the file is logged, replaced by a black image, and its index appears in
    :attr:`failed`. The failure flags live in shared memory, so they are seen from worker processes too.
    File paths are kept in one numpy array rather than a list of objects: forked workers then share it
    instead of copying every page that Python's reference counting touches.
    """

    def __init__(
        self,
        files: Sequence[Path | str],
        targets: np.ndarray | TopK | None,
        transform: A.Compose,
        in_chans: int = 3,
        on_error: Literal["raise", "blank"] = "raise",
    ) -> None:
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        if on_error == "blank" and targets is not None:
            raise ValueError(
                'on_error="blank" is for prediction only (targets None): training must not guess'
            )
        self.files = np.array([str(f) for f in files])
        self.targets = None if targets is None else _target_tensor(targets, len(self.files))
        self.transform = transform
        self.in_chans = in_chans
        self.on_error = on_error
        self._failed = torch.zeros(len(self.files), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.files)

    @property
    def failed(self) -> list[int]:
        """Indices of the files replaced by a blank image so far (``on_error="blank"``), ascending."""
        return torch.nonzero(self._failed).flatten().tolist()

    def decode(self, path: str) -> np.ndarray:
        """One file as an HxWx3 uint8 RGB array (prediction overrides this to decode as resize.py does)."""
        return read_rgb(Path(path))

    def _read(self, index: int) -> np.ndarray:
        path = str(self.files[index])
        try:
            return self.decode(path)
        except Exception as e:  # prediction: any failure of one file must cost only that file
            if self.on_error == "raise":
                if isinstance(e, (BadImage, OSError)):
                    raise BadImage(f"cannot read image {path}: {e}") from e
                raise
            log.warning("unreadable image %s (%s): it gets the fallback prediction", path, e or type(e).__name__)
            self._failed[index] = True
            return np.zeros((_BLANK_SIDE, _BLANK_SIDE, 3), np.uint8)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self._read(index)
        if self.in_chans == 1:
            img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[..., None]
        image = self.transform(image=img)["image"]
        if self.targets is None:
            target = torch.tensor(index)
        elif isinstance(self.targets, TopK):
            target = torch.from_numpy(self.targets.rows(slice(index, index + 1)).probs()[0])
        else:
            target = self.targets[index]
        return image, target


# The class-sampling choices (config keys ``sampler``, ``ft_sampler``) as powers q: each class is drawn with
# probability proportional to count^q. natural keeps the data's frequencies, balanced draws every class
# equally (Kang et al., "Decoupling representation and classifier", ICLR 2020, compares the three), and
# sqrt sits between them (Mahajan et al., "Exploring the limits of weakly supervised pretraining", 2018).
SAMPLER_POWERS: dict[str, float] = {"natural": 1.0, "sqrt": 0.5, "balanced": 0.0}


def class_sampler(
    labels: np.ndarray,
    *,
    power: float,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> WeightedRandomSampler:
    """Draw images with replacement so that each class comes with probability proportional to count^power.

    ``labels`` [N] any hashable dtype (class indices or names). Each image weighs count^(power - 1), so its
    class as a whole weighs count^power: power 1 keeps the natural frequencies, 0.5 is square-root
    sampling, 0 class-balanced (see :data:`SAMPLER_POWERS`). ``num_samples`` defaults to the number of
    labels (one epoch); pass a seeded ``generator`` for reproducible draws.

    Raises:
        ValueError: ``labels`` is empty.
    """
    if len(labels) == 0:
        raise ValueError("class_sampler needs at least one label")
    _, inverse, counts = np.unique(np.asarray(labels), return_inverse=True, return_counts=True)
    weights = torch.from_numpy(counts[inverse.ravel()].astype(np.float64) ** (power - 1.0))
    return WeightedRandomSampler(weights, num_samples or len(weights), replacement=True, generator=generator)


def class_prior(targets: np.ndarray, *, num_classes: int, power: float = 1.0) -> np.ndarray:
    """The class distribution a :func:`class_sampler` of this ``power`` draws from ``targets``.

    ``targets`` int [N] class indices in 0..num_classes-1; returns float64 [num_classes] summing to 1,
    proportional to count^power (power 1: the empirical frequencies). A class absent from ``targets``
    counts as one image, so its log-prior stays finite (a logit-adjusted loss adds it to a logit).

    Raises:
        ValueError: a target lies outside 0..num_classes-1.
    """
    targets = np.asarray(targets)
    if len(targets) and (targets.min() < 0 or targets.max() >= num_classes):
        raise ValueError(f"class indices must lie in 0..{num_classes - 1}, got {targets.min()}..{targets.max()}")
    counts = np.maximum(np.bincount(targets, minlength=num_classes), 1).astype(np.float64) ** power
    return counts / counts.sum()


def _seed_transform(dataset: Any, seed: int) -> None:
    """Give the dataset's albumentations pipeline fresh generators derived from ``seed``.

    albumentations 2 ignores the global numpy/random state: every Compose owns its generators, which a
    forked worker inherits unchanged (each worker would augment identically). ``Compose(seed=...)`` is no
    fix either: it seeds every transform with the same number, so their draws coincide (flip and rotation
    always together). One shared pair of generators, as ``set_random_state`` installs, avoids both.
    """
    transform = getattr(dataset, "transform", None)
    if hasattr(transform, "set_random_state"):
        transform.set_random_state(np.random.default_rng(seed), random.Random(seed))


def _seed_worker(worker_id: int) -> None:
    """Worker start: single-threaded OpenCV (one process per core already), seeds from torch's.

    torch.initial_seed() in a worker is the epoch's base seed (drawn from the loader's generator) plus
    the worker id, so every worker differs and the whole run repeats for a given cfg.seed.
    """
    cv2.setNumThreads(1)
    seed = torch.initial_seed()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    info = get_worker_info()
    if info is not None:
        _seed_transform(info.dataset, seed)


class _SeededLoader(DataLoader):
    """A DataLoader whose augmentation repeats for a given seed with or without worker processes.

    torch only seeds workers (see _seed_worker): in-process (num_workers 0) the dataset's transform is
    reseeded from the loader's generator at each epoch instead. Workers are forked in ``__iter__``; a child
    forked while OpenCV's thread pool runs can hang in its first parallel call (see resize.py), so the pool
    is stopped around the fork.
    """

    def __iter__(self) -> Iterator[Any]:
        if self.num_workers == 0:
            seed = int(torch.empty((), dtype=torch.int64).random_(generator=self.generator).item())
            _seed_transform(self.dataset, seed)
            return super().__iter__()
        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            return super().__iter__()
        finally:
            cv2.setNumThreads(threads)


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    train: bool,
    workers: int = 0,
    seed: int = 0,
    sampler: Sampler | None = None,
) -> DataLoader:
    """A DataLoader tuned for this pipeline; reproducible for ``seed``.

    - Workers: ``common.num_workers(workers)`` (0: one per core), at most one per batch; a dataset of one
      batch or less is loaded in-process (starting workers would cost more than they save). Evaluation
      workers persist; training workers restart each epoch, so an epoch's augmentation depends only on the
      generator's state at its start (train.py reseeds it per epoch: a resumed run replays an epoch
      exactly). They keep about four batches in flight in all (``prefetch_factor``), are forked on Linux
      (fast start, the dataset shared copy-on-write; safe with the OpenCV guard of _SeededLoader and no CUDA
      use in workers) and use the platform default elsewhere.
    - Order: shuffled for training unless a ``sampler`` is given (e.g. :func:`class_sampler`),
      sequential otherwise; a torch.Generator seeded with ``seed`` drives shuffling and worker seeds.
    - Training drops the ragged last batch (a batch of one breaks BatchNorm) unless that would leave none.
    - Batches are pinned when CUDA is available.
    """
    samples = len(sampler) if sampler is not None else len(dataset)  # type: ignore[arg-type]
    batches = math.ceil(samples / batch_size)
    n_workers = min(num_workers(workers), batches) if batches > 1 else 0
    return _SeededLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=n_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=train and samples >= batch_size,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_seed_worker if n_workers else None,
        multiprocessing_context="fork" if n_workers and sys.platform == "linux" else None,
        persistent_workers=n_workers > 0 and not train,
        prefetch_factor=max(2, math.ceil(4 / n_workers)) if n_workers else None,
    )
