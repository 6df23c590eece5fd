"""Package the submission bundle: chosen members, their preprocessing and views, the stacker, a time plan.

``python src/package.py --config configs/X.yaml`` writes ``bundle_dir`` (default ``output/bundle/``, layout in
src/lib/bundle.py) from the candidate experiments: ``package_members``, else the members of
``<output_dir>/<stack_exp>/stack.json``, else every experiment with an ``oof.npz``.

1. **OOF per view.** Each candidate's out-of-fold logits under every test-time view ("orig" plus
   ``tta_views``: hflip, vflip, rot180, scale<F>): fold k's model on fold k's validation images, with the very
   preprocessing predict.py applies (src/lib/preprocess.py, src/lib/bundle.py). "orig" is the training run's
   own ``oof.npz``; the other views are ``<output_dir>/<exp>/oof_<view>.npz``, which train.py writes at the
   end of training (lib/bundle.checkpoint_view_logits), read while newer than the checkpoints and folds.csv.
   Only the views missing there (an experiment trained before train.py wrote them, finetune.py's, a view
   added to ``tta_views`` since) are computed here, by the same function, and cached in that file. The log
   names the views read and those computed. They are lib/oof.py's prediction files: float16, dense up to
   ``store_dense_max_cells`` cells and top-``store_topk`` per row above, computed a batch at a time into
   that format (never [N, C] float32). A member's feature for a set of views is the mean of its logits over
   them (lib/oof.mean_predictions: exact for dense files, on the union of the views' top k otherwise).
2. **Measurements on this machine** (src/lib/plan.py). Per member and input size: the model time per image
   (all folds, on synthetic tensors, at predict.py's batch size, after a warm-up); decoding and each
   preprocessing per image on real images; the time to verify and load each member; with a time limit,
   predict.py's start-up.
3. **Time plan** (src/lib/plan.py). The budget is ``ms_per_image``, or ``time_limit`` for ``plan_images`` test
   images (0: the files in ``test_images``) less start-up, loading and a safety margin. Starting from the best
   single member with its plain view, members and views are added greedily by OOF gain (nested log-loss of a
   blend) per millisecond while the plan fits; with neither limit set every member and view is used. If
   even the best single member does not fit, it is planned anyway with a warning (predict.py's watchdog then
   degrades).
4. **Stacker.** Fitted by lib/stacker.fit_stacker (nested comparison, ``stacker`` or the best by nested
   log-loss, final refit) on exactly the chosen members' features. With ``class_bias`` auto, per-class offsets
   on its log-probabilities (lib/bias.py) are fitted for macro-F1 on its nested OOF predictions and ship
   only when a nested check shows macro-F1 rising without accuracy falling (``class_bias_accuracy_drop``).
With ``full_fit`` each member ships its full fit (``<exp>/full/best.pt``: one model trained on every image)
in place of its fold models; its OOF logits, which plan and stacker use, are still the folds'.

5. **Bundle.** Slim fold checkpoints (weights only), the stacker, and ``manifest.json``: classes, members with
   their preprocessing, views and costs, the stacker and its class bias, fallback label, candidates table,
   plan, degradation ladder, default time limit, OOF scores, the resolved config, and the SHA-256 of every
   file. It is built in a temporary folder and swapped in whole.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from lib.bias import fit_class_bias
from lib.bundle import (
    FORMAT_VERSION,
    MANIFEST,
    ImagesError,
    checkpoint_view_logits,
    default_batch_size,
    safety_margin,
    write_manifest,
)
from lib.common import PipelineError, atomic_dir, get_logger, num_workers, preview
from lib.config import ORIG, Config, parse_config, resized_dir
from lib.images import find_images
from lib.layout import (
    FULL,
    STACK_MARKER,
    LayoutError,
    class_names,
    experiment,
    find_experiments,
    fold_name,
    load_fold,
    read_folds,
    targets,
)
from lib.models import inference_dtype, load_checkpoint, save_checkpoint
from lib.oof import Collector, Predictions, aligned_predictions, prediction_scores, write_oof
from lib.plan import (
    Budget,
    Costs,
    Member,
    Plan,
    machine,
    make_plan,
    measure_data,
    measure_member,
    measure_startup,
)
from lib.preprocess import Preprocessing
from lib.stacker import Stacker, StackResult, fit_stacker, log_probs

log = get_logger("package")

SRC = Path(__file__).resolve().parent
SAMPLE_IMAGES = 16  # real images timed for decoding and preprocessing
SLIM_KEYS = ("model", "classes", "config", "data_config")  # what a bundle's fold checkpoint keeps


class PackageError(PipelineError):
    """The candidates cannot be packaged; the message names the experiment or file and the fix."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------------------
