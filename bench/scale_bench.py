"""Every stage after training at competition scale, on synthetic data with no images.

``python bench/scale_bench.py [--sizes 50000 100000 200000] [--classes 5000] [--members 3]``

The training list is long-tailed (class frequency ~ 1/(rank+10)^1.1 over ``--classes`` classes); 10% of the
images come in near-duplicate pairs whose 64-bit perceptual hashes differ in at most 2 bits; each of the
members' out-of-fold logits is right about 60% of the time, its mistakes falling on each class's ten
look-alike classes, stored as the pipeline stores them at that size (top-k rows, float16, memory-mapped).
20,000 test rows are made the same way. Every stage runs the pipeline's own code, each in a fresh child
process so that its peak RSS is its own (the parent holds no data):

- ``near duplicates``: lib/duplicates.near_pairs over every hash (every planted pair must be found), the
  pairs joined into groups (connected components);
- ``folds``: lib/splits.split_folds, the splitter folds.py uses;
- ``OOF store``: the members' OOF files written through lib/oof (what train.py writes per fold);
- ``distill``: distill.py's soft labels from the first member;
- ``stack``: stack.py's nested comparison on 3 folds (single, mean, blend, re-ranker; multi-class XGBoost is
  off above stack_max_classes);
- ``plan``: package.py's greedy time plan over the members and a test-time view (lib/plan.choose_plan);
- ``package stacker``: the stacker kind the stack chose, fitted on all OOF (the one that ships);
- ``predict stacking``: that stacker on the test rows (predict.py's stacking step);
- ``report``: report.py over the members and the stack.

It prints one row per stage (seconds, peak RSS) for every size, the growth between sizes, and last:
``scale: N images x C classes x M members: peak RSS X GB, total Y s`` for the largest size.
"""

from __future__ import annotations

import os

# XGBoost's and torch's OpenMP threads spin while they wait; on 2 shared cores that made the re-ranker's
# boosting 5-6x slower than one thread (measured here). Passive waiting must be set before OpenMP loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import dataclasses
import multiprocessing
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import distill
import report
import stack
from lib.config import ORIG, Config
from lib.duplicates import component_roots, near_pairs
from lib.layout import experiment, read_folds
from lib.oof import TopK, aligned_predictions, write_oof
from lib.plan import Budget, Costs, Member, choose_plan
from lib.preprocess import Preprocessing
from lib.splits import split_folds
from lib.stacker import Stacker

