"""Prediction throughput of src/predict.py against the plain loop a newcomer writes, and its overhead.

1. **predict.py vs a plain loop**, same bundle, images, process and torch threads: predict.py's ``main``
   (verification, loading, loader workers, batches, channels_last, the planned views, writing the CSV) against
   the loop from timm's docs: PIL ``open().convert("RGB")``, timm's eval transform, one image at a time, fp32,
   default memory layout, every fold and view of every member of the bundle's full plan, then its stacker.
2. **Overhead**: predict.py's wall time against the model-only time: the same models on synthetic tensors
   of the same sizes and batch (bundle.member_logits, then the stacker), i.e. everything but decoding,
   preprocessing, loading and writing.

Without ``--bundle`` it builds its own: one member, ``--model`` (default the demo's tf_efficientnet_lite0) with
random weights (pretrained none, nothing to train or download) at ``--size`` px; without ``--test-dir`` it
writes ``--images`` synthetic 400x300 JPEGs. Run: ``python bench/predict_bench.py`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import csv
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lib import bundle
from lib.common import atomic_dir, num_workers
from lib.images import find_images
from lib.metrics import softmax
from lib.models import create_model, data_config, inference_dtype, model_from_checkpoint, save_checkpoint
from lib.preprocess import Preprocessing, apply_view
from lib.stacker import Stacker

CLASSES = ["defect_0", "defect_1", "defect_1of3", "defect_2of3"]


def build_bundle(dest: Path, model_name: str, size: int) -> Path:
    """A one-member, one-fold bundle of a random-weight model (orig view, no stacker). Its checkpoint config
    holds what rebuilding and preprocessing it read (the pipeline's defaults but the model and size)."""
    config = {
        "model": model_name, "pretrained": "none", "img_size": size, "in_chans": 3, "drop_rate": 0.0,
        "drop_path_rate": 0.0, "crop": "rrc", "resize": 600, "upscale": False, "letterbox": False,
        "channels_last": True, "precision": "auto",
    }  # fmt: skip
    model = create_model(model_name, num_classes=len(CLASSES), pretrained="none")
    with atomic_dir(dest) as build:
        rel = "members/bench/fold0.pt"
        save_checkpoint(build / rel, {
            "model": model.state_dict(), "classes": CLASSES, "config": config, "data_config": data_config(model),
        })  # fmt: skip
        pre = Preprocessing.of_checkpoint(config, data_config(model)).to_dict()
        step = {"name": "bench", "views": ["orig"], "folds": [0]}
        bundle.write_manifest(build, {
            "format_version": bundle.FORMAT_VERSION, "classes": CLASSES,
            "fallback": {"label": CLASSES[0], "index": 0, "probs": [1.0, 0.0, 0.0, 0.0]},
            "members": [{"name": "bench", "folds": [0], "files": [rel], "preprocessing": pre, "views": ["orig"],
                         "load_s": 0.5}],
            "stacker": {"kind": None, "dir": "stacker", "files": [], "members": ["bench"]},
            "plan": {"decode_ms_per_image": 0.0}, "time_limit": 0.0,
            "ladder": [{"name": "full", "members": [step], "stacker": False, "ms_per_image": 1.0},
                       {"name": "fallback", "members": [], "stacker": False, "ms_per_image": 0.0}],
        })  # fmt: skip
    return dest


def write_images(folder: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = rng.integers(0, 60, (300, 400, 3), dtype=np.uint8)
        img[100:200, 150:250] += rng.integers(100, 190, 3, dtype=np.uint8)  # something to look at
        Image.fromarray(img).save(folder / f"img_{i:04d}.jpg", quality=90)
    return folder


class PlainLoop:
    """The documented timm inference loop over the bundle's full plan: batch 1, fp32, default layout."""

    def __init__(self, folder: Path, manifest: dict) -> None:
        full = next(s for s in manifest["ladder"] if s["name"] == "full")
        members = {m["name"]: m for m in manifest["members"]}
        self.parts = []
        for step in full["members"]:
            m = members[step["name"]]
            models = [model_from_checkpoint(folder / m["files"][k])[0] for k in step["folds"]]
            pre = m["preprocessing"]
            transform = timm.data.create_transform(
                input_size=(3, pre["img_size"], pre["img_size"]), interpolation=pre["interpolation"],
                mean=tuple(pre["mean"]), std=tuple(pre["std"]), crop_pct=1.0,
            )  # fmt: skip
            self.parts.append((models, transform, step["views"]))
        self.stacker = None
        if full["stacker"]:
            self.stacker = Stacker.load(folder / manifest["stacker"]["dir"])
        self.classes = manifest["classes"]

    @torch.no_grad()
    def run(self, files: list[Path], out: Path) -> None:
        rows = []
        for path in files:
            image = Image.open(path).convert("RGB")
            feats = []
            for models, transform, views in self.parts:
                x = transform(image).unsqueeze(0)
                logits = [model(apply_view(x, v)) for model in models for v in views]
                feats.append(torch.stack(logits).mean(0).numpy())
            p = self.stacker.predict_proba(feats) if self.stacker else softmax(np.mean(feats, axis=0))
            rows.append((path.name, self.classes[int(p[0].argmax())]))
        with open(out, "w", newline="") as f:
            csv.writer(f).writerows([("image", "label"), *rows])


def model_only(folder: Path, manifest: dict, n: int, batch: int) -> float:
    """Seconds to run the full plan's models (and stacker) on ``n`` synthetic images in predict.py's batches."""
    device = torch.device("cpu")
    dtype = inference_dtype(manifest.get("config", {}).get("precision", "auto"), device)  # as predict.py runs
    predictor = bundle.Predictor(folder, manifest, device, dtype)
    predictor.load(math.inf, 0.0)
    level = predictor.levels[0]
    inputs = {p: torch.randn(batch, p.in_chans, p.size, p.size) for p in level.preps}
    predictor.predict(level, inputs)  # warm-up
    start = time.perf_counter()
    left = n
    while left > 0:
        k = min(batch, left)
        predictor.predict(level, {p: x[:k] for p, x in inputs.items()})
        left -= k
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, help="an existing bundle (default: build a random-weight one)")
    p.add_argument("--test-dir", type=Path, help="images to predict (default: --images synthetic JPEGs)")
    p.add_argument("--images", type=int, default=128, help="synthetic images (or the first N of --test-dir)")
    p.add_argument("--model", default="tf_efficientnet_lite0", help="model of the built bundle")
    p.add_argument("--size", type=int, default=224, help="input size of the built bundle")
    p.add_argument("--batch-size", type=int, default=0, help="predict.py's batch size (0: its default)")
    p.add_argument("--repeats", type=int, default=2, help="timed rounds per side, alternating; best counts")
    p.add_argument("--threads", type=int, default=0, help="torch threads of every side (0: one per core)")
    p.add_argument("--workers", type=int, default=0, help="predict.py's decoding processes (0: its default)")
    args = p.parse_args(argv)
    import predict  # after the arguments: --help works without the stage's imports

    torch.set_num_threads(num_workers(args.threads))
    args.batch_size = args.batch_size or bundle.default_batch_size(torch.device("cpu"))
    threads = ["--threads", str(torch.get_num_threads()), "--workers", str(args.workers)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = args.bundle or build_bundle(tmp / "bundle", args.model, args.size)
        manifest = bundle.verify_bundle(folder)
        if args.test_dir:
            names = find_images(args.test_dir)[0][: args.images]
            test = tmp / "test"
            test.mkdir()
            for name in names:  # the first N, flattened
                shutil.copy(args.test_dir / name, test / name.replace("/", "_"))
        else:
            test = write_images(tmp / "test", args.images)
        files = sorted(test / f for f in find_images(test)[0])
        n = len(files)
        plain = PlainLoop(folder, manifest)
        warm = tmp / "warm"
        warm.mkdir()
        for f in files[:4]:
            shutil.copy(f, warm / f.name)
        plain.run(files[:2], tmp / "plain.csv")
        predict.main([str(warm), "--bundle", str(folder), "--out", str(tmp / "warm.csv"),
                      "--batch-size", str(args.batch_size), *threads])  # fmt: skip

        best = {"predict.py": math.inf, "plain loop": math.inf}
        for r in range(args.repeats):
            for side in ("predict.py", "plain loop") if r % 2 == 0 else ("plain loop", "predict.py"):
                start = time.perf_counter()
                if side == "predict.py":
                    rc = predict.main([str(test), "--bundle", str(folder), "--out", str(tmp / "p.csv"),
                                       "--batch-size", str(args.batch_size), "--time-limit", "0", *threads])  # fmt: skip
                    assert rc == 0, rc
                else:
                    plain.run(files, tmp / "plain.csv")
                seconds = time.perf_counter() - start
                print(f"repeat {r + 1} {side}: {n / seconds:.1f} images/s ({seconds:.1f} s)", file=sys.stderr)
                best[side] = min(best[side], seconds)
        compute = model_only(folder, manifest, n, args.batch_size)
        agree = _agreement(tmp / "p.csv", tmp / "plain.csv")

    members = ", ".join(f"{m['name']} ({m['preprocessing']['img_size']} px, {len(m['files'])} fold(s), "
                        f"views {'+'.join(m['views'])})" for m in manifest["members"])  # fmt: skip
    print(
        f"\n{n} images, bundle: {members}; {torch.get_num_threads()} torch threads, CPU, batch {args.batch_size}"
    )
    print(f"{'side':<28}{'images/s':>10}{'seconds':>10}")
    rows = [
        ("predict.py (main, in-process)", n / best["predict.py"], best["predict.py"]),
        ("plain loop (PIL, batch 1)", n / best["plain loop"], best["plain loop"]),
        ("model only (synthetic)", n / compute, compute),
    ]
    for name, rate, seconds in rows:
        print(f"{name:<28}{rate:>10.1f}{seconds:>10.2f}")
    print(f"predict.py / plain loop = {best['plain loop'] / best['predict.py']:.2f}× (goal ≥ 3×)")
    print(f"predict.py overhead over the model alone = {best['predict.py'] / compute - 1:+.0%} (goal ≤ +20%)")
    print(f"labels agreeing with the plain loop: {agree:.0%}")
    return 0


def _agreement(a: Path, b: Path) -> float:
    with open(a) as fa, open(b) as fb:
        la, lb = dict(list(csv.reader(fa))[1:]), dict(list(csv.reader(fb))[1:])
    return sum(la.get(k) == v for k, v in lb.items()) / max(1, len(lb))


if __name__ == "__main__":
    sys.exit(main())