# Candidates.


def candidate_names(cfg: Config) -> list[str]:
    """package_members, else the stack's members, else every experiment with an oof.npz (no stacks)."""
    if cfg.package_members:
        return list(dict.fromkeys(cfg.package_members))
    stack_json = experiment(cfg.output_dir, cfg.stack_exp).root / STACK_MARKER
    if stack_json.is_file():
        members = json.loads(stack_json.read_text()).get("members") or []
        if members:
            log.info("candidates: the members of %s", stack_json)
            return list(members)
    names = find_experiments(cfg.output_dir, exclude=(cfg.stack_exp,))
    if not names:
        raise PackageError(
            f"no candidate experiment under {Path(cfg.output_dir)}/ (none has an oof.npz): train every fold first "
            "(python src/train.py --config <your config> --fold all) or set package_members"
        )
    return names


def load_member(cfg: Config, name: str, fold_ids: list[int]) -> Member:
    """The experiment ``name``'s fold checkpoints (one per fold of folds.csv), checked to share their classes
    and preprocessing."""
    exp = experiment(cfg.output_dir, name)
    paths = [exp.best(k) for k in fold_ids]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise PackageError(
            f"member {name!r} lacks {', '.join(missing)}: train (or fine-tune) every fold of it first"
        )
    ckpts = [load_checkpoint(p) for p in paths]
    pres = [Preprocessing.of_checkpoint(c["config"], c["data_config"]) for c in ckpts]
    if any(p != pres[0] for p in pres) or any(c["classes"] != ckpts[0]["classes"] for c in ckpts):
        raise PackageError(
            f"the folds of {name!r} differ in classes or preprocessing (model, size, crop, normalisation): "
            "retrain them with one config"
        )
    return Member(name, fold_ids, paths, list(ckpts[0]["classes"]), dict(ckpts[0]["config"]), pres[0])


def load_members(cfg: Config, fold_ids: list[int], classes: list[str]) -> dict[str, Member]:
    """Every candidate, refusing one trained on other classes than folds.csv's."""
    members = {n: load_member(cfg, n, fold_ids) for n in candidate_names(cfg)}
    for m in members.values():
        if m.classes != classes:
            raise PackageError(
                f"member {m.name!r} was trained on other classes than {cfg.folds_csv}'s: retrain it"
            )
    return members


def full_fit_member(cfg: Config, member: Member) -> Member:
    """``member`` with its full fit (``<exp>/full/best.pt``, config full_fit) as its one test-time model in
    place of its fold models; its OOF logits (the folds') stay: the same recipe on all the images stands in for
    them in the plan and the stacker.

    Raises:
        PackageError: the full fit is missing, or differs from the folds in classes or preprocessing.
    """
    path = experiment(cfg.output_dir, member.name).best(FULL)
    if not path.is_file():
        raise PackageError(
            f"full_fit is on but member {member.name!r} has no {path}: run python src/train.py --config <your "
            "config> --fold full (finetune.py for a fine-tuned member), or set full_fit false to ship the folds"
        )
    ckpt = load_checkpoint(path)
    pre = Preprocessing.of_checkpoint(ckpt["config"], ckpt["data_config"])
    if pre != member.pre or list(ckpt["classes"]) != member.classes:
        raise PackageError(
            f"{path} differs from the folds of {member.name!r} in classes or preprocessing: retrain it with "
            "their config (python src/train.py --config <config> --fold full)"
        )
    log.info("member %s: ships its full fit %s in place of its %d fold models", member.name, path, len(member.folds))
    return dataclasses.replace(member, folds=[FULL], checkpoints=[path])


# ---------------------------------------------------------------------------------------------------------
# OOF logits per view.


def read_view_oof(
    cfg: Config, member: Member, view: str, folds: pd.DataFrame, force: bool
) -> Predictions | None:
    """The member's OOF logits under ``view`` as its experiment holds them, aligned with folds.csv: float32
    [N, C], or a TopK for a file stored top-k. ``orig`` is its oof.npz; another view its oof_<view>.npz
    (train.py's, or an earlier package run's), used while newer than the checkpoints and folds.csv and
    not ``force``; None when it must be computed."""
    exp = experiment(cfg.output_dir, member.name)
    if view == ORIG:
        return aligned_predictions(exp.oof, folds, member.classes)
    path = exp.view_oof(view)
    newest = max(p.stat().st_mtime for p in [*member.checkpoints, Path(cfg.folds_csv)])
    if force or not path.is_file() or path.stat().st_mtime <= newest:
        return None
    return aligned_predictions(path, folds, member.classes)


