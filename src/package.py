"""Package the submission bundle: chosen members, their preprocessing and views, the stacker, a time plan.

``python src/package.py --config configs/X.yaml`` writes ``bundle_dir`` (default ``output/bundle/``, layout in
src/bundle.py) from the candidate experiments: ``package_members``, else the members of
``<output_dir>/<stack_exp>/stack.json``, else every experiment with an ``oof.npz``.

1. **OOF per view.** Each candidate's out-of-fold logits under every test-time view ("orig" plus
   ``tta_views``: hflip, vflip, rot180, scale<F>): fold k's model on fold k's validation images, with the very
   preprocessing predict.py applies (src/bundle.py). "orig" is the training run's own ``oof.npz``; the other
   views are cached as ``<output_dir>/<exp>/oof_<view>.npz`` and reused while newer than the checkpoints and
   folds.csv. A member's feature for a set of views is the mean of its logits over those views.
2. **Measurements on this machine.** Per member and input size: the model time per image (all folds, on
   synthetic tensors, at predict.py's batch size, after a warm-up); decoding and each preprocessing per image
   on real images; the time to verify and load each member; with a time limit, predict.py's start-up.
3. **Time plan.** The budget is ``ms_per_image``, or ``time_limit`` for ``plan_images`` test images (0: the
   files in ``test_images``) less start-up, loading and a safety margin. Starting from the best single member
   with its plain view, members and views are added greedily by OOF gain (nested log-loss of a blend) per
   millisecond while the plan fits; with neither limit set every member and view is used. If even the best
   single member does not fit, it is planned anyway with a warning (predict.py's watchdog then degrades).
4. **Stacker.** Fitted (stack.py: nested comparison, ``stacker`` or the best by nested log-loss, final refit)
   on exactly the chosen members' features.
5. **Bundle.** Slim fold checkpoints (weights only), the stacker, and ``manifest.json``: classes, members with
   their preprocessing, views and costs, the stacker, fallback label, candidates table, plan, degradation
   ladder, default time limit, OOF scores, the resolved config, and the SHA-256 of every file. It is built in
   a temporary folder and swapped in whole.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

import stack
from folds import read_folds
from lib.bundle import (
    FORMAT_VERSION,
    MANIFEST,
    ORIG,
    BundleError,
    PredictDataset,
    Prep,
    building,
    default_batch_size,
    file_sha256,
    is_oom,
    member_logits,
    place,
    preprocessing,
    safety_margin,
    view_size,
    write_manifest,
)
from lib.common import get_logger, num_workers
from lib.config import Config, parse_config
from lib.data import make_loader
from lib.images import find_images
from lib.metrics import logit_scores
from lib.models import ModelError, inference_dtype, load_checkpoint, model_from_checkpoint, save_checkpoint
from lib.oof import OOFError, aligned, write_oof
from train import TrainError, load_fold

log = get_logger("package")

SRC = Path(__file__).resolve().parent
LADDER = ("full", "orig", "fastest", "one_fold", "fallback")
MIN_GAIN = 1e-4  # log-loss improvement below which a member or view is not worth its time
SAMPLE_IMAGES = 16  # real images timed for decoding and preprocessing


class PackageError(RuntimeError):
    """The candidates cannot be packaged; the message names the experiment or file and the fix."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------------------
# Candidates.


@dataclass
class Member:
    """One candidate experiment: its fold checkpoints and preprocessing, OOF per view, measured costs."""

    name: str
    folds: list[int]
    checkpoints: list[Path]
    classes: list[str]
    config: dict[str, Any]
    pre: dict[str, Any]
    oof: dict[str, np.ndarray] = field(default_factory=dict)  # view -> [N, C] logits aligned with folds.csv
    model_ms: dict[int, float] = field(default_factory=dict)  # input size -> ms per image, all folds
    load_s: float = 0.0

    def size(self, view: str) -> int:
        return view_size(int(self.pre["img_size"]), view)

    def feature(self, views: list[str]) -> np.ndarray:
        return np.mean([self.oof[v] for v in views], axis=0)


