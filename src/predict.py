"""Predict a folder of test images with the bundle, inside a time limit, always leaving a valid submission.

``python src/predict.py TEST_DIR [--bundle output/bundle] [--out submissions/submission.csv]
[--time-limit SECONDS] [--format csv|json] [--probs] [--sample-submission FILE] [--batch-size N]
[--device auto|cpu|cuda] [--workers N] [--threads N]``

- The bundle (src/package.py) is verified first: a missing, changed or extra file, or an edited manifest, is
  refused naming the file (exit 2) before anything is loaded. Nothing downloads (HF_HUB_OFFLINE=1, models
  rebuilt with pretrained none).
- Every image under TEST_DIR (recursively; every format and size resize.py accepts) is decoded once, in
  batches by loader workers, and preprocessed as its members were validated (bundle.Prep); the models run on
  the GPU when there is one, else the CPU (channels_last; bf16 where the hardware runs it natively, fp32 when
  the config trained in fp32), every fold and planned view of every member, then the stacker.
- Submission: CSV ``image,label`` (image relative to TEST_DIR, rows sorted) by default; with
  ``--sample-submission`` its rows and columns (its first column the id, matched to files by relative path,
  with or without extension; class-name columns get probabilities, any other column the label); ``--format
  json`` writes {image: label}; ``--probs`` adds one probability column (or field) per class.
- Time limit (default: the manifest's), counted from process start, model loading included. A complete
  fallback submission is written atomically as soon as the image list is known. After every batch a watchdog
  projects the finish from the measured cost per image; when it would overrun, the remaining images step down
  the bundle's ladder (full plan -> plain view only -> fastest member -> its first fold) and, when even one
  more batch would not fit before the safety margin, the rest keep the fallback prediction (the most
  frequent training class). A timer thread writes what is done and exits just before the deadline should a
  batch hang. The log ends with the number of images per path and the wall time.
- Unreadable images get the fallback prediction and a warning naming them; a missing or empty TEST_DIR (or
  one without images) is an error, exit 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lib.bundle import (
    ORIG,
    BundleError,
    PredictDataset,
    Prep,
    default_batch_size,
    is_oom,
    member_logits,
    place,
    safety_margin,
    softmax,
    verify_bundle,
)
from lib.common import atomic_write, get_logger, num_workers
from lib.config import Config
from lib.data import make_loader
from lib.images import find_images, match_ids
from lib.models import cpu_has_fast_bf16, inference_dtype, model_from_checkpoint

_IMPORT_TIME = time.time()
log = get_logger("predict")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = ROOT / "output" / "bundle"
DEFAULT_OUT = ROOT / "submissions" / "submission.csv"
UNREADABLE, MISSING, FALLBACK = "unreadable", "missing", "fallback"


class PredictError(Exception):
    """A problem with the inputs (test folder, sample submission, options); exit 2 with this message."""


def process_start() -> float:
    """When this process started (epoch seconds), from /proc; the import time where /proc is unavailable."""
    try:
        stat = Path("/proc/self/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks since boot
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        age = uptime - ticks / os.sysconf("SC_CLK_TCK")
        if 0 <= age < 86_400:
            return time.time() - age
    except (OSError, ValueError, IndexError):
        pass
    return _IMPORT_TIME


# ---------------------------------------------------------------------------------------------------------
# Rows and output files.


@dataclass
class Rows:
    """The submission's rows: their ids, the file each reads (index into ``files``) or None (missing)."""

    ids: list[str]
    source: list[int | None]
    files: list[str]  # relative paths of the images to predict
    escaping: set[int]  # files that are links pointing outside TEST_DIR: never read
    header: list[str] | None = None  # sample submission's columns


def find_test_images(test_dir: Path) -> tuple[list[str], list[str]]:
    if not test_dir.exists():
        raise PredictError(f"test folder {test_dir} does not exist: pass the folder of test images")
    if not test_dir.is_dir():
        raise PredictError(f"{test_dir} is not a folder: pass the folder of test images")
    usable, escaping = find_images(test_dir)
    if not usable and not escaping:
        anything = any(test_dir.iterdir())
        what = "holds no image files (jpg, jpeg, png, bmp, tif, tiff, webp)" if anything else "is empty"
        raise PredictError(f"test folder {test_dir} {what}: nothing to predict")
    return usable, escaping