def compute_view_oofs(cfg: Config, member: Member, views: list[str], folds: pd.DataFrame,
                      device: torch.device) -> tuple[dict[str, Predictions], dict[str, str]]:  # fmt: skip
    """Fold k's model on fold k's validation images (the resized copies it validated on) under every one of
    ``views``, each image decoded once (lib/bundle.checkpoint_view_logits: what train.py writes at the end
    of a fold), in folds.csv order and in the store's format (lib/oof.py: float16-rounded float32 [N, C],
    or a TopK), as the cache written from it will read back. Also returns the views the member cannot run
    (a fixed input size and a scale view), each with its error.

    Raises:
        PackageError: a fold's validation images are missing or unreadable.
    """
    trained = member.config
    letterbox = bool(trained.get("letterbox", False))
    resized = resized_dir(trained["train_images"], int(trained["resize"]), letterbox)
    out = {v: Collector(len(folds), len(member.classes), **cfg.store_options()) for v in views}
    row_of = pd.Series(np.arange(len(folds)), index=folds["image"].astype(str).to_numpy())
    failed: dict[str, str] = {}
    for k, path in zip(member.folds, member.checkpoints, strict=True):
        live = [v for v in views if v not in failed]
        if not live:
            break
        try:
            val = load_fold(folds_csv=cfg.folds_csv, resized=resized, fold=k).val
            rows = row_of.loc[val["image"].astype(str)].to_numpy()
            failed |= checkpoint_view_logits(
                path, val["path"].tolist(), views=live, out=out, rows=rows, device=device, workers=cfg.workers,
                seed=cfg.seed,
            )  # fmt: skip
        except (LayoutError, ImagesError) as e:
            raise PackageError(f"member {member.name!r}, fold {k}: {e}") from e
    results = {v: c.result() for v, c in out.items() if v not in failed}
    return {v: x if out[v].is_topk else x.astype(np.float32) for v, x in results.items()}, failed


def add_view_oofs(cfg: Config, members: dict[str, Member], views: list[str], folds: pd.DataFrame,
                  device: torch.device, force: bool) -> None:  # fmt: skip
    """Fill every member's ``oof`` per view: read what its experiment holds (:func:`read_view_oof`), compute
    the rest in one pass over its validation images (:func:`compute_view_oofs`) and cache it as
    oof_<view>.npz; a view a member cannot run is left out with a warning."""
    for m in members.values():
        read = {v: x for v in views if (x := read_view_oof(cfg, m, v, folds, force)) is not None}
        missing = [v for v in views if v not in read]
        computed, failed = compute_view_oofs(cfg, m, missing, folds, device) if missing else ({}, {})
        for v, values in computed.items():
            cache = experiment(cfg.output_dir, m.name).view_oof(v)
            write_oof(cache, folds, values, m.classes, **cfg.store_options())
            log.info("%s: OOF logits under view %s -> %s", m.name, v, cache)
        for v, why in failed.items():
            log.warning("%s cannot run view %s (%s): that view is left out", m.name, v, why)
        log.info(
            "%s: OOF logits per view read from its experiment: %s; computed here: %s", m.name,
            ", ".join(read) or "none", ", ".join(computed) or "none",
        )  # fmt: skip
        found = read | computed
        m.oof.update({v: found[v] for v in views if v in found})


# ---------------------------------------------------------------------------------------------------------
# Budget and measurements.


def count_test_images(cfg: Config) -> int:
    folder = Path(cfg.test_images)
    return len(find_images(folder)[0]) if folder.is_dir() else 0


def startup_s() -> float:
    """predict.py's start-up here (s); a predict.py that does not import is a PackageError."""
    try:
        return measure_startup(SRC)
    except subprocess.CalledProcessError as e:
        tail = (e.stderr or b"").decode(errors="replace").strip().splitlines()[-1:]
        raise PackageError(f"src/predict.py does not import here ({' '.join(tail)}): fix it, then re-run") from e