def candidate_names(cfg: Config) -> list[str]:
    """package_members, else the stack's members, else every experiment with an oof.npz (no stacks)."""
    if cfg.package_members:
        return list(dict.fromkeys(cfg.package_members))
    stack_json = Path(cfg.output_dir) / cfg.stack_exp / stack.MARKER
    if stack_json.is_file():
        members = json.loads(stack_json.read_text()).get("members") or []
        if members:
            log.info("candidates: the members of %s", stack_json)
            return list(members)
    out = Path(cfg.output_dir)
    names = sorted(
        p.parent.name for p in out.glob("*/oof.npz")
        if p.parent.name != cfg.stack_exp and not p.parent.name.startswith(".")
        and not (p.parent / stack.MARKER).exists()
    )  # fmt: skip
    if not names:
        raise PackageError(
            f"no candidate experiment under {out}/ (none has an oof.npz): train every fold first "
            "(python src/train.py --config <your config> --fold all) or set package_members"
        )
    return names


def load_member(cfg: Config, name: str, fold_ids: list[int]) -> Member:
    exp_dir = Path(cfg.output_dir) / name
    paths = [exp_dir / f"fold{k}" / "best.pt" for k in fold_ids]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise PackageError(
            f"member {name!r} lacks {', '.join(missing)}: train (or fine-tune) every fold of it first"
        )
    ckpts = [load_checkpoint(p) for p in paths]
    pres = [preprocessing(c["config"], c["data_config"]) for c in ckpts]
    if any(p != pres[0] for p in pres) or any(c["classes"] != ckpts[0]["classes"] for c in ckpts):
        raise PackageError(
            f"the folds of {name!r} differ in classes or preprocessing (model, size, crop, normalisation): "
            "retrain them with one config"
        )
    return Member(name, fold_ids, paths, list(ckpts[0]["classes"]), dict(ckpts[0]["config"]), pres[0])


def member_config(cfg: Config, member: Member) -> Config:
    """The member's own training config (its resized images), on the package's folds.csv, hard labels."""
    known = {f.name for f in dataclasses.fields(Config)}
    values = {k: v for k, v in member.config.items() if k in known}
    values.update(pretrained="none", folds_csv=cfg.folds_csv, soft_labels="")
    return Config(**values)


# ---------------------------------------------------------------------------------------------------------
# OOF logits per view.


def view_oof(cfg: Config, member: Member, view: str, folds: pd.DataFrame, device: torch.device,
             force: bool = False) -> np.ndarray:  # fmt: skip
    """The member's OOF logits under ``view``, aligned with folds.csv (cached beside its oof.npz)."""
    exp_dir = Path(cfg.output_dir) / member.name
    if view == ORIG:
        logits, classes = aligned(exp_dir / "oof.npz", folds)
    else:
        cache = exp_dir / f"oof_{view}.npz"
        sources = [*member.checkpoints, Path(cfg.folds_csv)]
        fresh = cache.is_file() and cache.stat().st_mtime > max(p.stat().st_mtime for p in sources)
        if fresh and not force:
            logits, classes = aligned(cache, folds)
        else:
            logits, classes = compute_view_oof(cfg, member, view, folds, device), member.classes
            write_oof(cache, folds, logits, classes)
            log.info("%s: OOF logits under view %s -> %s", member.name, view, cache)
    if classes != member.classes:
        raise PackageError(f"{member.name}: its OOF classes differ from its checkpoints': retrain it")
    return logits


def compute_view_oof(cfg: Config, member: Member, view: str, folds: pd.DataFrame,
                     device: torch.device) -> np.ndarray:  # fmt: skip
    """Fold k's model on fold k's validation images (the resized copies it validated on), under ``view``."""
    exp_cfg = member_config(cfg, member)
    prep = Prep.of(member.pre, view)
    dtype = inference_dtype(cfg.precision, device)
    out = np.zeros((len(folds), len(member.classes)), np.float32)
    row_of = pd.Series(np.arange(len(folds)), index=folds["image"].astype(str).to_numpy())
    for k, path in zip(member.folds, member.checkpoints, strict=True):
        try:
            val = load_fold(exp_cfg, k).val
        except TrainError as e:
            raise PackageError(f"member {member.name!r}, fold {k}: {e}") from e
        model = place(model_from_checkpoint(path)[0], member.pre, device)
        dataset = PredictDataset(val["path"].tolist(), [prep])
        loader = make_loader(dataset, cfg, train=False, batch_size=default_batch_size(device))
        parts = []
        for (x,), _ in loader:
            parts.append(member_logits([model], member.pre, [view], {prep: x}, device, dtype).numpy())
        if dataset.failed:
            raise PackageError(
                f"{member.name}: validation images unreadable: {dataset.files[dataset.failed[0]]}"
            )
        out[row_of.loc[val["image"].astype(str)].to_numpy()] = np.concatenate(parts)
    return out


