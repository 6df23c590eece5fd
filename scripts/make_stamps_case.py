"""Build a many-class competition from real pictures that install offline: Debian's Tux Paint stamps.

``apt-get install tuxpaint-stamps-default`` ships ~800 stamp pictures (photographs and drawings of animals,
food, coins, buildings, vehicles, ...; transparent PNGs). Each stamp becomes one class named after its place
in the collection, e.g. ``animals/birds + robin`` (class names with spaces, ``/`` and ``+`` stay strings end
to end); each image of a class is the stamp composited on a random background at a random scale, rotation,
position, mirror, colour and JPEG quality, so the task is instance recognition among look-alikes (coins,
birds, fruit) under heavy nuisance variation. Letters, digits and other plain symbols are left out.

``python scripts/make_stamps_case.py --out input/stamps --classes 200`` writes ``train.csv`` (image,label),
``train_images/``, ``test_images/`` and ``test_labels.csv`` under ``--out``; ``configs/stamps.yaml`` points
the pipeline at that folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image

STAMPS = Path("/usr/share/tuxpaint/stamps")
SKIPPED = ("symbols/alphabets", "symbols/math", "symbols/shapes", "symbols/punctuation")


def stamp_files(root: Path) -> list[Path]:
    """Every stamp picture (no mirrored or thumbnail variants, no plain symbols), sorted."""
    files = []
    for path in sorted(root.rglob("*.png")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(SKIPPED) or path.stem.endswith(("_mirror", "_flip")) or "thumb" in rel:
            continue
        files.append(path)
    return files


def class_name(path: Path, root: Path) -> str:
    """'animals/birds + robin' for animals/birds/robin.png (the folder path, then the stamp's own name)."""
    rel = path.relative_to(root)
    return f"{'/'.join(rel.parent.parts)} + {rel.stem.replace('_', ' ')}"


def background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A random RGB background: a two-colour gradient with noise (HxWx3 uint8)."""
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, size)[:, None, None]
    grad = a * (1 - t) + b * t
    if rng.random() < 0.5:
        grad = grad.transpose(1, 0, 2)
    grad = np.broadcast_to(grad, (size, size, 3)) + rng.normal(0, 12, (size, size, 3))
    return np.clip(grad, 0, 255).astype(np.uint8)


def render(stamp: Image.Image, size: int, rng: np.random.Generator) -> np.ndarray:
    """One image of a stamp: scaled to 45-95% of the canvas, rotated, mirrored, placed, recoloured (RGB)."""
    rgba = stamp.convert("RGBA")
    scale = rng.uniform(0.45, 0.95) * size / max(rgba.size)
    rgba = rgba.resize((max(1, round(rgba.width * scale)), max(1, round(rgba.height * scale))), Image.BICUBIC)
    rgba = rgba.rotate(rng.uniform(-25, 25), resample=Image.BICUBIC, expand=True)
    if rng.random() < 0.5:
        rgba = rgba.transpose(Image.FLIP_LEFT_RIGHT)
    canvas = Image.fromarray(background(size, rng))
    x = int(rng.integers(min(0, size - rgba.width), max(1, size - rgba.width + 1)))
    y = int(rng.integers(min(0, size - rgba.height), max(1, size - rgba.height + 1)))
    canvas.paste(rgba, (x, y), rgba)
    img = np.asarray(canvas).astype(np.float32)
    img = img * rng.uniform(0.7, 1.3) + rng.uniform(-30, 30)  # contrast and brightness
    return np.clip(img, 0, 255).astype(np.uint8)


def write(path: Path, img: np.ndarray, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    quality = int(rng.integers(60, 96))
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("input/stamps"), help="folder of the competition")
    p.add_argument("--classes", type=int, default=200, help="number of stamps (classes) to use")
    p.add_argument("--train-per-class", type=int, default=16, help="training images per class")
    p.add_argument("--test-per-class", type=int, default=4, help="held-out images per class")
    p.add_argument("--size", type=int, default=128, help="side of every image in pixels")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    files = stamp_files(STAMPS)
    if len(files) < args.classes:
        print(
            f"make_stamps_case: {len(files)} stamps under {STAMPS}, {args.classes} asked: install Debian's "
            "tuxpaint-stamps-default (apt-get install tuxpaint-stamps-default) or lower --classes",
            file=sys.stderr,
        )
        return 2
    rng = np.random.default_rng(args.seed)
    chosen = sorted(rng.choice(len(files), size=args.classes, replace=False).tolist())
    rows = {"train": [], "test": []}
    for c, k in enumerate(chosen):
        name = class_name(files[k], STAMPS)
        with Image.open(files[k]) as stamp:
            stamp.load()
            for split, n in (("train", args.train_per_class), ("test", args.test_per_class)):
                for i in range(n):
                    rel = f"{c:03d}_{i:02d}.jpg"
                    write(args.out / f"{split}_images" / rel, render(stamp, args.size, rng), rng)
                    rows[split].append({"image": rel, "label": name})
    pd.DataFrame(rows["train"]).to_csv(args.out / "train.csv", index=False)
    pd.DataFrame(rows["test"]).to_csv(args.out / "test_labels.csv", index=False)
    print(f"{args.classes} classes: {len(rows['train'])} training and {len(rows['test'])} test images in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
