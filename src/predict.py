"""Predict a folder of test images with the bundle, inside a time limit, always leaving a valid submission.

``python src/predict.py TEST_DIR [--bundle output/bundle] [--out submissions/submission.csv]
[--time-limit SECONDS] [--format csv|json] [--probs] [--sample-submission FILE] [--batch-size N]
[--device auto|cpu|cuda] [--workers N] [--threads N]``

- The bundle (src/package.py) is verified first: a missing, changed or extra file, or an edited manifest, is
  refused naming the file (exit 2) before anything is loaded. Nothing downloads (HF_HUB_OFFLINE=1, models
  rebuilt with pretrained none).
- Every non-hidden file under TEST_DIR (recursively; recognised by content, as resize.py reads images) is
  decoded once, in batches by loader workers, and preprocessed as its members were validated
  (lib/preprocess.py); the models run on the GPU when there is one, else the CPU (channels_last; bf16 where
  the hardware runs it natively, fp32 when the config trained in fp32), every fold and planned view of every
  member, then the stacker, its log-probabilities moved by the bundle's per-class offsets where package.py
  shipped them (``class_bias``, lib/bias.py: labels and probabilities both; a bundle without them predicts
  the stacker's own).
- Submission (lib/submission.py): CSV ``image,label`` (image relative to TEST_DIR, rows sorted) by default;
  with ``--sample-submission`` its rows and columns (its first column the id, matched to files by relative
  path, with or without extension). A sample with at least two columns named like the model's classes is a
  probability submission: those columns get the probabilities, any other column 0 (a warning names them);
  otherwise every column after the id gets the label. ``--format json`` writes {image: label}; ``--probs``
  adds one probability column (or field) per class.
- Time limit (default: the manifest's), counted from process start, model loading included. A complete
  fallback submission is written atomically as soon as the image list is known. After every batch a watchdog
  projects the finish from the measured cost per image; when it would overrun, the remaining images step down
  the bundle's ladder (full plan -> plain view only -> fastest member -> its first fold) and, when even one
  more batch would not fit before the safety margin, the rest keep the fallback prediction (the most
  frequent training class). A timer thread writes what is done and exits just before the deadline should a
  batch hang. The log ends with the number of images per path and the wall time.
- Unreadable images (and files that are no image) get the fallback prediction and a warning naming them; a
  missing or empty TEST_DIR (or one with only hidden files) is an error, exit 2.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lib.bundle import (
    BundleError,
    Level,
    PredictDataset,
    Predictor,
    default_batch_size,
    is_oom,
    safety_margin,
    verify_bundle,
)
from lib.common import PipelineError, get_logger, num_workers, preview
from lib.data import make_loader
from lib.models import cpu_has_fast_bf16, inference_dtype
from lib.submission import Rows, Writer, make_rows

_IMPORT_TIME = time.time()
log = get_logger("predict")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = ROOT / "output" / "bundle"
DEFAULT_OUT = ROOT / "submissions" / "submission.csv"
UNREADABLE, MISSING, FALLBACK = "unreadable", "missing", "fallback"


class PredictError(PipelineError):
    """A problem with the options (such as --device cuda without a GPU); exit 2 with this message. The test
    folder's and the sample submission's problems are lib.submission's SubmissionInputError."""


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
# The run.


@dataclass
class LevelStats:
    """The measured cost of one ladder level: images and batches predicted, model seconds, and seconds spent
    waiting for the loader (the first batch excluded: its wait is the workers' start-up)."""

    images: int = 0
    batches: int = 0
    compute_s: float = 0.0
    wait_s: float = 0.0
    wait_images: int = 0

    def add(self, images: int, wait_s: float, compute_s: float) -> None:
        if self.batches:
            self.wait_s += wait_s
            self.wait_images += images
        self.images += images
        self.compute_s += compute_s
        self.batches += 1

    def per_image(self, data_s: float) -> float | None:
        """Seconds per image (``data_s`` stands in for the loader's share until a wait was measured); None
        before the first batch."""
        if not self.images:
            return None
        data = self.wait_s / self.wait_images if self.wait_images else data_s
        return self.compute_s / self.images + data