def make_budget(cfg: Config, measure: bool = True) -> Budget:
    """The budget of ``time_limit`` / ``ms_per_image`` (``measure``: time predict.py's start-up here)."""
    if cfg.time_limit <= 0 and cfg.ms_per_image <= 0:
        return Budget("none")
    images = cfg.plan_images or count_test_images(cfg)
    if cfg.time_limit > 0:
        if not images:
            raise PackageError(
                f"time_limit {cfg.time_limit} s needs the test-set size: set plan_images, or put the test images "
                f"in test_images ({cfg.test_images} has none)"
            )
        startup = startup_s() if measure else 0.0
        return Budget("time_limit", 0.0, cfg.time_limit, images, startup, safety_margin(cfg.time_limit))
    startup = startup_s() if measure and images else 0.0
    return Budget("ms_per_image", cfg.ms_per_image, 0.0, images, startup, 0.0)


def sample_files(cfg: Config, folds: pd.DataFrame) -> list[Path]:
    """A few real images to time decoding on: test images when there are any, else raw training images."""
    test = Path(cfg.test_images)
    if test.is_dir():
        found = find_images(test)[0]
        if found:
            return [test / f for f in found[:SAMPLE_IMAGES]]
    return [Path(cfg.train_images) / f for f in folds["image"].astype(str).head(SAMPLE_IMAGES)]


def measure(cfg: Config, members: dict[str, Member], files: dict[str, list[Path]], views: list[str],
            folds: pd.DataFrame, device: torch.device, batch: int) -> Costs:  # fmt: skip
    """Every member's loading and model times (from its slim ``files``, in its own inference precision),
    decoding and every distinct preprocessing."""
    for m in members.values():
        dtype = inference_dtype(m.config.get("precision", "auto"), device)
        measure_member(m, files[m.name], views, batch, device, dtype)
    preps = list(dict.fromkeys(m.pre.view(v) for m in members.values() for v in views))
    decode_ms, prep_ms = measure_data(sample_files(cfg, folds), preps)
    return Costs(members, decode_ms, prep_ms)


# ---------------------------------------------------------------------------------------------------------
# The stage.


def check_bundle_dir(folder: Path) -> None:
    """Refuse to replace a folder that is not a bundle (package.py swaps its bundle_dir whole)."""
    foreign = folder.is_dir() and any(folder.iterdir()) and not (folder / MANIFEST).is_file()
    if folder.exists() and (not folder.is_dir() or foreign):
        raise PackageError(
            f"bundle_dir {folder} exists and is not a bundle (no {MANIFEST}): package.py replaces its bundle_dir "
            "whole, so point bundle_dir at a new or bundle folder"
        )


def copy_members(members: dict[str, Member], build: Path) -> dict[str, list[Path]]:
    """Slim copies (weights, classes, config, data_config) of every member's folds under ``build``."""
    files: dict[str, list[Path]] = {}
    for m in members.values():
        files[m.name] = []
        for k, path in zip(m.folds, m.checkpoints, strict=True):
            ckpt = load_checkpoint(path)
            out = build / "members" / m.name / f"{fold_name(k)}.pt"
            save_checkpoint(out, {key: ckpt[key] for key in SLIM_KEYS})
            files[m.name].append(out)
    return files