def make_rows(test_dir: Path, sample: Path | None) -> Rows:
    usable, escaping = find_test_images(test_dir)
    files = sorted(usable + escaping)
    esc = {i for i, f in enumerate(files) if f in set(escaping)}
    if escaping:
        log.warning(
            "%d file(s) link outside %s and are not read (fallback prediction): %s",
            len(escaping), test_dir, _preview(escaping),
        )  # fmt: skip
    if sample is None:
        return Rows(files, list(range(len(files))), files, esc)
    header, ids = read_sample(sample)
    index = match_ids(ids, files)
    missing = [i for i, s in zip(ids, index, strict=True) if s is None]
    if missing:
        log.warning(
            "%d id(s) of %s have no image in %s (fallback prediction): %s",
            len(missing), sample, test_dir, _preview(missing),
        )  # fmt: skip
    used = {s for s in index if s is not None}
    if len(used) < len(files):
        log.info(
            "%d image(s) of %s are not in the sample submission and are not predicted",
            len(files) - len(used),
            test_dir,
        )
    return Rows(ids, index, files, esc, header)


def read_sample(path: Path) -> tuple[list[str], list[str]]:
    if not path.is_file():
        raise PredictError(f"sample submission {path} not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            table = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise PredictError(f"sample submission {path} is not a readable CSV: {e}") from e
    if not table or len(table[0]) < 2:
        raise PredictError(
            f"sample submission {path} needs a header with an id column and at least one more column"
        )
    header = table[0]
    return header, [r[0] for r in table[1:] if r]


@dataclass
class Writer:
    """Renders the rows as the requested file and writes it atomically; thread-safe."""

    out: Path
    fmt: str
    with_probs: bool
    rows: Rows
    classes: list[str]
    lock: threading.Lock = field(default_factory=threading.Lock)

    def render(self, probs: np.ndarray, fallback: np.ndarray) -> str:
        p = (
            np.stack([probs[s] if s is not None else fallback for s in self.rows.source])
            if self.rows.ids
            else probs[:0]
        )
        labels = [self.classes[i] for i in p.argmax(axis=1)] if len(p) else []
        if self.fmt == "json":
            if self.with_probs:
                data: dict[str, Any] = {
                    i: {
                        "label": lab,
                        "probs": {c: float(f"{v:.6g}") for c, v in zip(self.classes, row, strict=True)},
                    }
                    for i, lab, row in zip(self.rows.ids, labels, p, strict=True)
                }
            else:
                data = dict(zip(self.rows.ids, labels, strict=True))
            return json.dumps(data, ensure_ascii=False, indent=1) + "\n"
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        header = self.rows.header or ["image", "label"]
        col = {c: j for j, c in enumerate(self.classes)}
        given = header[1:]
        prob_cols = given if self.rows.header and len(given) >= 2 and set(given) <= set(self.classes) else []
        extra = [c for c in self.classes if c not in prob_cols] if self.with_probs else []
        names = [f"prob_{c}" if c in header else c for c in extra]
        writer.writerow([*header, *names])
        for rid, lab, row in zip(self.rows.ids, labels, p, strict=True):
            cells = [f"{row[col[c]]:.6g}" for c in prob_cols] if prob_cols else [lab] * (len(header) - 1)
            writer.writerow([rid, *cells, *(f"{row[col[c]]:.6g}" for c in extra)])
        return buf.getvalue()

    def write(self, probs: np.ndarray, fallback: np.ndarray) -> None:
        text = self.render(probs, fallback)
        with self.lock:
            atomic_write(self.out, text)


def _preview(names: list[str], n: int = 10) -> str:
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


# ---------------------------------------------------------------------------------------------------------
# Models and the ladder.


@dataclass
class Level:
    name: str
    members: list[dict]  # {"name", "views", "folds": indices into the member's folds}
    stacker: bool
    plan_ms: float
    preps: list[Prep] = field(default_factory=list)


class Predictor:
    """The bundle's models (loaded on demand, cheapest ladder steps first) and the stacker."""

    def __init__(
        self, bundle_dir: Path, manifest: dict, device: torch.device, dtype: torch.dtype | None
    ) -> None:
        self.dir, self.manifest, self.device, self.dtype = bundle_dir, manifest, device, dtype
        self.members = {m["name"]: m for m in manifest["members"]}
        self.models: dict[tuple[str, int], nn.Module] = {}
        self.stacker: Any = None
        self.levels = []
        for step in manifest["ladder"]:
            level = Level(step["name"], step["members"], step["stacker"], float(step["ms_per_image"]))
            level.preps = list(dict.fromkeys(
                Prep.of(self.members[m["name"]]["preprocessing"], v if v.startswith("scale") else ORIG)
                for m in level.members for v in m["views"]
            ))  # fmt: skip
            self.levels.append(level)

    def needs(self, level: Level) -> list[tuple[str, int] | str]:
        return [(m["name"], k) for m in level.members for k in m["folds"]] + (
            ["stacker"] if level.stacker else []
        )

    def ready(self, level: Level) -> bool:
        return all(self.models.get(n) is not None if n != "stacker" else self.stacker is not None
                   for n in self.needs(level))  # fmt: skip

    def load(self, deadline: float, margin: float) -> bool:
        """Load what the ladder needs, cheapest step first, while the time left allows; False when a file
        failed to load (logged; the steps needing it are skipped)."""
        ok = True
        order: list[tuple[str, int] | str] = []
        for level in reversed(self.levels):
            order += [n for n in self.needs(level) if n not in order]
        for item in order:
            if item == "stacker":
                estimate = 1.0
            else:
                m = self.members[item[0]]
                estimate = float(m.get("load_s", 0.0)) / max(1, len(m["files"]))
            if time.time() + estimate > deadline - margin:
                log.warning("time limit: stopped loading models (%s and later not loaded)", item)
                return ok
            try:
                if item == "stacker":
                    from stack import Stacker  # numpy + xgboost only

                    self.stacker = Stacker.load(self.dir / self.manifest["stacker"]["dir"])
                else:
                    name, k = item
                    model = model_from_checkpoint(self.dir / self.members[name]["files"][k])[0]
                    self.models[item] = place(model, self.members[name]["preprocessing"], self.device)
            except Exception as e:  # the cheaper steps loaded so far still serve
                log.exception(
                    "cannot load %s from the bundle (%s): the steps needing it are skipped", item, e
                )
                ok = False
        return ok

    def member_features(self, level: Level, inputs: dict[Prep, torch.Tensor]) -> list[np.ndarray]:
        """Each member's logits (mean over its folds and views) for one batch, in the level's order."""
        out = []
        for m in level.members:
            models = [self.models[(m["name"], k)] for k in m["folds"]]
            pre = self.members[m["name"]]["preprocessing"]
            out.append(member_logits(models, pre, m["views"], inputs, self.device, self.dtype).numpy())
        return out

    def predict(self, level: Level, inputs: dict[Prep, torch.Tensor]) -> np.ndarray:
        feats = self.member_features(level, inputs)
        if level.stacker:
            return self.stacker.predict_proba(feats)
        return softmax(np.mean(feats, axis=0))


# ---------------------------------------------------------------------------------------------------------
# The run.


@dataclass
class LevelStats:
    images: int = 0
    batches: int = 0
    compute_s: float = 0.0
    wait_s: float = 0.0  # waiting for data, first batch excluded (worker start-up)
    wait_images: int = 0

    def per_image(self, data_s: float) -> float | None:
        if not self.images:
            return None
        data = self.wait_s / self.wait_images if self.wait_images else data_s
        return self.compute_s / self.images + data


@dataclass
class Run:
    """State shared by the main loop and the deadline timer."""

    writer: Writer
    probs: np.ndarray
    fallback: np.ndarray
    paths: list[str]
    start: float
    finished: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def summary(self) -> str:
        counts = Counter(self.paths[s] if s is not None else MISSING for s in self.writer.rows.source)
        width = max(len(k) for k in counts)
        lines = ["images per path:"] + [f"  {k:<{width}}  {v}" for k, v in counts.items()]
        lines.append(f"wall time {time.time() - self.start:.1f} s since start")
        return "\n".join(lines)

    def finish(self, why: str = "") -> bool:
        """Write the final file once (main loop or timer, whichever comes first)."""
        with self.lock:
            if self.finished:
                return False
            self.finished = True
            self.writer.write(self.probs, self.fallback)
        log.info("%swrote %s (%d rows)\n%s", why, self.writer.out, len(self.writer.rows.ids), self.summary())
        return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("test_dir", type=Path, help="folder of test images (searched recursively)")
    p.add_argument(
        "--bundle", type=Path, default=DEFAULT_BUNDLE, help="bundle folder written by src/package.py"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"submission file (default {DEFAULT_OUT}, .json for --format json)",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="seconds from process start, loading included (default: the manifest's; 0: none)",
    )
    p.add_argument("--format", choices=("csv", "json"), default="csv", help="submission format")
    p.add_argument(
        "--probs", action="store_true", help="add one probability column (or JSON field) per class"
    )
    p.add_argument(
        "--sample-submission",
        type=Path,
        default=None,
        help="CSV fixing the rows (its first column) and columns",
    )
    p.add_argument("--batch-size", type=int, default=0, help="images per batch (0: 8 on a CPU, 128 on a GPU)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the models run")
    p.add_argument("--workers", type=int, default=0, help="image decoding processes (0: one per core)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads on the CPU (0: one per core; 1 can win on a busy machine)",
    )
    return p.parse_args(argv)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise PredictError("--device cuda but no CUDA GPU is visible: use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def offline() -> None:
    """Hugging Face offline mode (timm never reaches the hub here: models are built with pretrained none)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass


def main(argv: list[str] | None = None, start: float | None = None, hard_exit: bool = False) -> int:
    """Exit status: 0 done; 1 the file was written but a step failed (logged); 2 bad inputs or bundle.

    ``start`` is when the time limit starts counting (the CLI passes the process start; default: now).
    ``hard_exit`` (the CLI): should a batch still run at the deadline, the timer that writes the file then
    ends the process; in-process callers only get the file written.
    """
    start = time.time() if start is None else start
    offline()
    args = parse_args(argv)
    try:
        return run(args, start, hard_exit)
    except (PredictError, BundleError) as e:
        log.error("%s", e)
        return 2


def run(args: argparse.Namespace, start: float, hard_exit: bool = False) -> int:
    rows = make_rows(args.test_dir, args.sample_submission)
    manifest = verify_bundle(args.bundle)
    classes = manifest["classes"]
    device = pick_device(args.device)
    limit = manifest.get("time_limit", 0.0) if args.time_limit is None else args.time_limit
    deadline = start + limit if limit and limit > 0 else math.inf
    margin = safety_margin(limit) if math.isfinite(deadline) else 0.0
    out = args.out or (DEFAULT_OUT.with_suffix(".json") if args.format == "json" else DEFAULT_OUT)
    fallback = np.asarray(manifest["fallback"]["probs"], dtype=np.float64)
    state = Run(
        Writer(out, args.format, args.probs, rows, classes),
        np.tile(fallback, (len(rows.files), 1)), fallback,
        [UNREADABLE if i in rows.escaping else FALLBACK for i in range(len(rows.files))], start,
    )  # fmt: skip
    state.writer.write(state.probs, fallback)  # a valid file from now on, whatever happens
    log.info(
        "%d row(s), %d image(s) in %s; bundle %s verified; time limit %s",
        len(rows.ids), len(rows.files), args.test_dir, args.bundle, f"{limit:.0f} s" if math.isfinite(deadline) else "none",
    )  # fmt: skip
    timer = None
    if math.isfinite(deadline):
        timer = threading.Timer(
            max(0.0, deadline - margin / 2 - time.time()), _on_deadline, (state, hard_exit)
        )
        timer.daemon = True
        timer.start()
    try:
        status = predict_all(args, manifest, rows, state, device, deadline, margin)
    finally:
        if timer is not None:
            timer.cancel()
    state.finish()
    return status


def _on_deadline(state: Run, hard_exit: bool) -> None:
    """A batch overran the watchdog's projection: write what is done and stop before the deadline."""
    if state.finish("deadline reached while a batch was running: ") and hard_exit:
        logging_flush()
        os._exit(0)


def logging_flush() -> None:
    for h in log.root.handlers:
        h.flush()


def predict_all(args: argparse.Namespace, manifest: dict, rows: Rows, state: Run, device: torch.device,
                deadline: float, margin: float) -> int:  # fmt: skip
    """Fill state.probs / state.paths for every readable image, stepping down the ladder as time requires."""
    if device.type == "cpu":
        torch.set_num_threads(num_workers(args.threads))
    dtype = inference_dtype(manifest.get("config", {}).get("precision", "auto"), device)
    predictor = Predictor(args.bundle, manifest, device, dtype)
    batch = args.batch_size or default_batch_size(device)
    wanted = {s for s in rows.source if s is not None}
    todo = [i for i in range(len(rows.files)) if i in wanted and i not in rows.escaping]
    cfg = Config(workers=args.workers, batch_size=batch)

    def open_loader(level: Level, part: list[int]) -> tuple[PredictDataset, Any]:
        """The dataset of ``part`` for ``level`` and an iterator over its batches (workers started)."""
        dataset = PredictDataset([args.test_dir / rows.files[i] for i in part], level.preps)
        return dataset, iter(make_loader(dataset, cfg, train=False, batch_size=batch))

    # The loader's workers start decoding the first batches of the full plan while the models load.
    first = predictor.levels[0] if todo and predictor.levels[0].name != FALLBACK else None
    opened = open_loader(first, todo) if first is not None else None
    status = 0 if predictor.load(deadline, margin) else 1
    levels = [lv for lv in predictor.levels if lv.name != FALLBACK and predictor.ready(lv)]
    log.info(
        "device %s (%s), %s, %d thread(s); ladder: %s", device,
        torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "fp32" if dtype is None else str(dtype).removeprefix("torch.") + (" (native)" if device.type == "cuda" or cpu_has_fast_bf16() else ""),
        torch.get_num_threads(), " -> ".join(f"{lv.name} {lv.plan_ms:.1f} ms" for lv in levels) + " -> fallback",
    )  # fmt: skip
    data_s = float(manifest["plan"].get("decode_ms_per_image", 0.0)) / 1000
    stats = {lv.name: LevelStats() for lv in levels}
    unreadable: list[str] = []
    pos, li = 0, 0

    def estimate(i: int) -> float:
        """Seconds per image at level i: measured, else scaled from the nearest measured level, else planned."""
        own = stats[levels[i].name].per_image(data_s)
        if own is not None:
            return own
        for j in range(i - 1, -1, -1):
            other = stats[levels[j].name].per_image(data_s)
            if other is not None and levels[j].plan_ms > 0:
                return other * levels[i].plan_ms / levels[j].plan_ms
        return levels[i].plan_ms / 1000

    while pos < len(todo) and li < len(levels):
        remaining = len(todo) - pos
        # Step down while not even one batch of this level fits before the margin.
        while li < len(levels) and time.time() + estimate(li) * min(batch, remaining) > deadline - margin:
            li += 1
        if li >= len(levels):
            break
        level, st = levels[li], stats[levels[li].name]
        part = todo[pos:]
        done, step_down, stop, it = 0, False, False, None
        try:
            if opened is not None and level is first and pos == 0:
                dataset, it = opened
            else:
                dataset, it = open_loader(level, part)
            opened = None
            while done < len(part):
                if time.time() + estimate(li) * min(batch, len(part) - done) > deadline - margin:
                    stop = li == len(levels) - 1
                    step_down = not stop
                    log.info("watchdog: another batch on path %s would not end before the margin", level.name)
                    break
                tick = time.time()
                try:
                    tensors, index = next(it)
                except StopIteration:
                    break
                got = time.time()
                probs = predictor.predict(level, dict(zip(level.preps, tensors, strict=True)))
                now = time.time()
                ids = [part[j] for j in index.tolist()]
                bad = set(dataset.failed)
                with state.lock:
                    for row, j, p in zip(ids, index.tolist(), probs, strict=True):
                        if j in bad:
                            state.paths[row] = UNREADABLE
                        else:
                            state.probs[row], state.paths[row] = p, level.name
                unreadable += [rows.files[part[j]] for j in index.tolist() if j in bad]
                done += len(ids)
                st.images += len(ids)
                st.compute_s += now - got
                if st.batches:
                    st.wait_s += got - tick
                    st.wait_images += len(ids)
                st.batches += 1
                left = len(part) - done
                if left and li < len(levels) - 1 and now + left * estimate(li) > deadline - margin:
                    log.info(
                        "watchdog: %d image(s) left at %.1f ms/image would end %.1f s after the deadline margin: "
                        "stepping down from %s to %s", left, estimate(li) * 1000, now + left * estimate(li) - (deadline - margin),
                        level.name, levels[li + 1].name,
                    )  # fmt: skip
                    step_down = True
                    break
        except Exception as e:  # a failing step degrades instead of losing the file
            if is_oom(e) and batch > 1:
                batch //= 2
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                log.warning("out of memory on path %s: batch size %d from now on", level.name, batch)
                step_down = stop = False
            else:
                log.exception("path %s failed (%s): the remaining images take the next path", level.name, e)
                status, step_down = 1, True
        finally:
            it = None  # stops the loader's workers
        pos += done
        if stop:
            break
        if step_down:
            li += 1
    opened = None  # unused prefetch (the full plan was not loaded in time): stops its workers
    left = len(todo) - pos
    if left:
        log.warning(
            "%d image(s) get the fallback prediction %r: %s", left, manifest["fallback"]["label"],
            "no time left for them" if status == 0 else "no time left, or a path failed (see above)",
        )  # fmt: skip
    if unreadable:
        log.warning(
            "%d unreadable image(s) got the fallback prediction: %s", len(unreadable), _preview(unreadable)
        )
    return status


def cli() -> int:
    return main(start=process_start(), hard_exit=True)


if __name__ == "__main__":
    sys.exit(cli())