class Watchdog:
    """Which ladder level predicts the remaining images, and when to step down to a cheaper one.

    ``levels``: the usable ladder, most expensive first; ``limit``: the epoch time every batch must end before
    (the deadline less the safety margin; inf: no limit); ``data_s``: the plan's decoding seconds per image.
    Once ``index`` passes the last level the remaining images keep the fallback prediction.
    """

    def __init__(self, levels: list[Level], limit: float, data_s: float) -> None:
        self.levels, self.limit, self.data_s = levels, limit, data_s
        self.stats = {lv.name: LevelStats() for lv in levels}
        self.index = 0

    @property
    def level(self) -> Level | None:
        return self.levels[self.index] if self.index < len(self.levels) else None

    def estimate(self, i: int) -> float:
        """Seconds per image at level i: measured, else scaled from the nearest measured level, else planned."""
        own = self.stats[self.levels[i].name].per_image(self.data_s)
        if own is not None:
            return own
        for j in range(i - 1, -1, -1):
            other = self.stats[self.levels[j].name].per_image(self.data_s)
            if other is not None and self.levels[j].plan_ms > 0:
                return other * self.levels[i].plan_ms / self.levels[j].plan_ms
        return self.levels[i].plan_ms / 1000

    def _fits(self, images: int, now: float) -> bool:
        return now + self.estimate(self.index) * images <= self.limit

    def settle(self, images: int) -> Level | None:
        """Step down while not even one batch of ``images`` fits before the limit; the level to use, or None."""
        while self.level is not None and not self._fits(images, time.time()):
            self.index += 1
        return self.level

    def batch_fits(self, images: int) -> bool:
        """Whether one more batch of ``images`` on the current level ends before the limit (logged if not)."""
        if self._fits(images, time.time()):
            return True
        name = self.levels[self.index].name
        log.info("watchdog: another batch on path %s would not end before the margin", name)
        return False

    def record(self, images: int, wait_s: float, compute_s: float) -> None:
        """One batch of the current level: ``wait_s`` waiting for the loader, ``compute_s`` in the models."""
        self.stats[self.levels[self.index].name].add(images, wait_s, compute_s)

    def rest_fits(self, left: int, now: float) -> bool:
        """After a batch: whether the ``left`` images end before the limit at this level's pace (logged if
        not); True on the last level, which has nothing cheaper: it goes on while each batch fits."""
        per = self.estimate(self.index)
        if not left or self.index >= len(self.levels) - 1 or now + left * per <= self.limit:
            return True
        log.info(
            "watchdog: %d image(s) left at %.1f ms/image would end %.1f s after the deadline margin: "
            "stepping down from %s to %s", left, per * 1000, now + left * per - self.limit,
            self.levels[self.index].name, self.levels[self.index + 1].name,
        )  # fmt: skip
        return False

    def step_down(self) -> None:
        self.index += 1


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