def package(cfg: Config, force_oof: bool = False, device: torch.device | None = None) -> dict[str, Any]:
    """Build ``cfg.bundle_dir``; returns the manifest written."""
    device = device or default_device()
    torch.set_num_threads(num_workers(0))
    table = read_folds(cfg.folds_csv)
    classes, fold_ids = class_names(table), sorted(table["fold"].unique().tolist())
    y, fold_of = targets(table, classes), table["fold"].to_numpy(dtype=np.int64)
    bundle_dir = Path(cfg.bundle_dir)
    check_bundle_dir(bundle_dir)
    budget = make_budget(cfg)  # before the long steps: a time limit without a test-set size fails here
    views = [ORIG, *dict.fromkeys(v for v in cfg.tta_views if v != ORIG)]
    members = load_members(cfg, fold_ids, classes)
    log.info(
        "candidates: %s; views: %s; %d OOF images, %d classes", list(members), views, len(table), len(classes)
    )
    add_view_oofs(cfg, members, views, table, device, force_oof)
    if cfg.full_fit:
        members = {n: full_fit_member(cfg, m) for n, m in members.items()}
    template, batch = Stacker(**cfg.stacker_options()), default_batch_size(device)
    with atomic_dir(bundle_dir) as build:
        files = copy_members(members, build)
        costs = measure(cfg, members, files, views, table, device, batch)
        plan = make_plan(members, views, costs, budget, y, fold_of, template=template, batch=batch,
                         machine=machine(device))  # fmt: skip
        for name in set(members) - set(plan.selection):
            for f in files.pop(name):
                f.unlink()
            (build / "members" / name).rmdir()
        log.info("plan: %s (%.2f ms/image)", plan.selection, plan.ms_per_image)
        feats = [members[n].feature(v) for n, v in plan.selection.items()]
        result = fit_stacker(
            feats, y, fold_of, classes, list(plan.selection), template=template, choice=cfg.stacker
        )
        bias = class_bias(cfg, result, y, fold_of, classes)
        rel = {n: [f.relative_to(build).as_posix() for f in fs] for n, fs in files.items()}
        stacker_files = [f.relative_to(build).as_posix() for f in result.final.save(build / "stacker")]
        manifest = write_manifest(
            build, build_manifest(cfg, plan, result, bias, rel, stacker_files, y, classes)
        )
    log.info(
        "bundle %s: %d member(s) %s, stacker %s (nested OOF log-loss %.4f), %.2f ms/image planned",
        bundle_dir, len(plan.selection), ", ".join(f"{n}[{'+'.join(v)}]" for n, v in plan.selection.items()),
        result.kind, manifest["scores"]["stacker"]["log_loss"], manifest["plan"]["ms_per_image"],
    )  # fmt: skip
    return manifest


def class_bias(
    cfg: Config, stack: StackResult, y: np.ndarray, folds: np.ndarray, classes: list[str]
) -> dict[str, Any]:
    """The manifest's ``class_bias`` entry: per-class offsets on the shipped stacker's log-probabilities
    (lib/bias.py), fitted on its nested OOF predictions (each row predicted by a stacker fitted without the
    row's fold) and checked nested again; ``class_bias`` none: not fitted. ``y``, ``folds``: int [N]."""
    if cfg.class_bias == "none":
        return {"applied": False, "reason": "class_bias none: not fitted"}
    bias = fit_class_bias(
        log_probs(stack.nested), y, folds=folds, max_accuracy_drop=cfg.class_bias_accuracy_drop
    )
    moved = [f"{classes[i]} {bias.fitted[i]:+.3g}" for i in np.flatnonzero(bias.fitted)]
    log.info(
        "class bias %s: %s; classes never predicted %d -> %d (nested OOF); offsets fitted on all OOF: %s",
        "shipped" if bias.applied else "not shipped", bias.reason, bias.before["never_predicted"],
        bias.after["never_predicted"], preview(moved) or "none",
    )  # fmt: skip
    return bias.record()


def build_manifest(
    cfg: Config, plan: Plan, stack: StackResult, bias: dict[str, Any], member_files: dict[str, list[str]],
    stacker_files: list[str], y: np.ndarray, classes: list[str],
) -> dict[str, Any]:  # fmt: skip
    """The bundle's manifest (before write_manifest adds the file hashes and digest). ``bias``: the
    :func:`class_bias` entry; ``member_files``: the chosen members' fold files and ``stacker_files`` the
    stacker's, relative to the bundle; ``y``: folds.csv's class indices, int [N]."""
    counts = np.bincount(y, minlength=len(classes))
    fallback = int(np.argmax(counts))
    sel, members = plan.selection, plan.members
    scores = {n: prediction_scores(members[n].feature(v), y, len(classes)) for n, v in sel.items()}
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
                "preprocessing": members[n].pre.to_dict(),
                "views": v,
                "model": members[n].config.get("model"),
                "model_ms_per_image": {str(s): ms for s, ms in members[n].model_ms.items()},
                "load_s": members[n].load_s,
                "oof": scores[n],
            }
            for n, v in sel.items()
        ],
        "stacker": {
            "kind": stack.kind,
            "features": cfg.stack_features,
            "dir": "stacker",
            "files": stacker_files,
            "members": list(sel),
        },
        "class_bias": bias,
        "plan": plan.record(),
        "candidates": plan.candidates(y, classes),
        "ladder": plan.ladder,
        "time_limit": plan.budget.default_time_limit(plan.costs, sel),
        "scores": {
            "members": scores,
            "stacker": prediction_scores(log_probs(stack.nested), y, len(classes)),
            "comparison": stack.table.to_dict(orient="records"),
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
    except PipelineError as e:  # every stage and library error (ModelError, OOFError, StackError, ...)
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