# ---------------------------------------------------------------------------------------------------------
# Measurements.


def time_models(models: list[torch.nn.Module], pre: dict, size: int, batch: int, device: torch.device,
                dtype: torch.dtype | None, min_seconds: float = 0.5, max_reps: int = 5) -> float:  # fmt: skip
    """Milliseconds per image of running every model on a synthetic batch at ``size``: the fastest of a few
    repetitions after a warm-up; on a GPU that runs out of memory, at half the batch (as predict.py does)."""
    try:
        return _time_models(models, pre, size, batch, device, dtype, min_seconds, max_reps)
    except RuntimeError as e:
        if not is_oom(e) or batch == 1:
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log.warning("out of memory at batch %d and %d px: timing batch %d", batch, size, batch // 2)
        return time_models(models, pre, size, batch // 2, device, dtype, min_seconds, max_reps)


def _time_models(models: list[torch.nn.Module], pre: dict, size: int, batch: int, device: torch.device,
                 dtype: torch.dtype | None, min_seconds: float, max_reps: int) -> float:  # fmt: skip
    pre = {**pre, "img_size": size}
    prep = Prep.of(pre)
    inputs = {prep: torch.randn(batch, prep.in_chans, size, size)}
    member_logits(models, pre, [ORIG], inputs, device, dtype)  # warm-up (allocations, kernel choice)
    best, reps, start = math.inf, 0, time.perf_counter()
    while reps < max_reps and (reps < 2 or time.perf_counter() - start < min_seconds):
        tick = time.perf_counter()
        member_logits(models, pre, [ORIG], inputs, device, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - tick)  # the fastest rep: other processes only slow it down
        reps += 1
    return best / batch * 1000


def measure_member(member: Member, files: list[Path], views: list[str], batch: int, device: torch.device,
                   dtype: torch.dtype | None) -> None:  # fmt: skip
    """Fill member.load_s (hash + load of its slim files) and member.model_ms per input size (in ``dtype``,
    as predict.py will run them)."""
    start = time.perf_counter()
    for f in files:
        file_sha256(f)
    models = [place(model_from_checkpoint(f)[0], member.pre, device) for f in files]
    member.load_s = time.perf_counter() - start
    for size in sorted({member.size(v) for v in views}):
        try:
            member.model_ms[size] = time_models(models, member.pre, size, batch, device, dtype)
        except RuntimeError as e:  # a model with a fixed input size (e.g. a ViT) refuses a scale view
            log.warning(
                "%s cannot run at %d px (%s): its views at that size are left out", member.name, size, e
            )
    if member.size(ORIG) not in member.model_ms:
        raise PackageError(f"member {member.name!r} cannot run at its own size {member.size(ORIG)} px")
    log.info(
        "%s: %d fold(s), load %.2f s, model %s ms/image", member.name, len(files), member.load_s,
        ", ".join(f"{ms:.2f} at {s} px" for s, ms in member.model_ms.items()),
    )  # fmt: skip


def sample_files(cfg: Config, folds: pd.DataFrame) -> list[Path]:
    """A few real images to time decoding on: test images when there are any, else raw training images."""
    test = Path(cfg.test_images)
    if test.is_dir():
        found = find_images(test)[0]
        if found:
            return [test / f for f in found[:SAMPLE_IMAGES]]
    return [Path(cfg.train_images) / f for f in folds["image"].astype(str).head(SAMPLE_IMAGES)]


def measure_data(files: list[Path], preps: list[Prep]) -> tuple[float, dict[Prep, float]]:
    """Milliseconds per image of decoding, and of each preprocessing, on real images (in this process)."""
    dataset = PredictDataset(files, preps)
    images, start = [], time.perf_counter()
    for i in range(len(files)):
        images.append(dataset._read(i))
    decode_ms = (time.perf_counter() - start) / max(1, len(files)) * 1000
    prep_ms = {}
    for prep in preps:
        prep(images[0])  # builds the transform
        start = time.perf_counter()
        for img in images:
            prep(img)
        prep_ms[prep] = (time.perf_counter() - start) / max(1, len(images)) * 1000
    return decode_ms, prep_ms


def measure_startup() -> float:
    """Seconds for a fresh Python to import predict.py (interpreter, torch, timm): paid before any image."""
    start = time.perf_counter()
    code = f"import sys; sys.path.insert(0, {str(SRC)!r}); import predict"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True, timeout=600)
    return time.perf_counter() - start


def machine(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return {
        "device": device.type, "name": name, "cores": num_workers(0), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# The plan.


Selection = dict[str, list[str]]  # member -> views, in candidate order


@dataclass
class Costs:
    """Per-image costs (ms) measured here; a selection's cost is decoding + its distinct preprocessings +
    every chosen member's model time per view (+ loading, in seconds, once)."""

    members: dict[str, Member]
    decode_ms: float
    prep_ms: dict[Prep, float]

    def per_image(self, sel: Selection, folds: dict[str, list[int]] | None = None) -> float:
        preps, model = set(), 0.0
        for name, views in sel.items():
            m = self.members[name]
            share = len(folds[name]) / len(m.folds) if folds and name in folds else 1.0
            for v in views:
                preps.add(Prep.of(m.pre, v if v.startswith("scale") else ORIG))
                model += m.model_ms[m.size(v)] * share
        return self.decode_ms + sum(self.prep_ms.get(p, 0.0) for p in preps) + model

    def load_s(self, sel: Selection) -> float:
        return sum(self.members[n].load_s for n in sel)


def log_loss(probs: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(y)), y], stack.PROB_FLOOR, 1.0)).mean())


