"""The plain timm loop from timm's docs, trained on all training images and scored on the held-out test set.

What a newcomer writes: the baseline the whole pipeline (scripts/run_all.sh) must never do worse than at the
same wall time, side by side (the issue "never worse than the plain loop").

Run: ``python bench/plain_baseline.py --config configs/demo.yaml --img-size 192 --epochs 10``
(``--lr 1e-3 --batch-size 32 --workers 2 --weight-decay 0.05`` are the defaults; ``--seconds S`` trains for
about S seconds instead of a fixed number of epochs). It reads from the config train_csv, train_images,
image_column, label_column, test_images, test_labels, model, pretrained, in_chans and seed; none of the
pipeline's training recipe.

The plain side, as bench/train_bench.py's PlainLoop: every row of train_csv (no folds, no cleaning, ids
matched to their files as folds.py matches them), the raw files decoded by PIL (its PlainDataset),
RandomResizedCrop(scale 0.7-1) and horizontal and vertical flips from torchvision, ImageNet normalisation
from timm's resolve_model_data_config, fp32 in the default memory layout, AdamW, OneCycleLR over every step,
cross-entropy, a shuffled DataLoader, as many torch threads as the process has. The model is the project's
``lib.models.create_model`` with the config's offline ImageNet weights: the ones a newcomer's
``timm.create_model(pretrained=True)`` would fetch from the hub. Then every labelled image of test_images is
predicted (Resize + CenterCrop, no TTA) and scored as src/score.py scores a submission (lib.metrics).

The last line of stdout, in a stable format::

    plain loop: 192 px, 10 epochs: held-out accuracy 0.7561, macro-F1 0.4012 (656 images); 612.3 s (train 590.1, predict 18.2)

total seconds count from argument parsing to the scores (model creation and data setup included; the Python
start-up and imports, a few seconds, are not); train includes ``--seconds``' warm-up. Per-epoch train loss
and seconds go to stderr. ``--seconds S``: four untimed and four timed training steps on a copy of the model
estimate an epoch's seconds; the epochs are then floor((S - seconds spent so far) / estimate), at least 1,
set before the OneCycle schedule is built, and training runs them all. So the budget is approximate (an
epoch's worker start-up is not in the estimate): the printed train seconds are what it took.
The figures hold for the machine they ran on (its cores, torch threads, CPU or GPU); compare them with a
run_all.sh run on that machine only.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_bench, also when imported from tests

from train_bench import PlainDataset  # it puts src/ on sys.path

from lib.common import PipelineError, get_logger, preview, progress, seed_everything
from lib.config import Config, parse_config
from lib.images import find_images, match_ids
from lib.layout import read_train_csv
from lib.metrics import classification_scores
from lib.models import create_model, data_config
from score import SubmissionError, read_table

log = get_logger("plain_baseline")

WARMUP_STEPS = 4  # --seconds: untimed steps first: past the workers' first prefetch (2 x 2 batches decoded
# at once, competing with the step for the cores: 1 untimed step over-estimated an epoch 1.8x on ELPV)
TIMED_STEPS = 4  # --seconds: steps timed for the per-image estimate


def read_training_list(cfg: Config, problems: list[str]) -> tuple[list[Path], list[str]]:
    """Every row of train_csv: its file under train_images and its label. Ids may leave out the extension or
    folder (match_files). Problems are appended with their fix."""
    folder = Path(cfg.train_images)
    df = read_train_csv(  # names train_csv and the fix when it is missing or lacks a column
        cfg.train_csv, image_column=cfg.image_column, label_column=cfg.label_column,
        group_column=cfg.group_column, problems=problems,
    )  # fmt: skip
    if not folder.is_dir():
        problems.append(
            f"training images folder {folder} not found: set train_images (--train-images) to the folder "
            f"the {cfg.train_csv} paths are relative to"
        )
        return [], []
    if df is None:
        return [], []
    files, found = match_files(
        df["image"].tolist(), folder, listing=cfg.train_csv, problems=problems,
        fix="fix the paths or set train_images (--train-images)",
    )  # fmt: skip
    if None in found:
        return [], []
    if df.empty:
        problems.append(f"{cfg.train_csv} lists no images: write one row per training image")
    return [folder / files[k] for k in found], df["label"].tolist()


def match_files(
    ids: list[str], folder: Path, *, listing: str, fix: str, problems: list[str]
) -> tuple[list[str], list[int | None]]:
    """The files under ``folder`` (relative posix paths) and each id's index among them, matched as
    folds.py and predict.py match ids (lib.images.match_ids: path, path without extension, or file name);
    None for an id with no file or several, which appends a problem naming ``listing`` and ``fix``."""
    files = find_images(folder)[0]
    found = match_ids(ids, files)
    if missing := [i for i, k in zip(ids, found, strict=True) if k is None]:
        problems.append(
            f"{len(missing)} image(s) of {listing} have no file (or several) in {folder} "
            f"({preview(missing, quote=True)}): {fix}"
        )
    return files, found


def read_test_set(cfg: Config, problems: list[str]) -> tuple[list[Path], list[str]]:
    """Every row of test_labels (two columns, image,label or a competition's own header, as src/score.py
    reads them): its file under test_images, matched as train ids are, and its label. Problems are appended."""
    folder, labels = Path(cfg.test_images), Path(cfg.test_labels)
    ok = True
    if not folder.is_dir():
        problems.append(
            f"test images folder {folder} not found: set test_images (--test-images) to the held-out "
            "images (python scripts/prepare_demo.py makes the demo's)"
        )
        ok = False
    if not labels.is_file():
        problems.append(
            f"test labels {labels} not found: set test_labels (--test-labels) to a CSV with the columns "
            f"image,label for the images in {folder} (python scripts/prepare_demo.py writes the demo's)"
        )
        ok = False
    if not ok:
        return [], []
    try:
        truth = read_table(labels, "test labels")
    except SubmissionError as e:
        problems.append(f"{e}: fix the file or set test_labels (--test-labels)")
        return [], []
    files, found = match_files(
        truth["image"].tolist(), folder, listing=str(labels), problems=problems,
        fix="fix the ids or set test_images (--test-images)",
    )  # fmt: skip
    if None in found:
        return [], []
    if truth.empty:
        problems.append(f"{labels} lists no images: write one image,label row per held-out image")
    if unlabelled := len(files) - len(set(found)):
        log.info("%d file(s) in %s have no label in %s: not predicted", unlabelled, folder, labels)
    return [folder / files[k] for k in found if k is not None], truth["label"].tolist()


def transforms(size: int, mean: list[float], std: list[float], in_chans: int) -> tuple[T.Compose, T.Compose]:
    """(train, test) torchvision transforms of PIL RGB images: crops and flips for training, resize and
    centre crop for the test images; one-channel models get grayscale inputs."""
    tail = [*([T.Grayscale(1)] if in_chans == 1 else []), T.ToTensor(), T.Normalize(mean, std)]
    train = T.Compose([
        T.RandomResizedCrop(size, scale=(0.7, 1.0)), T.RandomHorizontalFlip(), T.RandomVerticalFlip(), *tail,
    ])  # fmt: skip
    return train, T.Compose([T.Resize(size), T.CenterCrop(size), *tail])


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> float:
    """One fp32 optimizer step; the batch's mean loss."""
    loss = criterion(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def estimate_epoch_seconds(model: nn.Module, loader: DataLoader, criterion: nn.Module) -> float:
    """Seconds one pass over ``loader`` should take: WARMUP_STEPS untimed, then TIMED_STEPS timed training
    steps (data loading included) on a copy of the model, so the real run starts from the same weights."""
    probe = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(probe.parameters())
    steps: list[tuple[int, float]] = []
    tick = time.perf_counter()
    for x, y in loader:
        train_step(probe, optimizer, criterion, x, y)
        now = time.perf_counter()
        steps.append((len(x), now - tick))
        tick = now
        if len(steps) == WARMUP_STEPS + TIMED_STEPS:
            break
    timed = steps[WARMUP_STEPS:] or steps  # a loader of one batch has only its set-up step
    per_image = sum(s for _, s in timed) / sum(n for n, _ in timed)
    return per_image * len(loader.dataset)  # type: ignore[arg-type]  # PlainDataset has a length


def budget_epochs(seconds: float, spent: float, epoch_seconds: float) -> int:
    """Whole epochs of ``epoch_seconds`` that fit in what is left of ``seconds`` after ``spent``; at least 1."""
    return max(1, math.floor((seconds - spent) / epoch_seconds)) if epoch_seconds > 0 else 1


def train_epoch(
    model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler, criterion: nn.Module, desc: str,
) -> float:  # fmt: skip
    """One epoch, the schedule stepped per batch; the mean training loss per image."""
    model.train()
    total, seen = 0.0, 0
    for x, y in progress(loader, desc=desc, leave=False):
        total += train_step(model, optimizer, criterion, x, y) * len(x)
        scheduler.step()
        seen += len(x)
    return total / max(seen, 1)


def fit(model: nn.Module, loader: DataLoader, args: argparse.Namespace) -> int:
    """Train with AdamW and OneCycleLR for ``--epochs`` (or the epochs ``--seconds`` allows); the epochs run."""
    started = time.perf_counter()
    criterion = nn.CrossEntropyLoss()
    epochs = args.epochs
    if args.seconds is not None:
        epoch_seconds = estimate_epoch_seconds(model, loader, criterion)
        epochs = budget_epochs(args.seconds, time.perf_counter() - started, epoch_seconds)
        log.info("--seconds %g: about %.3g s per epoch (warm-up estimate): %d epoch(s)", args.seconds,
                 epoch_seconds, epochs)  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=epochs * len(loader)
    )
    for epoch in range(1, epochs + 1):
        tick = time.perf_counter()
        loss = train_epoch(model, loader, optimizer, scheduler, criterion, f"epoch {epoch}/{epochs}")
        log.info("epoch %d/%d: train loss %.4f, %.1f s", epoch, epochs, loss, time.perf_counter() - tick)
    return epochs