NEIGHBOURS = 10  # look-alike classes per class: where a member's mistakes fall
TEST_ROWS = 20_000
PRE = Preprocessing(size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


# ---------------------------------------------------------------------------------------------------------
# Synthetic data.


def long_tail_labels(n: int, c: int, rng: np.random.Generator) -> np.ndarray:
    """Class indices [n] with frequency ~ 1/(rank+10)^1.1, every class present at least once."""
    p = 1.0 / (np.arange(c) + 10.0) ** 1.1
    y = rng.choice(c, size=n, p=p / p.sum())
    y[rng.choice(n, size=c, replace=False)] = np.arange(c)
    return y


def planted_hashes(n: int, rng: np.random.Generator, distance: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """uint64 hashes [n] and the planted near pairs [P, 2]: 10% of the images are the second of a pair
    whose hash differs from the first's in 0..``distance`` random bits."""
    hashes = rng.integers(0, 2**63, size=n, dtype=np.uint64) ^ rng.integers(0, 2, n, dtype=np.uint64) << 63
    order = rng.permutation(n)
    second, others = order[: n // 10], order[n // 10 :]
    first = rng.choice(others, size=len(second))  # never itself a planted copy, so its hash stays
    flips = np.zeros(len(second), np.uint64)
    for _ in range(distance):
        bit = rng.integers(0, 64, len(second)).astype(np.uint64)
        flips |= np.where(rng.random(len(second)) < 0.8, np.uint64(1) << bit, np.uint64(0))
    hashes[second] = hashes[first] ^ flips
    return hashes, np.stack([first, second], axis=1)


def member_topk(y: np.ndarray, c: int, k: int, accuracy: float, rng: np.random.Generator) -> TopK:
    """A member's top-k logits: right with probability ``accuracy``; otherwise one of the true class's
    look-alikes comes first and the truth sits at rank 2..11 (or, 10% of the time, outside the top k)."""
    n = len(y)
    offsets = np.stack([np.random.default_rng(j).permutation(NEIGHBOURS) + 1 for j in range(c)])  # [C, 10]
    near = (y[:, None] + offsets[y]) % c  # [n, 10], distinct, never y
    near = np.take_along_axis(near, np.argsort(rng.random(near.shape), axis=1), axis=1)  # each row its own order
    order = np.concatenate([y[:, None], near], axis=1)  # truth first
    wrong = rng.random(n) >= accuracy
    to = rng.integers(1, NEIGHBOURS + 1, n)  # where the truth moves when wrong
    rows = np.flatnonzero(wrong)
    order[rows, 0], order[rows, to[rows]] = order[rows, to[rows]], y[rows]
    lost = rows[rng.random(len(rows)) < 0.1]
    order[lost, to[lost]] = (y[lost] + k + 1) % c  # the truth falls out of the top k
    far = (y[:, None] + NEIGHBOURS + 1 + np.arange(k - NEIGHBOURS - 1)) % c  # offsets 11..k-1: all distinct
    index = np.concatenate([order, far], axis=1)[:, :k].astype(np.int32)
    top = rng.normal(4.0, 1.0, (n, 1)) + 2.0 * ~wrong[:, None]
    values = (top - np.cumsum(rng.exponential(0.35, (n, k)), axis=1) + 0.35).astype(np.float32)
    rest = (np.log(c - k) - 1.0 + rng.normal(0, 0.3, n)).astype(np.float32)
    return TopK(index, values, rest, c)


# ---------------------------------------------------------------------------------------------------------
# The stages (each run in a child process; they talk through files under ``root``).


@dataclasses.dataclass(frozen=True)
class Scale:
    root: Path
    n: int
    c: int
    members: int
    seed: int = 0

    def cfg(self, **overrides) -> Config:
        return Config(
            output_dir=str(self.root / "output"), folds_csv=str(self.root / "folds.csv"), n_folds=3,
            workers=2, seed=self.seed, exp="m0", **overrides,
        )  # fmt: skip

    @property
    def names(self) -> list[str]:
        return [f"m{j}" for j in range(self.members)]


def stage_near_duplicates(s: Scale) -> str:
    rng = np.random.default_rng(s.seed)
    hashes, planted = planted_hashes(s.n, rng)
    i, j = near_pairs(hashes, 2)
    found = set(zip(np.minimum(i, j).tolist(), np.maximum(i, j).tolist(), strict=True))
    want = {(min(a, b), max(a, b)) for a, b in planted.tolist()}
    missed = len(want - found)
    if missed:
        raise AssertionError(f"{missed} planted near pairs not found")
    groups = component_roots(s.n, i, j)
    np.save(s.root / "groups.npy", groups)
    return f"{len(found):,} pairs within 2 bits (all {len(want):,} planted found), {len(np.unique(groups)):,} groups"


def stage_folds(s: Scale) -> str:
    rng = np.random.default_rng(s.seed + 1)
    y = long_tail_labels(s.n, s.c, rng)
    groups = np.load(s.root / "groups.npy")
    cfg = s.cfg()
    fold = split_folds(labels=y, groups=groups, n_folds=cfg.n_folds, seed=cfg.seed, dense_limit=cfg.dense_split_limit)
    classes = np.array([f"class {j:05d} / look+alike" for j in range(s.c)])  # sorted = index order
    table = pd.DataFrame({"image": [f"img{i:07d}.jpg" for i in range(s.n)], "label": classes[y], "group": groups,
                          "fold": fold})  # fmt: skip
    table.to_csv(cfg.folds_csv, index=False)
    sizes = np.bincount(fold)
    return f"fold sizes {sizes.min():,}..{sizes.max():,}; classes with 1 image: {(np.bincount(y) == 1).sum():,}"


def _labels(s: Scale) -> tuple[pd.DataFrame, list[str], np.ndarray]:
    folds = read_folds(s.cfg().folds_csv)
    classes = sorted(folds["label"].unique().tolist())
    y = folds["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    return folds, classes, y


def stage_store(s: Scale) -> str:
    folds, classes, y = _labels(s)
    cfg = s.cfg()
    sizes = []
    for j, name in enumerate(s.names):
        rng = np.random.default_rng(s.seed + 10 + j)
        for view, noise in ((ORIG, 0.0), ("hflip", 0.3)):
            top = member_topk(y, s.c, cfg.store_topk, 0.55 + 0.05 * j, rng)
            if noise:
                top = TopK(top.index, top.values + rng.normal(0, noise, top.values.shape).astype(np.float32),
                           top.rest, top.n_classes)  # fmt: skip
            exp = experiment(cfg.output_dir, name)
            path = exp.oof if view == ORIG else exp.view_oof(view)
            write_oof(path, folds, top, classes, **cfg.store_options())
            sizes.append(path.stat().st_size)
        test = member_topk(np.random.default_rng(99).integers(0, s.c, TEST_ROWS), s.c, cfg.store_topk, 0.55 + 0.05 * j, rng)
        np.savez(s.root / f"test_{name}.npz", index=test.index, values=test.values, rest=test.rest)
    return f"{len(sizes)} files, {sum(sizes) / 1e6:.0f} MB (top-{cfg.store_topk}, float16)"


def stage_distill(s: Scale) -> str:
    out = distill.make_soft_labels(s.cfg())
    return f"{out.stat().st_size / 1e6:.0f} MB of soft labels"


def stage_stack(s: Scale) -> str:
    stack.run(s.cfg(stack_members=s.names))
    table = pd.read_csv(experiment(s.cfg().output_dir, "stack").root / "stack_report.csv")
    rows = table[table["role"] == "stacker"]
    return "; ".join(f"{r.method} {r.accuracy:.3f}/{r.log_loss:.3f}{' *' if r.chosen else ''}" for r in rows.itertuples())


def _members(s: Scale, folds: pd.DataFrame, classes: list[str]) -> dict[str, Member]:
    cfg = s.cfg()
    out = {}
    for j, name in enumerate(s.names):
        exp = experiment(cfg.output_dir, name)
        oof = {ORIG: aligned_predictions(exp.oof, folds, classes), "hflip": aligned_predictions(exp.view_oof("hflip"), folds, classes)}
        out[name] = Member(name, [0, 1, 2], [], classes, {}, PRE, oof=oof, model_ms={224: 20.0 + 5 * j}, load_s=1.0)
    return out


def stage_plan(s: Scale) -> str:
    folds, classes, y = _labels(s)
    members = _members(s, folds, classes)
    costs = Costs(members, decode_ms=3.0, prep_ms={PRE: 1.0})
    budget = Budget("time_limit", time_limit=3600.0, images=15_000, startup_s=5.0, margin_s=60.0)
    template = Stacker(**s.cfg().stacker_options())
    sel, steps = choose_plan(members, [ORIG, "hflip"], costs, budget, y, folds["fold"].to_numpy(), template=template)
    return f"{len(steps)} steps -> {sel} at {costs.per_image(sel):.0f} ms/image"


def stage_package_stacker(s: Scale) -> str:
    folds, classes, y = _labels(s)
    kind = pd.read_json(experiment(s.cfg().output_dir, "stack").root / "stack.json", typ="series")["kind"]
    members = [aligned_predictions(experiment(s.cfg().output_dir, n).oof, folds, classes) for n in s.names]
    final = Stacker(kind, **s.cfg().stacker_options()).fit(members, y, folds["fold"].to_numpy())
    final.save(s.root / "stacker")
    return f"{kind} fitted on all {len(y):,} OOF rows"


def stage_predict(s: Scale) -> str:
    final = Stacker.load(s.root / "stacker")
    tests = []
    for name in s.names:
        z = np.load(s.root / f"test_{name}.npz")
        tests.append(TopK(z["index"], z["values"], z["rest"], s.c))
    top = final.predict_topk(tests)
    truth = np.random.default_rng(99).integers(0, s.c, TEST_ROWS)
    return f"{TEST_ROWS:,} test rows, top-1 accuracy {(top.index[:, 0] == truth).mean():.3f}"


def stage_report(s: Scale) -> str:
    text = report.report(s.cfg(), [*s.names, "stack"], s.root / "report")
    return f"{len(text.splitlines())} lines of report.md"


STAGES: list[tuple[str, Callable[[Scale], str]]] = [
    ("near duplicates", stage_near_duplicates), ("folds", stage_folds), ("OOF store", stage_store),
    ("distill", stage_distill), ("stack", stage_stack), ("plan", stage_plan),
    ("package stacker", stage_package_stacker), ("predict stacking", stage_predict), ("report", stage_report),
]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Running and measuring.


def _child(fn: Callable[[Scale], str], s: Scale, queue: multiprocessing.Queue) -> None:
    start = time.perf_counter()
    try:
        note = fn(s)
    except Exception as e:  # reported by the parent, with the stage's name
        queue.put(("error", f"{type(e).__name__}: {e}", 0.0, 0.0))
        return
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KB on Linux -> GB
    queue.put(("ok", note, time.perf_counter() - start, peak))


def run_stage(fn: Callable[[Scale], str], s: Scale) -> tuple[str, float, float]:
    """(note, seconds, peak RSS in GB) of one stage in a fresh forked process."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, s, queue))
    proc.start()
    status, note, seconds, peak = queue.get()
    proc.join()
    if status != "ok":
        raise SystemExit(f"scale_bench: stage {fn.__name__} failed at {s.n:,} images: {note}")
    return note, seconds, peak


def run_size(n: int, args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    with tempfile.TemporaryDirectory(prefix="scale_bench.") as tmp:
        s = Scale(Path(tmp), n, args.classes, args.members)
        (s.root / "output").mkdir()
        results = {}
        print(f"\n{n:,} images x {args.classes:,} classes x {args.members} members", flush=True)
        print(f"  {'stage':<18} {'seconds':>8} {'peak RSS':>9}  notes", flush=True)
        for name, fn in STAGES:
            note, seconds, peak = run_stage(fn, s)
            results[name] = (seconds, peak)
            print(f"  {name:<18} {seconds:>8.1f} {peak:>7.2f} GB  {note}", flush=True)
        return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[50_000, 100_000, 200_000], help="training images")
    p.add_argument("--classes", type=int, default=5_000)
    p.add_argument("--members", type=int, default=3)
    args = p.parse_args(argv)
    runs = {n: run_size(n, args) for n in args.sizes}
    if len(runs) > 1:
        print("\ngrowth (seconds, and the exponent b of seconds ~ N^b between the smallest and largest size):")
        lo, hi = min(runs), max(runs)
        for name, _ in STAGES:
            t = [runs[n][name][0] for n in sorted(runs)]
            b = np.log(max(runs[hi][name][0], 1e-3) / max(runs[lo][name][0], 1e-3)) / np.log(hi / lo)
            print(f"  {name:<18} " + "  ".join(f"{x:8.1f}" for x in t) + f"   b = {b:.2f}")
    big = max(runs)
    peak = max(p for _, p in runs[big].values())
    total = sum(t for t, _ in runs[big].values())
    print(f"\nscale: {big} images x {args.classes} classes x {args.members} members: peak RSS {peak:.2f} GB, total {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