def quick_loss(
    members: dict[str, Member], sel: Selection, y: np.ndarray, folds: np.ndarray, cfg: Config
) -> float:
    """Nested OOF log-loss of a blend (weights and temperature fitted without the fold scored) over the
    selection's features: a member helps when its weight pays, whatever its strength alone."""
    feats = [members[n].feature(v) for n, v in sel.items()]
    return log_loss(stack.nested_oof("blend", feats, y, folds, cfg), y)


@dataclass
class Budget:
    kind: str  # none | ms_per_image | time_limit
    ms_per_image: float = 0.0
    time_limit: float = 0.0
    images: int = 0
    startup_s: float = 0.0
    margin_s: float = 0.0

    def fits(self, costs: Costs, sel: Selection) -> bool:
        if self.kind == "none":
            return True
        if self.kind == "ms_per_image":
            return costs.per_image(sel) <= self.ms_per_image
        return self.seconds(costs, sel) <= self.time_limit - self.margin_s

    def seconds(self, costs: Costs, sel: Selection) -> float:
        """Projected predict.py wall time for ``images`` images (start-up and loading included)."""
        return self.startup_s + costs.load_s(sel) + self.images * costs.per_image(sel) / 1000

    def per_image_ms(self, costs: Costs, sel: Selection) -> float | None:
        """The per-image budget left for ``sel`` (time-limit mode: after start-up, loading and margin)."""
        if self.kind == "ms_per_image":
            return self.ms_per_image
        if self.kind == "time_limit":
            left = self.time_limit - self.margin_s - self.startup_s - costs.load_s(sel)
            return left / self.images * 1000
        return None


def make_budget(cfg: Config, measure: bool = True) -> Budget:
    if cfg.time_limit > 0:
        images = cfg.plan_images or count_test_images(cfg)
        if not images:
            raise PackageError(
                f"time_limit {cfg.time_limit} s needs the test-set size: set plan_images, or put the test images "
                f"in test_images ({cfg.test_images} has none)"
            )
        startup = measure_startup() if measure else 0.0
        return Budget("time_limit", 0.0, cfg.time_limit, images, startup, safety_margin(cfg.time_limit))
    if cfg.ms_per_image > 0:
        images = cfg.plan_images or count_test_images(cfg)
        startup = measure_startup() if measure and images else 0.0
        return Budget("ms_per_image", cfg.ms_per_image, 0.0, images, startup, 0.0)
    return Budget("none")