class Loop:
    """The main loop: predicts ``todo`` (indices into the rows' files, in order) from position ``pos`` on,
    a loader per ladder level, storing each batch in ``state``. ``batch`` is halved on out-of-memory;
    ``status`` becomes 1 when a path failed; ``unreadable`` collects the files that could not be decoded."""

    def __init__(self, predictor: Predictor, state: Run, test_dir: Path, todo: list[int], batch: int,
                 workers: int) -> None:  # fmt: skip
        self.predictor, self.state, self.test_dir, self.todo = predictor, state, test_dir, todo
        self.batch, self.workers = batch, workers
        self.pos, self.status = 0, 0
        self.unreadable: list[str] = []
        self.ahead: tuple[Level, PredictDataset, Iterator] | None = None  # opened before the models loaded
        # The open loader, held only here so that dropping it stops its workers (even while an exception's
        # traceback keeps the frames that used it alive).
        self.dataset: PredictDataset | None = None
        self.batches: Iterator | None = None

    def prefetch(self, level: Level) -> None:
        """Open ``level``'s loader now, so that its workers decode the first batches while the models load."""
        self.ahead = (level, *self._loader(level))

    def _loader(self, level: Level) -> tuple[PredictDataset, Iterator]:
        """The dataset of the images left, prepared for ``level``, and an iterator over its batches."""
        files = self.state.writer.rows.files
        dataset = PredictDataset([self.test_dir / files[i] for i in self.todo[self.pos :]], level.preps)
        loader = make_loader(dataset, batch_size=self.batch, workers=self.workers, seed=0, train=False)
        return dataset, iter(loader)

    def _open(self, level: Level) -> None:
        """Set the open loader for ``level``: the prefetched one when it is this level's from the start."""
        ahead, self.ahead = self.ahead, None
        if ahead is not None and ahead[0] is level and self.pos == 0:
            self.dataset, self.batches = ahead[1:]
        else:
            self.dataset, self.batches = self._loader(level)

    def run(self, watch: Watchdog) -> None:
        """Predict every image left, on the levels ``watch`` picks; a failing path hands its images to the
        next level (status 1); out of memory halves the batch and retries the same level."""
        while self.pos < len(self.todo):
            level = watch.settle(min(self.batch, len(self.todo) - self.pos))
            if level is None:
                break
            try:
                self._open(level)
                if self._level(level, watch):
                    watch.step_down()
            except Exception as e:  # a failing step degrades instead of losing the file
                if is_oom(e) and self.batch > 1:
                    self.batch //= 2
                    if self.predictor.device.type == "cuda":
                        torch.cuda.empty_cache()
                    log.warning("out of memory on path %s: batch size %d from now on", level.name, self.batch)
                else:
                    log.exception(
                        "path %s failed (%s): the remaining images take the next path", level.name, e
                    )
                    self.status = 1
                    watch.step_down()
            finally:
                self.dataset = self.batches = None  # stops the loader's workers
        self.ahead = None  # unused prefetch (the full plan was not loaded in time): stops its workers

    def _level(self, level: Level, watch: Watchdog) -> bool:
        """Predict the images left on ``level`` with the open loader; True when ``watch`` steps down (the rest
        go to the next level), False when the loader ran out."""
        assert self.batches is not None and self.dataset is not None
        base, end = self.pos, len(self.todo)  # the loader's sample j is todo[base + j]
        while self.pos < end:
            if not watch.batch_fits(min(self.batch, end - self.pos)):
                return True
            tick = time.time()
            try:
                tensors, index = next(self.batches)
            except StopIteration:
                return False
            got = time.time()
            probs = self.predictor.predict(level, dict(zip(level.preps, tensors, strict=True)))
            now = time.time()
            self._store(level, base, index.tolist(), probs)
            watch.record(len(index), got - tick, now - got)
            if not watch.rest_fits(end - self.pos, now):
                return True
        return False

    def _store(self, level: Level, base: int, index: list[int], probs: np.ndarray) -> None:
        """One batch's results: ``probs`` [len(index), C] for the loader's samples ``index``; the ones that
        failed to decode keep the fallback and are counted unreadable."""
        assert self.dataset is not None
        bad = set(self.dataset.failed)
        rows = [self.todo[base + j] for j in index]
        with self.state.lock:
            for row, j, p in zip(rows, index, probs, strict=True):
                if j in bad:
                    self.state.paths[row] = UNREADABLE
                else:
                    self.state.probs[row], self.state.paths[row] = p, level.name
        files = self.state.writer.rows.files
        self.unreadable += [files[row] for row, j in zip(rows, index, strict=True) if j in bad]
        self.pos += len(index)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    # fmt: off
    p.add_argument("test_dir", type=Path, help="folder of test images (searched recursively; every non-hidden file gets a row)")
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="bundle folder written by src/package.py")
    p.add_argument("--out", type=Path, help=f"submission file (default {DEFAULT_OUT}, .json for --format json)")
    p.add_argument("--time-limit", type=float, help="seconds from process start, loading included (default: the manifest's; 0: none)")
    p.add_argument("--format", choices=("csv", "json"), default="csv", help="submission format")
    p.add_argument("--probs", action="store_true", help="add one probability column (or JSON field) per class")
    p.add_argument("--sample-submission", type=Path, help="CSV fixing the rows (its first column, the id) and columns (probabilities when at least two are class names, else the label)")
    p.add_argument("--batch-size", type=int, default=0, help="images per batch (0: 8 on a CPU, 128 on a GPU)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the models run")
    p.add_argument("--workers", type=int, default=0, help="image decoding processes (0: one per core)")
    p.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0: one per core; 1 can win on a busy machine)")
    # fmt: on
    return p.parse_args(argv)


