"""Throughput of src/resize.py against the plain PIL loop most pipelines start with.

Both shrink the same synthetic photos (smooth gradients, noise and shapes, so JPEG sizes are realistic)
to a quarter of their size and save JPEGs. The PIL loop decodes every pixel in one process; resize.py
decodes at reduced DCT scale in one process per core. Run: ``python bench/resize_bench.py``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lib.config import Config
from resize import resize_folder


def synthetic_photo(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A BGR image with the statistics of a photo: smooth shading, texture noise, edges."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.empty((height, width, 3), np.float32)
    for c in range(3):
        fx, fy, phase = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 2 * np.pi)
        img[..., c] = 128 + 60 * np.sin(2 * np.pi * (fx * x / width + fy * y / height) + phase)
        img[..., c] += rng.uniform(-40, 40) * (x / width) + rng.uniform(-40, 40) * (y / height)
    for _ in range(25):
        colour = tuple(float(v) for v in rng.uniform(0, 255, 3))
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        if rng.random() < 0.5:
            cv2.circle(img, centre, int(rng.integers(20, height // 4)), colour, -1, cv2.LINE_AA)
        else:
            size = (int(rng.integers(40, width // 3)), int(rng.integers(40, height // 3)))
            corner = (centre[0] + size[0], centre[1] + size[1])
            cv2.rectangle(img, centre, corner, colour, -1, cv2.LINE_AA)
    img = cv2.GaussianBlur(img, (0, 0), 1.5)
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def pil_loop(src: Path, dst: Path, quality: int) -> None:
    """The straightforward baseline: open, convert, resize with the default filter, save."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.glob("*.jpg")):
        with Image.open(path) as im:
            rgb = im.convert("RGB")
        rgb.resize((rgb.width // 4, rgb.height // 4)).save(dst / path.name, "JPEG", quality=quality)


def best_time(run: Callable[[Path], None], scratch: Path, repeats: int) -> float:
    """Fastest of several runs, each into a fresh output folder (nothing can be skipped)."""
    times = []
    for i in range(repeats):
        out = scratch / f"out{i}"
        start = time.perf_counter()
        run(out)
        times.append(time.perf_counter() - start)
        shutil.rmtree(out)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40, help="number of images")
    parser.add_argument("--width", type=int, default=2000)
    parser.add_argument("--height", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each; the fastest counts")
    args = parser.parse_args()

    cfg = Config(resize=max(args.width, args.height) // 4, workers=0)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        src = scratch / "src"
        src.mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.n):
            img = synthetic_photo(rng, args.width, args.height)
            cv2.imwrite(str(src / f"{i:03d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        megabytes = sum(p.stat().st_size for p in src.iterdir()) / 2**20
        print(f"{args.n} JPEGs {args.width}x{args.height} ({megabytes:.1f} MiB) -> long side {cfg.resize}")

        pil = best_time(lambda out: pil_loop(src, out, cfg.jpeg_quality), scratch, args.repeats)
        ours = best_time(lambda out: resize_folder(src, out, cfg), scratch, args.repeats)

    print(f"PIL loop:  {args.n / pil:7.1f} images/s")
    print(f"resize.py: {args.n / ours:7.1f} images/s")
    print(f"resize.py / PIL loop = {pil / ours:.2f}×")


if __name__ == "__main__":
    main()