def count_test_images(cfg: Config) -> int:
    folder = Path(cfg.test_images)
    return len(find_images(folder)[0]) if folder.is_dir() else 0


def choose_plan(members: dict[str, Member], views: list[str], costs: Costs, budget: Budget, y: np.ndarray,
                folds: np.ndarray, cfg: Config) -> tuple[Selection, list[dict]]:  # fmt: skip
    """Greedy selection: the best single member (plain view), then the move (a view for a chosen member,
    or a new member with its plain view) of largest OOF gain per ms that fits, until none gains or fits."""
    names = list(members)
    usable = {
        n: [v for v in views if v in members[n].oof and members[n].size(v) in members[n].model_ms]
        for n in names
    }
    singles = {n: quick_loss(members, {n: [ORIG]}, y, folds, cfg) for n in names}
    best = min(names, key=lambda n: (singles[n], costs.per_image({n: [ORIG]})))
    if budget.kind == "none":
        sel = {n: usable[n] for n in names}
        steps = [{"step": "everything (no time_limit, no ms_per_image)", "members": sel}]
        return _ordered(sel, names), steps
    sel: Selection = {best: [ORIG]}
    loss = singles[best]
    steps = [{"step": f"start: {best} orig", "log_loss": loss, "ms_per_image": costs.per_image(sel)}]
    if not budget.fits(costs, sel):
        log.warning(
            "even the best single member (%s, plain view, %.2f ms/image) does not fit the budget: planned anyway, "
            "predict.py's watchdog will degrade to cheaper paths", best, costs.per_image(sel),
        )  # fmt: skip
        steps[0]["fits"] = False
        return sel, steps
    while True:
        moves = [(n, v) for n in sel for v in usable[n] if v not in sel[n]]
        moves += [(n, ORIG) for n in names if n not in sel]
        scored = []
        for n, v in moves:
            new = _ordered({**sel, n: [*sel.get(n, []), v]}, names)
            if not budget.fits(costs, new):
                continue
            gain = loss - quick_loss(members, new, y, folds, cfg)
            extra = max(costs.per_image(new) - costs.per_image(sel), 1e-6)
            if gain > MIN_GAIN:
                scored.append((gain / extra, gain, n, v, new))
        if not scored:
            break
        _, gain, n, v, sel = max(scored, key=lambda t: t[0])
        loss -= gain
        steps.append(
            {"step": f"add {n} {v}", "gain": gain, "log_loss": loss, "ms_per_image": costs.per_image(sel)}
        )
    return sel, steps


def _ordered(sel: Selection, names: list[str]) -> Selection:
    return {n: sel[n] for n in names if n in sel}


def make_ladder(sel: Selection, members: dict[str, Member], costs: Costs) -> list[dict]:
    """full -> orig views only (same stacker) -> fastest member (all folds, no stacker) -> its first fold
    -> fallback; a step is kept only when it is cheaper than the one before."""
    fastest = min(sel, key=lambda n: (members[n].model_ms[members[n].size(ORIG)], n))
    levels = [
        ("full", sel, None, True),
        ("orig", {n: [ORIG] for n in sel}, None, True),
        ("fastest", {fastest: [ORIG]}, None, False),
        ("one_fold", {fastest: [ORIG]}, {fastest: [0]}, False),
    ]
    ladder: list[dict] = []
    for name, s, fold_idx, stacker in levels:
        ms = costs.per_image(
            s, {n: [members[n].folds[i] for i in idx] for n, idx in (fold_idx or {}).items()}
        )
        if ladder and ms >= ladder[-1]["ms_per_image"] - 1e-9:
            continue
        ladder.append({
            "name": name, "stacker": stacker, "ms_per_image": ms,
            "members": [
                {"name": n, "views": v, "folds": (fold_idx or {}).get(n, list(range(len(members[n].folds))))}
                for n, v in s.items()
            ],
        })  # fmt: skip
    ladder.append({"name": "fallback", "stacker": False, "ms_per_image": 0.0, "members": []})
    return ladder


# ---------------------------------------------------------------------------------------------------------
# The stage.