@torch.inference_mode()
def predict(model: nn.Module, loader: DataLoader) -> np.ndarray:
    """The predicted class index of every image of ``loader``, in its order."""
    model.eval()
    return torch.cat([model(x).argmax(dim=1) for x, _ in progress(loader, desc="predict")]).numpy()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("plain loop")
    group.add_argument(
        "--img-size", type=int, default=0, help="pixels (0: the config's img_size, else the model's)"
    )
    group.add_argument("--epochs", type=int, default=10, help="training epochs (ignored with --seconds)")
    group.add_argument("--seconds", type=float, help="training budget in seconds instead of --epochs")
    group.add_argument("--lr", type=float, default=1e-3, help="AdamW's peak learning rate (OneCycleLR)")
    group.add_argument("--weight-decay", type=float, default=0.05, help="AdamW's weight decay")
    group.add_argument("--batch-size", type=int, default=32, help="images per step")
    group.add_argument("--workers", type=int, default=2, help="DataLoader workers (0: in the main process)")


def load_inputs(cfg: Config) -> tuple[list[Path], list[str], list[Path], list[str]]:
    """(train files, train labels, test files, test labels), or exit naming every missing input and its fix."""
    problems: list[str] = []
    train = read_training_list(cfg, problems)
    test = read_test_set(cfg, problems)
    if problems:
        sys.exit("plain_baseline: cannot run:\n" + "\n".join(f"  - {p}" for p in problems))
    return *train, *test


