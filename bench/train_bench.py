"""Training throughput of src/train.py against the plain timm loop a newcomer writes from the docs.

Same model, image size, batch, N images, torch threads and process. train.py's side is its own
``Trainer.train_one_epoch`` on the resized copies (config as given: channels_last, autocast, albumentations,
its optimizer); the plain side decodes the raw PNGs with PIL, augments with torchvision and trains in fp32
with AdamW in the default memory layout. Both drop the ragged last batch, so both time the same images.
Run: ``python bench/train_bench.py --images 256`` (any config key is a flag, e.g. ``--img-size 224``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import timm
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lib.common import seed_everything
from lib.config import Config, parse_config
from lib.layout import FoldData, load_fold
from train import Trainer, TrainError

SETUP_HINT = (
    "run python src/resize.py --config configs/demo.yaml and python src/folds.py --config configs/demo.yaml "
    "(or bash scripts/run_all.sh) first"
)


class PlainDataset(Dataset):
    """Raw image files read with PIL and transformed with torchvision, as in timm's examples."""

    def __init__(self, paths: list[Path], targets: list[int], transform: T.Compose) -> None:
        self.paths, self.targets, self.transform = paths, targets, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = Image.open(self.paths[index]).convert("RGB")
        return self.transform(image), self.targets[index]


class PlainLoop:
    """The documented timm training loop: fp32, default memory layout, AdamW, cross-entropy."""

    def __init__(self, cfg: Config, data: FoldData, workers: int) -> None:
        self.model = timm.create_model(cfg.model, num_classes=data.num_classes)
        mean_std = timm.data.resolve_model_data_config(self.model)
        size = cfg.img_size or int(mean_std["input_size"][-1])
        transform = T.Compose([
            T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
            T.Normalize(mean_std["mean"], mean_std["std"]),
        ])  # fmt: skip
        paths = [Path(cfg.train_images) / name for name in data.train["image"]]
        dataset = PlainDataset(paths, data.train["target"].tolist(), transform)
        self.loader = DataLoader(
            dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=workers, drop_last=True
        )
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr)
        self.criterion = nn.CrossEntropyLoss()

    def run(self, max_batches: int | None = None) -> dict[str, float]:
        """One pass over the loader (or its first ``max_batches``): images/s and share of data wait."""
        self.model.train()
        seen, wait, total = 0, 0.0, 0.0
        start = tick = time.perf_counter()
        for i, (x, y) in enumerate(self.loader):
            if max_batches is not None and i >= max_batches:
                break
            wait += time.perf_counter() - tick
            loss = self.criterion(self.model(x), y)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            total += loss.item()  # the running loss the documented loop logs
            seen += len(x)
            tick = time.perf_counter()
        seconds = time.perf_counter() - start
        return {"images": seen, "seconds": seconds, "wait": wait}


def trainer_pass(trainer: Trainer, steps: int | None = None) -> dict[str, float]:
    """One train.py epoch (``steps`` limits it to its first steps, for the warm-up)."""
    full = trainer.steps_per_epoch
    trainer.steps_per_epoch = min(steps or full, full)
    images = trainer.steps_per_epoch * trainer.cfg.accum_steps * trainer.cfg.batch_size
    try:
        out = trainer.train_one_epoch()
    finally:
        trainer.steps_per_epoch = full
        trainer.epoch += 1  # a fresh shuffle next time, as in fit()
    seconds = images / out["images_per_s"]
    return {"images": images, "seconds": seconds, "wait": out["data_wait"] * seconds}


def check_inputs(cfg: Config) -> None:
    """Exit with the setup commands when the demo data or its resized copies / folds are missing."""
    needed = [
        Path(cfg.train_csv),
        Path(cfg.train_images),
        Path(cfg.folds_csv),
        cfg.resized_images / "_index.csv",
    ]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        sys.exit(f"train_bench: missing {', '.join(missing)}: {SETUP_HINT}")