def _scores(logits: np.ndarray, y: np.ndarray, classes: list[str]) -> dict[str, float]:
    s = logit_scores(logits, np.asarray(classes)[y], classes)
    return {k: float(s[k]) for k in ("accuracy", "macro_f1", "log_loss")}


def package(cfg: Config, force_oof: bool = False, device: torch.device | None = None) -> dict[str, Any]:
    """Build ``cfg.bundle_dir``; returns the manifest written."""
    device = device or default_device()
    torch.set_num_threads(num_workers(0))
    folds_path = Path(cfg.folds_csv)
    if not folds_path.is_file():
        raise PackageError(f"{folds_path} not found: run python src/folds.py --config <your config> first")
    table = read_folds(folds_path)
    fold_ids = sorted(table["fold"].unique().tolist())
    classes = sorted(table["label"].unique().tolist())
    y = table["label"].map({c: i for i, c in enumerate(classes)}).to_numpy(dtype=np.int64)
    fold_of = table["fold"].to_numpy(dtype=np.int64)
    bundle_dir = Path(cfg.bundle_dir)
    if bundle_dir.exists() and (
        not bundle_dir.is_dir() or (any(bundle_dir.iterdir()) and not (bundle_dir / MANIFEST).is_file())
    ):
        raise PackageError(
            f"bundle_dir {bundle_dir} exists and is not a bundle (no {MANIFEST}): package.py replaces its bundle_dir "
            "whole, so point bundle_dir at a new or bundle folder"
        )
    budget = make_budget(cfg)  # before the long steps: a time limit without a test-set size fails here
    names = candidate_names(cfg)
    views = [ORIG, *dict.fromkeys(v for v in cfg.tta_views if v != ORIG)]
    members = {n: load_member(cfg, n, fold_ids) for n in names}
    for m in members.values():
        if m.classes != classes:
            raise PackageError(
                f"member {m.name!r} was trained on other classes than {folds_path}'s: retrain it"
            )
    log.info("candidates: %s; views: %s; %d OOF images, %d classes", names, views, len(table), len(classes))
    for m in members.values():
        for v in views:
            try:
                m.oof[v] = view_oof(cfg, m, v, table, device, force_oof)
            except RuntimeError as e:  # e.g. a model with a fixed input size and a scale view
                if v == ORIG:
                    raise
                log.warning("%s cannot run view %s (%s): that view is left out", m.name, v, e)

    batch = default_batch_size(device)
    with building(bundle_dir) as build:
        files: dict[str, list[Path]] = {}
        for m in members.values():
            files[m.name] = []
            for k, path in zip(m.folds, m.checkpoints, strict=True):
                ckpt = load_checkpoint(path)
                out = build / "members" / m.name / f"fold{k}.pt"
                save_checkpoint(
                    out, {key: ckpt[key] for key in ("model", "classes", "config", "data_config")}
                )
                files[m.name].append(out)
            measure_member(m, files[m.name], views, batch, device, inference_dtype(cfg.precision, device))
        all_preps = list(dict.fromkeys(Prep.of(m.pre, v if v.startswith("scale") else ORIG)
                                       for m in members.values() for v in views))  # fmt: skip
        decode_ms, prep_ms = measure_data(sample_files(cfg, table), all_preps)
        costs = Costs(members, decode_ms, prep_ms)
        sel, steps = choose_plan(members, views, costs, budget, y, fold_of, cfg)
        for name in set(members) - set(sel):
            for f in files[name]:
                f.unlink()
            (build / "members" / name).rmdir()
        log.info("plan: %s (%.2f ms/image)", sel, costs.per_image(sel))

        feats = [members[n].feature(v) for n, v in sel.items()]
        chosen_names = list(sel)
        table_cmp, fits = stack.evaluate(feats, y, fold_of, classes, cfg, chosen_names)
        kind = stack.choose(table_cmp, cfg)
        stacker = stack.refit(kind, feats, y, fold_of, cfg, fits[kind][1])
        stacker_files = stacker.save(build / "stacker")
        nested = np.log(np.clip(fits[kind][0], stack.PROB_FLOOR, 1.0))

        counts = np.bincount(y, minlength=len(classes))
        ladder = make_ladder(sel, members, costs)
        manifest = build_manifest(
            cfg, classes, counts, members, sel, views, costs, budget, steps, ladder, device, batch,
            {n: [f.relative_to(build).as_posix() for f in files[n]] for n in sel},
            [f.relative_to(build).as_posix() for f in stacker_files], kind, table_cmp,
            _scores(nested, y, classes), y,
        )  # fmt: skip
        manifest = write_manifest(build, manifest)
    log.info(
        "bundle %s: %d member(s) %s, stacker %s (nested OOF log-loss %.4f), %.2f ms/image planned",
        bundle_dir, len(sel), ", ".join(f"{n}[{'+'.join(v)}]" for n, v in sel.items()), kind,
        manifest["scores"]["stacker"]["log_loss"], manifest["plan"]["ms_per_image"],
    )  # fmt: skip
    return manifest


