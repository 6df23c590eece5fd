"""The submission bundle: its manifest and hashes, and running it. The inference code package.py (OOF logits
per view, latency) and predict.py (the test images) must share exactly: prediction inputs, model placement,
a member's logits over its folds and views (its preprocessing and views themselves: lib/preprocess.py), and
the ladder's levels with their models loaded on demand (:class:`Predictor`).

Layout of a bundle folder (written by src/package.py, read by src/predict.py)::

    manifest.json              format version, classes, members, class bias, plan, ladder, scores, config, hashes
    members/<exp>/fold<k>.pt   one slim checkpoint per fold (weights, classes, config, data_config)
    members/<exp>/full.pt      or the one full fit in their place (config full_fit)
    stacker/...                the fitted stacker (lib/stacker.Stacker.save)

``manifest["files"]`` maps the relative path of every other file to its SHA-256, and ``manifest["digest"]``
is the SHA-256 of the manifest itself without that key: :func:`verify_bundle` refuses a missing, extra or
changed file, or an edited manifest, before anything is loaded. Models are prepared for inference here too
(:func:`place`: BatchNorm folded into the convolutions, checked). This module imports only inference code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from timm.layers import BatchNormAct2d, Conv2dSame
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from lib.bias import apply_class_bias, stored_offsets
from lib.common import PipelineError, get_logger
from lib.data import ImageDataset, make_loader
from lib.images import decode
from lib.metrics import softmax
from lib.models import autocast, inference_dtype, model_from_checkpoint
from lib.oof import Collector, write_oof
from lib.preprocess import Preprocessing, apply_view, group_views

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
RERUN = "re-run python src/package.py --config <your config> to rebuild it"

if TYPE_CHECKING:  # predict.py must not import pandas (tests/test_predict.py)
    import pandas as pd

log = get_logger("predict")  # its messages are prediction's (loading the bundle's models)


def safety_margin(time_limit: float) -> float:
    """Seconds predict.py keeps in reserve before its deadline (the final write, estimation error); the
    time plan of package.py leaves the same."""
    return min(max(1.0, 0.03 * time_limit), 60.0, 0.25 * time_limit)


def default_batch_size(device: torch.device) -> int:
    """predict.py's batch size (package.py times the models at it). Small on a CPU: batches that fit the
    caches are faster per image (tf_efficientnet_lite0 at 224 px, channels_last, one thread, measured here:
    22.7 ms/image at batch 4, 26.2 at 8, 35.9 at 32; plain batch 1 in the default layout 36.4)."""
    return 128 if device.type == "cuda" else 8


class BundleError(PipelineError):
    """A bundle is missing, incomplete or tampered with; the message names the file and the fix."""


# ---------------------------------------------------------------------------------------------------------
# Hashes, manifest, verification, atomic publication.


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def bundle_files(folder: Path) -> list[str]:
    """Relative posix paths of every file under ``folder`` but the manifest, sorted (links count as files)."""
    folder = Path(folder)
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(folder).as_posix()
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest's canonical JSON without its own ``digest`` key."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash every file of ``folder`` into ``manifest["files"]``, seal it with its digest, write it."""
    folder = Path(folder)
    manifest = dict(manifest, files={rel: file_sha256(folder / rel) for rel in bundle_files(folder)})
    manifest["digest"] = manifest_digest(manifest)
    text = json.dumps(manifest, indent=2, allow_nan=False)
    (folder / MANIFEST).write_text(text + "\n")
    return manifest


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a bundle, unverified (see :func:`verify_bundle`)."""
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        raise BundleError(f"bundle folder {folder} not found: {RERUN}, or pass --bundle")
    if not path.is_file():
        raise BundleError(f"incomplete bundle {folder}: {MANIFEST} is missing: {RERUN}")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(
            f"bundle {folder}: {MANIFEST} is not valid JSON ({e}): it was damaged: {RERUN}"
        ) from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise BundleError(f"bundle {folder}: {MANIFEST} is not a bundle manifest: {RERUN}")
    return manifest


def verify_bundle(folder: Path) -> dict[str, Any]:
    """The manifest, after checking that every file is exactly the one packaged and nothing was added.

    Raises :class:`BundleError` naming the first problems: a missing file, a changed byte (hash mismatch),
    a file the manifest does not list, an edited manifest or another format version.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"bundle {folder} has format version {manifest.get('format_version')!r}, this predict.py reads "
            f"{FORMAT_VERSION}: {RERUN}"
        )
    if manifest.get("digest") != manifest_digest(manifest):
        raise BundleError(
            f"bundle {folder}: {MANIFEST} was edited after packaging (its digest differs): {RERUN}"
        )
    listed: dict[str, str] = manifest["files"]
    problems = []
    for rel, digest in sorted(listed.items()):
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
        elif file_sha256(path) != digest:
            problems.append(f"{rel} was modified (SHA-256 differs from the manifest)")
    problems += [
        f"{rel} is not part of the bundle (unexpected file)"
        for rel in bundle_files(folder)
        if rel not in listed
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise BundleError(f"bundle {folder} is tampered or incomplete: {shown}: {RERUN}")
    return manifest


# ---------------------------------------------------------------------------------------------------------
# Prediction inputs: decode once, every member's preprocessing.


class MultiPrep:
    """An ImageDataset transform making several inputs from one decoded image (decode once, N preps)."""

    def __init__(self, preps: Sequence[Preprocessing]) -> None:
        self.preps = list(preps)

    def __call__(self, image: np.ndarray) -> dict[str, tuple[torch.Tensor, ...]]:
        return {"image": tuple(p(image) for p in self.preps)}


class PredictDataset(ImageDataset):
    """Prediction images decoded as resize.py decodes training images (JPEGs reduced in the DCT to at
    least ``decode_side``), then every preprocessing of a :class:`MultiPrep`. Any failure gives a blank
    image and marks the file in :attr:`failed` (ImageDataset's on_error="blank")."""

    def __init__(self, files: Sequence[Path | str], preps: Sequence[Preprocessing]) -> None:
        super().__init__(files, None, MultiPrep(preps), in_chans=3, on_error="blank")
        sides = [p.resize for p in preps]
        self.decode_side = max(sides) if sides and all(sides) else None

    def decode(self, path: str) -> np.ndarray:
        img = decode(Path(path).read_bytes(), target_long_side=self.decode_side)
        return np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img


# ---------------------------------------------------------------------------------------------------------
# Running a member.


def place(model: nn.Module, pre: Preprocessing, device: torch.device) -> nn.Module:
    """A member's model ready for inference: BatchNorm folded into the convolutions before it (checked),
    on ``device`` in the memory layout its preprocessing asks for, in eval mode."""
    model = fold_batchnorm(model.eval(), pre.size, pre.in_chans)
    return model.to(device, memory_format=pre.memory_format).eval()


_FOLDABLE_CONVS = (nn.Conv2d, Conv2dSame)  # exactly these classes: F.conv2d of (weight, bias), nothing else
_FOLDABLE_NORMS = (nn.BatchNorm2d, BatchNormAct2d)
FOLD_PROBE_SIZE = 64


@contextlib.contextmanager
def one_thread():
    """Tiny probes run on one thread: on a busy machine, torch's threads waiting for each other made a
    batch-1 forward 50x slower than single-threaded (measured here: 1.5 s vs 0.02 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def fold_batchnorm(model: nn.Module, size: int, in_chans: int) -> nn.Module:
    """Fold, in place, every BatchNorm of an eval-mode ``model`` whose input is a convolution's output into
    that convolution: the same function with one memory pass fewer per layer (~1.4x faster on CPU).

    Pairs are found by running the model once with hooks on a small probe (a norm whose input *is* a conv's
    output tensor). The folded model must reproduce the original's output on that probe; if it does not (a
    pattern the hooks misread, such as a conv output used twice), the original modules are put back.
    """
    outputs: dict[int, tuple[nn.Module, torch.Tensor]] = {}  # id(conv output) -> (conv, output kept alive)
    pairs: list[tuple[nn.Module | None, nn.Module]] = []

    def after_conv(conv: nn.Module, _: Any, out: torch.Tensor) -> None:
        outputs[id(out)] = (conv, out)

    def before_norm(norm: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        pairs.append((outputs.get(id(inputs[0]), (None, None))[0], norm))

    hooks = []
    for m in model.modules():
        if type(m) in _FOLDABLE_CONVS and m.padding_mode == "zeros":
            hooks.append(m.register_forward_hook(after_conv))
        elif type(m) in _FOLDABLE_NORMS and m.affine and m.track_running_stats:
            hooks.append(m.register_forward_pre_hook(before_norm))
    side = min(size, FOLD_PROBE_SIZE)  # folding does not depend on the size: a small probe is enough
    x = torch.randn(1, in_chans, side, side, generator=torch.Generator().manual_seed(0))
    try:
        with one_thread():
            reference = model(x)
    except Exception:  # a model that cannot run this probe (a fixed input size) is simply not folded
        return model
    finally:
        for h in hooks:
            h.remove()
    outputs.clear()
    uses: dict[nn.Module | None, int] = {}
    for conv, norm in pairs:
        uses[conv] = uses.get(conv, 0) + 1
        uses[norm] = uses.get(norm, 0) + 1
    names = {m: n for n, m in model.named_modules()}
    swapped: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, attribute, original module)
    for conv, norm in pairs:
        if conv is None or uses[conv] > 1 or uses[norm] > 1:
            continue
        act = nn.Sequential(norm.drop, norm.act) if isinstance(norm, BatchNormAct2d) else nn.Identity()
        for old, new in ((conv, fuse_conv_bn_eval(conv, norm)), (norm, act)):
            parent_name, _, attr = names[old].rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, new)
            swapped.append((parent, attr, old))
    if not swapped:
        return model
    try:
        with one_thread():
            folded = model(x)
        same = torch.allclose(folded, reference, rtol=1e-3, atol=1e-4 * (1.0 + float(reference.abs().max())))
    except Exception:
        same = False
    if not same:
        for parent, attr, old in reversed(swapped):
            setattr(parent, attr, old)
    return model


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


@torch.no_grad()
def member_logits(
    models: Sequence[nn.Module],
    pre: Preprocessing,
    views: Sequence[str],
    inputs: dict[Preprocessing, torch.Tensor],
    device: torch.device,
    dtype: torch.dtype | None,
) -> torch.Tensor:
    """Mean over ``models`` (a member's folds) and ``views`` of the logits of one batch (float32 [N, C], CPU).

    ``inputs`` maps each input preprocessing (``pre.view(v)``) to its NCHW batch (from a PredictDataset).
    The views of one input run as one concatenated batch per model.
    """
    total: torch.Tensor | None = None
    for prep, group in group_views(pre, views).items():
        x = inputs[prep].to(device, non_blocking=True)
        n = len(x)
        xs = torch.cat([apply_view(x, v) for v in group]) if len(group) > 1 else apply_view(x, group[0])
        xs = xs.contiguous(memory_format=pre.memory_format)
        for model in models:
            with autocast(device, dtype):
                out = model(xs).float()
            out = out.view(len(group), n, -1).sum(0)
            total = out if total is None else total + out
    assert total is not None, "member_logits needs at least one view and one model"
    return (total / (len(models) * len(views))).cpu()


# ---------------------------------------------------------------------------------------------------------
# Running a bundle: its ladder's levels, their models loaded on demand, the stacker.


@dataclass
class Level:
    """One step of the bundle's ladder: its members (with their views and folds), whether the stacker
    combines them, its planned milliseconds per image, and the distinct inputs its members read."""

    name: str
    members: list[dict]  # {"name", "views", "folds": indices into the member's folds}
    stacker: bool
    plan_ms: float
    preps: list[Preprocessing] = field(default_factory=list)


class Predictor:
    """The bundle's models (loaded on demand, cheapest ladder steps first) and the stacker."""

    def __init__(
        self, bundle_dir: Path, manifest: dict, device: torch.device, dtype: torch.dtype | None
    ) -> None:
        self.dir, self.manifest, self.device, self.dtype = bundle_dir, manifest, device, dtype
        self.members = {m["name"]: m for m in manifest["members"]}
        self.pre = {m["name"]: Preprocessing.from_dict(m["preprocessing"]) for m in manifest["members"]}
        self.models: dict[tuple[str, int], nn.Module] = {}
        self.stacker: Any = None
        try:  # package.py's per-class offsets on the stacker's log-probabilities (none in older bundles)
            self.bias = stored_offsets(manifest.get("class_bias"), n_classes=len(manifest["classes"]))
        except ValueError as e:
            raise BundleError(f"bundle {bundle_dir}: {e}: {RERUN}") from e
        self.levels = []
        for step in manifest["ladder"]:
            level = Level(step["name"], step["members"], step["stacker"], float(step["ms_per_image"]))
            views = (self.pre[m["name"]].view(v) for m in level.members for v in m["views"])
            level.preps = list(dict.fromkeys(views))  # the distinct inputs, each made once per image
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
                    from lib.stacker import Stacker  # numpy + xgboost only: loaded only when a bundle has one

                    self.stacker = Stacker.load(self.dir / self.manifest["stacker"]["dir"])
                else:
                    name, k = item
                    model = model_from_checkpoint(self.dir / self.members[name]["files"][k])[0]
                    self.models[item] = place(model, self.pre[name], self.device)
            except Exception as e:  # the cheaper steps loaded so far still serve
                log.exception(
                    "cannot load %s from the bundle (%s): the steps needing it are skipped", item, e
                )
                ok = False
        return ok

    def member_features(self, level: Level, inputs: dict[Preprocessing, torch.Tensor]) -> list[np.ndarray]:
        """Each member's logits (mean over its folds and views) for one batch, in the level's order."""
        out = []
        for m in level.members:
            models = [self.models[(m["name"], k)] for k in m["folds"]]
            pre = self.pre[m["name"]]
            out.append(member_logits(models, pre, m["views"], inputs, self.device, self.dtype).numpy())
        return out

    def predict(self, level: Level, inputs: dict[Preprocessing, torch.Tensor]) -> np.ndarray:
        """Class probabilities [N, C] (float64) of one batch on ``level``: the stacker's, moved by the bundle's
        class bias when it ships one (fitted on the stacker's OOF, so only stacker levels take it), or the
        softmax of the members' mean logits."""
        feats = self.member_features(level, inputs)
        if level.stacker:
            probs = self.stacker.predict_proba(feats)
            return probs if self.bias is None else apply_class_bias(probs, offsets=self.bias)
        return softmax(np.mean(feats, axis=0))


# ---------------------------------------------------------------------------------------------------------
# OOF logits per view: a fold's checkpoint on its validation images, as prediction runs it (train.py at the
# end of each fold, package.py for whatever training did not write).


class ImagesError(PipelineError):
    """Images a checkpoint must be run on cannot be read; the message names one and the fix."""


def checkpoint_view_logits(
    checkpoint: Path,
    files: Sequence[Path | str],
    *,
    views: Sequence[str],
    out: dict[str, Collector],
    rows: np.ndarray,
    device: torch.device,
    workers: int,
    seed: int,
) -> dict[str, str]:
    """The logits of ``checkpoint``'s model (lib.models.model_from_checkpoint, :func:`place`) on ``files``
    under each of ``views``, exactly as predict.py computes a member's: its own preprocessing, its
    inference precision (lib.models.inference_dtype of its config's ``precision``), predict.py's batch size
    (:func:`default_batch_size`), :func:`member_logits` one view at a time. Each file is decoded once for
    every view (flips share one input; a scale<F> view gets its own input at F x the size from the same
    decoded image).

    File i's logits under view v (float32 [C]) are put at row ``rows[i]`` (int [len(files)]) of ``out[v]``
    (one lib.oof.Collector per view: the store's format, never a dense [N, C] float32 array).

    Returns the views the model cannot run (e.g. a scale view on a model with a fixed input size), each with
    its error; their collectors are left incomplete.

    Raises:
        ImagesError: a file cannot be decoded.
        ModelError: the checkpoint does not rebuild.
    """
    model, ckpt = model_from_checkpoint(checkpoint)
    pre = Preprocessing.of_checkpoint(ckpt["config"], ckpt["data_config"])
    model = place(model, pre, device)
    dtype = inference_dtype(str(ckpt["config"].get("precision", "auto")), device)
    preps = list(group_views(pre, views))
    dataset = PredictDataset(files, preps)
    batch_size = default_batch_size(device)
    loader = make_loader(dataset, batch_size=batch_size, train=False, workers=workers, seed=seed)
    failed: dict[str, str] = {}
    start = 0
    for inputs, _ in loader:
        batch = dict(zip(preps, inputs, strict=True))
        where = rows[start : start + len(inputs[0])]
        start += len(where)
        for view in (v for v in views if v not in failed):
            try:
                logits = member_logits([model], pre, [view], batch, device, dtype)
            except (RuntimeError, AssertionError) as e:  # timm asserts a fixed input size (ViT patch embed)
                failed[view] = str(e)
                continue
            out[view].put(where, logits.numpy())
    if dataset.failed:
        bad = [str(dataset.files[i]) for i in dataset.failed]
        raise ImagesError(
            f"{len(bad)} image(s) cannot be decoded, e.g. {bad[0]}: re-run python src/resize.py and "
            "python src/folds.py with the config that trained this checkpoint"
        )
    return failed


def write_view_oofs(
    checkpoint: Path,
    *,
    val: pd.DataFrame,
    classes: list[str],
    files: dict[str, Path],
    device: torch.device,
    workers: int,
    seed: int,
    dense_max_cells: int,
    topk: int,
) -> None:
    """A fold's OOF logits under test-time views, written by the stage that made ``checkpoint`` while it is at
    hand (train.py, finetune.py): package.py then reads them instead of running every fold over the training
    set again. ``val``: the fold's validation rows of folds.csv with their resized ``path``; ``files``: view ->
    the oof_<view>.npz to write. Computed by :func:`checkpoint_view_logits`, exactly as package.py would, and
    stored by lib.oof.write_oof (``dense_max_cells``, ``topk``: the store's format). A file newer than
    ``checkpoint`` is kept, so a resumed fold fills in only the views it lacks. A view the model cannot run
    is left to package.py, with a warning.
    """
    made = checkpoint.stat().st_mtime_ns
    views = [v for v, f in files.items() if not (f.is_file() and f.stat().st_mtime_ns > made)]
    if not views:
        return
    store = {"dense_max_cells": dense_max_cells, "topk": topk}
    out = {v: Collector(len(val), len(classes), **store) for v in views}
    failed = checkpoint_view_logits(
        checkpoint, val["path"].tolist(), views=views, out=out, rows=np.arange(len(val)), device=device,
        workers=workers, seed=seed,
    )  # fmt: skip
    oof_log = get_logger("view_oof")  # the training stages' messages, not predict's
    for v, why in failed.items():
        oof_log.warning(f"{checkpoint}: the model cannot run view {v} ({why}): no OOF file for it, package.py tries")
    done = [v for v in views if v not in failed]
    for v in done:
        write_oof(files[v], val, out[v].result(), classes, **store)
    if done:
        oof_log.info(f"{checkpoint.parent}: OOF logits under view(s) {', '.join(done)}")
