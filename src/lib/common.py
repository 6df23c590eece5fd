"""Small helpers every stage shares: errors, atomic files and folders, logging, progress bars, worker
counts, seeding, and the one way a long list is quoted in a message."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
from tqdm import tqdm

T = TypeVar("T")
_UMASK = os.umask(0)
os.umask(_UMASK)


class PipelineError(Exception):
    """A stage cannot go on; the message names the file or setting and the fix. Every stage's error is one,
    so a command's ``main`` reports any of them as one line and exits 2."""


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    A killed process therefore leaves either the old file or the new one, never a truncated one.
    The temporary name keeps the suffix so writers that infer the format from it (cv2, pandas) work.
    The file gets the permissions a plain open() would give (mkstemp's are owner-only, which a judging
    image's non-root user could not read).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write text or bytes to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path``; if the block succeeds it replaces ``path`` whole.

    Readers see the complete old folder or the complete new one: the swap is two renames (the old folder
    out of the way, the new one in), then the old one is deleted. A failure leaves the old folder as it was.
    The temporary names start with "." so that no stage takes a half-built folder for an experiment.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def preview(items: Iterable[object], limit: int = 5, *, quote: bool = False) -> str:
    """The first ``limit`` items joined by commas, then "... (N in all)" when there are more: how every
    message quotes a long list of files, classes or ids."""
    items = list(items)
    shown = ", ".join(repr(v) if quote else str(v) for v in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (torch imported lazily: resize and folds
    never load it)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_logger(name: str) -> logging.Logger:
    """A logger printing 'stage: message' lines to stderr, configured once."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    return logging.getLogger(name)


def show_progress() -> bool:
    """Progress bars only when a person is watching: a terminal, and not CI."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def progress(iterable: Iterable[T], **kwargs) -> Iterable[T]:
    """tqdm when attached to a terminal, the bare iterable otherwise (quiet logs in CI)."""
    return tqdm(iterable, disable=not show_progress(), dynamic_ncols=True, **kwargs)


def num_workers(requested: int) -> int:
    """Worker processes to use: ``requested``, or one per usable core when it is 0."""
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)
