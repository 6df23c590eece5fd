"""Resize the training images once, so no later stage decodes a full-size photo again.

Every later stage (cleaning, folds, training, fine-tuning at a higher resolution) reads small copies whose
long side is ``--resize`` pixels: the aspect ratio is kept (optionally padded to a square with
``--letterbox``) so no stage is forced into one crop policy. Decoding dominates the cost, so JPEGs are
decoded at 1/2, 1/4 or 1/8 scale straight from the DCT (see images.decode) and the work is spread over
worker processes. Reruns are cheap: an output newer than its source is kept, unless the resize parameters
changed, and bad files are reported, never fatal.

Outputs, beside the copies in the destination folder (read by src/folds.py):

- ``_index.csv``: ``image`` (source path relative to the source folder), ``file`` (copy's path relative to
  the destination), ``width``, ``height`` (original size, after EXIF orientation); every usable image.
- ``_bad.csv``: ``image,reason`` for every file that could not be used. Every file but hidden ones (names
  starting with ".") and ``__MACOSX`` folders is tried, whatever its name: images are recognised by their
  content, so a text file is listed here ("not an image") and a GIF or a JPEG named ``.jfif`` is resized.
- ``_resize.json``: the parameters the copies were made with.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import multiprocessing
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2

from lib.common import PipelineError, atomic_path, atomic_write, get_logger, num_workers, progress
from lib.config import Config, parse_config, save_config
from lib.images import BadImage, decode_with_info, find_images, probe, resize_array, resized_name
from lib.layout import RESIZE_BAD, RESIZE_INDEX

STAMP = "_resize.json"

log = get_logger("resize")


class ResizeError(PipelineError):
    """The folders are unusable (missing source, overlapping source and destination)."""


@dataclass(frozen=True)
class ResizeParams:
    """What the copies depend on; a change of any of these redoes every copy."""

    long_side: int
    letterbox: bool
    upscale: bool
    image_format: str
    jpeg_quality: int | None  # None for PNG, so a quality change does not redo lossless copies

    @classmethod
    def from_config(cls, cfg: Config) -> ResizeParams:
        quality = cfg.jpeg_quality if cfg.image_format == "jpg" else None
        return cls(cfg.resize, cfg.letterbox, cfg.upscale, cfg.image_format, quality)


@dataclass
class ResizeSummary:
    """What one run did."""

    done: int = 0
    skipped: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)
    removed: int = 0
    seconds: float = 0.0

    @property
    def usable(self) -> int:
        return self.done + self.skipped

    @property
    def images_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class _Job:
    """One source file; ``out`` None means the copy is up to date and only the header is needed."""

    src: str
    rel: str
    out: str | None


@dataclass(frozen=True)
class _Result:
    rel: str
    width: int = 0
    height: int = 0
    reason: str | None = None


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core already (and spawned children start with many threads)


def _run_job(params: ResizeParams, max_pixels: int, job: _Job) -> _Result:
    """Read once, probe, decode reduced, resize, encode, write atomically (in a worker process)."""
    try:
        data = Path(job.src).read_bytes()
    except OSError as e:
        return _Result(job.rel, reason=f"unreadable ({e.strerror or e})")
    try:
        if job.out is None:
            info = probe(data, max_pixels)
            return _Result(job.rel, info.width, info.height)
        info, img = decode_with_info(data, params.long_side, max_pixels)
    except BadImage as e:
        return _Result(job.rel, reason=str(e))
    img = resize_array(img, params.long_side, params.upscale, params.letterbox)
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    options = [cv2.IMWRITE_JPEG_QUALITY, params.jpeg_quality] if params.jpeg_quality is not None else []
    ok, encoded = cv2.imencode(f".{params.image_format}", img, options)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode {job.rel} as {params.image_format}")
    with atomic_path(Path(job.out)) as tmp:
        tmp.write_bytes(encoded)
    return _Result(job.rel, info.width, info.height)


def _run_all(jobs: list[_Job], params: ResizeParams, cfg: Config) -> Iterator[_Result]:
    """Results in completion order: in this process for one worker, else over a process pool."""
    work = functools.partial(_run_job, params, cfg.max_pixels)
    workers = min(num_workers(cfg.workers), len(jobs))
    if workers <= 1:
        yield from map(work, jobs)
        return
    chunksize = max(1, min(64, len(jobs) // (workers * 8)))
    # A child forked while OpenCV's thread pool exists inherits it broken and hangs in its first parallel
    # call (OpenCV 5); with one thread at fork time the pool is stopped and the children start clean.
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        with multiprocessing.Pool(workers, initializer=_init_worker) as pool:
            yield from pool.imap_unordered(work, jobs, chunksize=chunksize)
    finally:
        cv2.setNumThreads(threads)


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return []


def _write_csv(path: Path, header: list[str], rows: Iterable[Iterable[object]]) -> None:
    """Write a CSV atomically, only when its content changed: a rerun with nothing to do touches nothing."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    text = buffer.getvalue()
    try:
        if path.read_text() == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    atomic_write(path, text)