def subset(cfg: Config, images: int) -> FoldData:
    """Fold 0 with its training rows cut to the first ``images`` (validation: one batch, never used)."""
    data = load_fold(folds_csv=cfg.folds_csv, resized=cfg.resized_images, fold=0)
    if images < cfg.batch_size:
        sys.exit(f"train_bench: --images {images} is less than one batch of {cfg.batch_size}")
    if len(data.train) < images:
        sys.exit(f"train_bench: fold 0 has only {len(data.train)} training images, asked for {images}")
    train = data.train.head(images).reset_index(drop=True)
    raw = [Path(cfg.train_images) / name for name in train["image"]]
    absent = [str(p) for p in raw if not p.is_file()]
    if absent:
        sys.exit(f"train_bench: raw image {absent[0]} (and {len(absent) - 1} more) missing: {SETUP_HINT}")
    return FoldData(train, data.val.head(cfg.batch_size).reset_index(drop=True), data.classes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("benchmark")
    group.add_argument("--images", type=int, default=256, help="training images timed per epoch (both sides)")
    group.add_argument("--epochs-measured", type=int, default=1, help="timed epochs per repeat and side")
    group.add_argument("--warmup-batches", type=int, default=3, help="untimed batches per side before timing")
    group.add_argument("--repeats", type=int, default=1, help="timed rounds, alternating order; best counts")
    group.add_argument(
        "--plain-workers", type=int, default=2, help="DataLoader num_workers of the plain loop"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = ["--config", "configs/demo.yaml", *argv]
    cfg, args = parse_config(argv, __doc__.splitlines()[0], add_arguments, stage="train")
    check_inputs(cfg)
    data = subset(cfg, args.images)
    seed_everything(cfg.seed)
    with tempfile.TemporaryDirectory() as tmp:
        # The schedule spans the measured epochs; the output folder is never written by train_one_epoch.
        run_cfg = replace(cfg, epochs=max(cfg.epochs, args.epochs_measured * args.repeats + 1))
        try:
            trainer = Trainer(run_cfg, 0, data, Path(tmp), rank=0, world=1, device=torch.device("cpu"))
        except TrainError as e:
            sys.exit(f"train_bench: {e}")
        plain = PlainLoop(cfg, data, args.plain_workers)
        plain.model.load_state_dict(trainer.model.state_dict())  # the same starting weights
        trainer_pass(trainer, args.warmup_batches)
        plain.run(args.warmup_batches)
        best: dict[str, dict[str, float]] = {}
        for r in range(args.repeats):
            order = ["train.py", "plain loop"] if r % 2 == 0 else ["plain loop", "train.py"]
            for side in order:
                runs = [
                    trainer_pass(trainer) if side == "train.py" else plain.run()
                    for _ in range(args.epochs_measured)
                ]
                total = {k: sum(run[k] for run in runs) for k in ("images", "seconds", "wait")}
                total["rate"] = total["images"] / total["seconds"]
                print(f"repeat {r + 1} {side}: {total['rate']:.1f} images/s", file=sys.stderr)
                if side not in best or total["rate"] > best[side]["rate"]:
                    best[side] = total
    print(
        f"\n{cfg.model} at {trainer.img_size} px, batch {cfg.batch_size}, {int(best['train.py']['images'])} images"
        f" x {args.epochs_measured} epoch(s), best of {args.repeats}, {torch.get_num_threads()} torch threads"
    )
    print(f"{'side':<12}{'images/s':>10}{'data wait':>11}  setup")
    setups = {
        "train.py": f"{cfg.optimizer}, {str(trainer.dtype or 'fp32').removeprefix('torch.')}, channels_last={cfg.channels_last}, "
        f"{trainer.train_loader.num_workers} workers, resized copies",
        "plain loop": f"adamw, fp32, contiguous, {args.plain_workers} workers, raw images + PIL",
    }
    for side in ("train.py", "plain loop"):
        b = best[side]
        print(f"{side:<12}{b['rate']:>10.1f}{b['wait'] / b['seconds']:>10.0%}  {setups[side]}")
    print(f"train.py / plain loop = {best['train.py']['rate'] / best['plain loop']['rate']:.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