def build_manifest(cfg: Config, classes: list[str], counts: np.ndarray, members: dict[str, Member], sel: Selection,
                   views: list[str], costs: Costs, budget: Budget, steps: list[dict], ladder: list[dict],
                   device: torch.device, batch: int, member_files: dict[str, list[str]], stacker_files: list[str],
                   kind: str, table_cmp: pd.DataFrame, stacker_scores: dict, y: np.ndarray) -> dict[str, Any]:  # fmt: skip
    candidates = []
    for m in members.values():
        for v in views:
            if v not in m.oof or m.size(v) not in m.model_ms:
                continue
            prep = Prep.of(m.pre, v if v.startswith("scale") else ORIG)
            candidates.append({
                "member": m.name, "view": v, "size": m.size(v), "model_ms_per_image": m.model_ms[m.size(v)],
                "preprocess_ms_per_image": costs.prep_ms.get(prep, 0.0), "load_s": m.load_s,
                "oof": _scores(m.oof[v], y, classes), "chosen": v in sel.get(m.name, []),
            })  # fmt: skip
    fallback = int(np.argmax(counts))
    sel_ms = costs.per_image(sel)
    if cfg.time_limit > 0:
        time_limit = cfg.time_limit
    elif budget.kind == "ms_per_image" and budget.images:
        seconds = budget.startup_s + costs.load_s(sel) + budget.images * budget.ms_per_image / 1000
        time_limit = 1.05 * seconds + 1.0  # leaves at least predict.py's safety margin
    else:
        time_limit = 0.0
    return {
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "classes": classes,
        "class_counts": counts.tolist(),
        "fallback": {
            "label": classes[fallback],
            "index": fallback,
            "probs": (counts / counts.sum()).tolist(),
            "why": "the most frequent training class",
        },
        "members": [
            {
                "name": n,
                "folds": members[n].folds,
                "files": member_files[n],
                "preprocessing": members[n].pre,
                "views": v,
                "model": members[n].config.get("model"),
                "model_ms_per_image": {str(s): ms for s, ms in members[n].model_ms.items()},
                "load_s": members[n].load_s,
                "oof": _scores(members[n].feature(v), y, classes),
            }
            for n, v in sel.items()
        ],
        "stacker": {
            "kind": kind,
            "features": cfg.stack_features,
            "dir": "stacker",
            "files": stacker_files,
            "members": list(sel),
        },
        "plan": {
            "budget": dataclasses.asdict(budget) | {"per_image_ms": budget.per_image_ms(costs, sel)},
            "ms_per_image": sel_ms,
            "decode_ms_per_image": costs.decode_ms,
            "projected_s": budget.seconds(costs, sel) if budget.images else None,
            "chosen": sel,
            "steps": steps,
            "batch_size": batch,
            "machine": machine(device),
        },
        "candidates": candidates,
        "ladder": ladder,
        "time_limit": time_limit,
        "scores": {
            "members": {n: _scores(members[n].feature(v), y, classes) for n, v in sel.items()},
            "stacker": stacker_scores,
            "comparison": table_cmp.to_dict(orient="records"),
        },
        "config": dataclasses.asdict(cfg),
    }


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--force-oof", action="store_true", help="recompute the cached OOF logits per view (oof_<view>.npz)"
    )


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(argv, __doc__.splitlines()[0], _add_arguments, stage="package")
    try:
        package(cfg, force_oof=args.force_oof)
    except (PackageError, BundleError, ModelError, OOFError, TrainError, stack.StackError) as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