def check_arguments(args: argparse.Namespace) -> None:
    if args.epochs < 1 or args.batch_size < 1 or args.workers < 0 or args.img_size < 0 or args.lr <= 0:
        sys.exit(
            "plain_baseline: --epochs and --batch-size must be >= 1, --workers and --img-size >= 0, --lr > 0"
        )
    if args.seconds is not None and args.seconds <= 0:
        sys.exit(f"plain_baseline: --seconds must be > 0, got {args.seconds}")


def make_loaders(
    args: argparse.Namespace, size: int, preprocessing: dict, in_chans: int,
    train: tuple[list[Path], list[int]], test_paths: list[Path],
) -> tuple[DataLoader, DataLoader]:  # fmt: skip
    """The shuffled training loader over every image (only a lone last image is dropped: BatchNorm cannot
    train on a batch of one) and the test loader in file order."""
    train_tf, test_tf = transforms(size, preprocessing["mean"], preprocessing["std"], in_chans)
    train_set = PlainDataset(*train, train_tf)
    drop_last = len(train_set) % args.batch_size == 1 and len(train_set) > 1
    train_loader = DataLoader(
        train_set, batch_size=args.batch_size, shuffle=True, num_workers=args.workers, drop_last=drop_last
    )
    test_set = PlainDataset(test_paths, [0] * len(test_paths), test_tf)
    return train_loader, DataLoader(test_set, batch_size=args.batch_size, num_workers=args.workers)


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    # prepare_demo's key groups: the data and test-set keys as flags; the YAML file may hold every key.
    cfg, args = parse_config(argv, __doc__.splitlines()[0], add_arguments, stage="prepare_demo")
    check_arguments(args)
    train_paths, train_labels, test_paths, test_labels = load_inputs(cfg)
    seed_everything(cfg.seed)
    classes = sorted(set(train_labels))
    try:
        model = create_model(
            cfg.model, num_classes=len(classes), pretrained=cfg.pretrained, in_chans=cfg.in_chans
        )
    except PipelineError as e:
        sys.exit(f"plain_baseline: {e}")
    preprocessing = data_config(model)  # timm's resolve_model_data_config (1 channel: RGB averaged)
    size = args.img_size or cfg.img_size or preprocessing["img_size"]
    index = {c: i for i, c in enumerate(classes)}
    train = (train_paths, [index[c] for c in train_labels])
    train_loader, test_loader = make_loaders(args, size, preprocessing, cfg.in_chans, train, test_paths)
    log.info(
        "%s (weights %s): %d training images, %d classes, %d px, batch %d, AdamW lr %g wd %g, %d workers, "
        "%d torch threads; %d held-out images", cfg.model, cfg.pretrained, len(train_paths), len(classes),
        size, args.batch_size, args.lr, args.weight_decay, args.workers, torch.get_num_threads(), len(test_paths),
    )  # fmt: skip
    tick = time.perf_counter()
    epochs = fit(model, train_loader, args)
    train_s, tick = time.perf_counter() - tick, time.perf_counter()
    predicted = [classes[i] for i in predict(model, test_loader)]
    predict_s = time.perf_counter() - tick
    scores = classification_scores(test_labels, predicted, sorted(set(test_labels)))  # as src/score.py
    total = time.perf_counter() - start
    print(
        f"plain loop: {size} px, {epochs} epochs: held-out accuracy {scores['accuracy']:.4f}, "
        f"macro-F1 {scores['macro_f1']:.4f} ({scores['n']} images); "
        f"{total:.1f} s (train {train_s:.1f}, predict {predict_s:.1f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