def pick_device(name: str) -> torch.device:
    """The torch device for --device ``name``; PredictError for cuda without a visible GPU."""
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
    except (PipelineError, BundleError) as e:  # PredictError, SubmissionInputError, ...
        log.error("%s", e)
        return 2


def run(args: argparse.Namespace, start: float, hard_exit: bool = False) -> int:
    """Rows, bundle, the fallback file at once, the deadline timer, the predictions, the final file; main's
    exit status (0 or 1). Raises SubmissionInputError, BundleError or PredictError before the first write."""
    rows = make_rows(test_dir=args.test_dir, sample=args.sample_submission)
    manifest = verify_bundle(args.bundle)
    classes = manifest["classes"]
    device = pick_device(args.device)
    limit = manifest.get("time_limit", 0.0) if args.time_limit is None else args.time_limit
    deadline = start + limit if limit and limit > 0 else math.inf
    margin = safety_margin(limit) if math.isfinite(deadline) else 0.0
    out = args.out or (DEFAULT_OUT.with_suffix(".json") if args.format == "json" else DEFAULT_OUT)
    fallback = np.asarray(manifest["fallback"]["probs"], dtype=np.float64)
    state = Run(
        Writer(out=out, fmt=args.format, with_probs=args.probs, rows=rows, classes=classes),
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
    """Flush the log handlers (os._exit skips the interpreter's own flushing)."""
    for h in log.root.handlers:
        h.flush()


def predict_all(args: argparse.Namespace, manifest: dict, rows: Rows, state: Run, device: torch.device,
                deadline: float, margin: float) -> int:  # fmt: skip
    """Fill state.probs / state.paths for every readable image, stepping down the ladder as time requires.

    0, or 1 when a model failed to load or a path failed (logged: those images took a cheaper path or kept
    the fallback)."""
    if device.type == "cpu":
        torch.set_num_threads(num_workers(args.threads))
    dtype = inference_dtype(manifest.get("config", {}).get("precision", "auto"), device)
    predictor = Predictor(args.bundle, manifest, device, dtype)
    wanted = {s for s in rows.source if s is not None}
    todo = [i for i in range(len(rows.files)) if i in wanted and i not in rows.escaping]
    batch = args.batch_size or default_batch_size(device)
    loop = Loop(predictor, state, args.test_dir, todo, batch, args.workers)
    if todo and predictor.levels[0].name != FALLBACK:
        loop.prefetch(predictor.levels[0])  # the full plan's first batches decode while the models load
    loaded = predictor.load(deadline, margin)
    levels = [lv for lv in predictor.levels if lv.name != FALLBACK and predictor.ready(lv)]
    log_setup(device, dtype, levels)
    if predictor.bias is not None:
        log.info("class bias from the bundle: %s", manifest["class_bias"]["reason"])
    data_s = float(manifest["plan"].get("decode_ms_per_image", 0.0)) / 1000
    loop.run(Watchdog(levels, deadline - margin, data_s))
    status = 0 if loaded and loop.status == 0 else 1
    left = len(todo) - loop.pos
    if left:
        log.warning(
            "%d image(s) get the fallback prediction %r: %s", left, manifest["fallback"]["label"],
            "no time left for them" if status == 0 else "no time left, or a path failed (see above)",
        )  # fmt: skip
    if loop.unreadable:
        bad = loop.unreadable
        log.warning("%d unreadable image(s) got the fallback prediction: %s", len(bad), preview(bad))
    return status


def log_setup(device: torch.device, dtype: torch.dtype | None, levels: list[Level]) -> None:
    """One line: where the models run, in which precision, on how many threads, and the ladder's plan."""
    precision = "fp32" if dtype is None else str(dtype).removeprefix("torch.")
    if dtype is not None and (device.type == "cuda" or cpu_has_fast_bf16()):
        precision += " (native)"
    log.info(
        "device %s (%s), %s, %d thread(s); ladder: %s", device,
        torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU", precision,
        torch.get_num_threads(), " -> ".join(f"{lv.name} {lv.plan_ms:.1f} ms" for lv in levels) + " -> fallback",
    )  # fmt: skip


def cli() -> int:
    """The command line: the time limit counts from the process start, and the deadline timer may end it."""
    return main(start=process_start(), hard_exit=True)


if __name__ == "__main__":
    sys.exit(cli())