def _read_stamp(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _remove_output(dst_root: Path, rel: str) -> bool:
    """Delete one copy (never anything outside the destination) and the folders it leaves empty."""
    path = (dst_root / rel).resolve()
    if not path.is_relative_to(dst_root) or not path.is_file():
        return False
    path.unlink()
    for parent in path.parents:
        if parent == dst_root:
            break
        try:
            parent.rmdir()
        except OSError:  # not empty
            break
    return True


def _size(row: dict[str, str] | None, name: str) -> tuple[int, int] | None:
    """Original size from a previous index row, if the row is for this copy and well-formed."""
    if row is None or row.get("file") != name:
        return None
    try:
        return int(row["width"]), int(row["height"])
    except (KeyError, TypeError, ValueError):
        return None


def _is_up_to_date(src: Path, out: Path) -> bool:
    try:
        return out.stat().st_mtime_ns >= src.stat().st_mtime_ns
    except OSError:
        return False


def _check_folders(src: Path, dst: Path) -> Path:
    """The resolved destination, once the folders are known to be usable together."""
    if not src.is_dir():
        raise ResizeError(
            f"source folder {src} not found: put the images there or pass --src (or --train-images)"
        )
    src_root, dst_root = src.resolve(), dst.resolve()
    if dst_root.is_relative_to(src_root) or src_root.is_relative_to(dst_root):
        raise ResizeError(
            f"destination {dst} and source {src} overlap: resized copies would mix with (or replace) the"
            " originals; pass a --dst outside the source folder"
        )
    return dst_root


def _claim_names(found: list[str], escaping: list[str], image_format: str) -> tuple[list[str], dict[str, str]]:
    """The sources to resize (sorted) and the bad ones with their reason: links escaping the source folder,
    and sources whose resized name another source already has."""
    bad = {rel: "path escapes the source folder" for rel in escaping}
    owner: dict[str, str] = {}
    # A source that keeps its own name (a.jpg) claims it before one that gets the format appended (a).
    for rel in sorted(found, key=lambda r: resized_name(r, image_format) != r):
        out = resized_name(rel, image_format)
        if out in owner:
            bad[rel] = f"its resized name {out} collides with {owner[out]}'s"
        else:
            owner[out] = rel
    return [rel for rel in found if rel not in bad], bad


def _restamp(dst: Path, dst_root: Path, params: ResizeParams, copies: set[str]) -> bool:
    """Write the parameter stamp if it changed, after deleting ``copies`` (made under other parameters, or
    of unknown origin); True when it changed, so the previous index is void."""
    stamp = asdict(params)
    old_stamp = _read_stamp(dst / STAMP)
    if old_stamp == stamp:
        return False
    if old_stamp is not None:
        changes = ", ".join(
            f"{key} {old_stamp.get(key)!r} -> {value!r}" for key, value in stamp.items() if old_stamp.get(key) != value
        )
        log.info("resize parameters changed (%s): redoing every image", changes)
    # The old copies go before the new stamp is written, so a run killed half-way leaves no old copy that a
    # rerun would mistake for a new one.
    for out in copies:
        _remove_output(dst_root, out)
    atomic_write(dst / STAMP, json.dumps(stamp, indent=2) + "\n")
    return True


def _plan(
    src: Path, dst: Path, found: list[str], previous: dict[str, dict[str, str]], params: ResizeParams
) -> tuple[dict[str, tuple[int, int]], list[_Job]]:
    """Sizes of the sources whose copy and index row are up to date, and the jobs for the others (a
    header-only job when just the index row is missing)."""
    rows: dict[str, tuple[int, int]] = {}
    jobs = []
    for rel in found:
        name = resized_name(rel, params.image_format)
        fresh = _is_up_to_date(src / rel, dst / name)
        size = _size(previous.get(rel), name)
        if fresh and size is not None:
            rows[rel] = size
        else:
            jobs.append(_Job(str(src / rel), rel, None if fresh else str(dst / name)))
    return rows, jobs


def _write_outputs(
    dst: Path, dst_root: Path, stale: set[str], rows: dict[str, tuple[int, int]], bad: dict[str, str], fmt: str
) -> int:
    """Remove the copies no usable source owns any more; write the index and the bad list; returns the
    number of copies removed."""
    keep = {resized_name(rel, fmt) for rel in rows}
    removed = 0
    for out in (stale | {resized_name(rel, fmt) for rel in bad}) - keep:
        removed += _remove_output(dst_root, out)
    _write_csv(
        dst / RESIZE_INDEX,
        ["image", "file", "width", "height"],
        ([rel, resized_name(rel, fmt), w, h] for rel, (w, h) in sorted(rows.items())),
    )
    _write_csv(dst / RESIZE_BAD, ["image", "reason"], sorted(bad.items()))
    return removed


def resize_folder(src: Path, dst: Path, cfg: Config) -> ResizeSummary:
    """Mirror every image under ``src`` into ``dst`` resized; write the index and the bad-file list.

    Every non-hidden file is tried (images are recognised by content, lib/images.py); what cannot be used
    is listed in ``_bad.csv`` with the reason, never fatal.

    Raises:
        ResizeError: ``src`` is missing, or ``src`` and ``dst`` overlap.
    """
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    dst_root = _check_folders(src, dst)
    params = ResizeParams.from_config(cfg)
    found, bad = _claim_names(*find_images(src), params.image_format)
    dst.mkdir(parents=True, exist_ok=True)
    previous = {row.get("image", ""): row for row in _read_csv(dst / RESIZE_INDEX)}
    stale = {row["file"] for row in previous.values() if row.get("file")}
    if _restamp(dst, dst_root, params, stale | {resized_name(rel, params.image_format) for rel in found}):
        previous = {}

    rows, jobs = _plan(src, dst, found, previous, params)
    summary = ResizeSummary(skipped=len(rows))
    for result in progress(_run_all(jobs, params, cfg), total=len(jobs), desc="resize", unit="img"):
        if result.reason is None:
            rows[result.rel] = (result.width, result.height)
        else:
            bad[result.rel] = result.reason
    summary.skipped += sum(1 for job in jobs if job.out is None and job.rel in rows)
    summary.done = sum(1 for job in jobs if job.out is not None and job.rel in rows)
    summary.removed = _write_outputs(dst, dst_root, stale, rows, bad, params.image_format)
    summary.bad = sorted(bad.items())
    summary.seconds = time.perf_counter() - start
    for rel, reason in summary.bad:
        log.warning("bad image %s: %s", rel, reason)
    log.info(
        "%d resized, %d up to date, %d bad, %d stale copies removed in %.1f s (%.1f images/s) -> %s",
        summary.done, summary.skipped, len(summary.bad), summary.removed, summary.seconds,
        summary.images_per_s, dst,
    )  # fmt: skip
    return summary


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", type=Path, help="folder of original images; unset: --train-images")
    parser.add_argument(
        "--dst", type=Path, help="folder of the resized copies; unset: <train-images>_<resize>[sq]"
    )


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(argv, (__doc__ or "").splitlines()[0], _add_arguments, stage="resize")
    src = args.src or Path(cfg.train_images)
    dst = args.dst or cfg.resized_images
    try:
        summary = resize_folder(src, dst, cfg)
    except PipelineError as e:
        log.error("%s", e)
        return 2
    if summary.usable == 0:
        if summary.bad:
            log.error(
                "none of the %d files under %s is a usable image (reasons in %s): replace or remove them",
                len(summary.bad), src, dst / RESIZE_BAD,
            )
        else:
            log.error(
                "no files under %s (hidden names and __MACOSX folders are skipped): put the training "
                "images there or pass --src", src,
            )
        return 1
    save_config(cfg, dst / "_config.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
