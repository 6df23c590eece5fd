"""The time plan of a bundle: which members and test-time views predict.py runs inside a budget, and the
degradation ladder its watchdog steps down when it runs late.

Costs are measured on the machine packaging, with the inference code predict.py runs (lib/bundle.py):

- a member's **model time** per image and input size (ms, every fold, on synthetic tensors at predict.py's
  batch size, the fastest of a few repetitions after a warm-up): :func:`measure_member`;
- its **loading** time (s: hashing and loading its files, once per run): :func:`measure_member`;
- **decoding** and each distinct **preprocessing** per image (ms, on real images): :func:`measure_data`;
- predict.py's **start-up** (s: a fresh interpreter importing it): :func:`measure_startup`.

A selection (member -> views) costs decoding + its distinct preprocessings + every chosen member's model time
per view (:class:`Costs`). The :class:`Budget` is a per-image allowance or a time limit for a number of
test images, less start-up, loading and predict.py's safety margin. :func:`choose_plan` starts from the best
single member with its plain view and adds, greedily, the member or view of largest OOF gain (nested
log-loss of a blend) per millisecond while the plan fits; :func:`make_ladder` lists the cheaper fallbacks.
Every function takes explicit arguments (never a Config).
"""

from __future__ import annotations

import dataclasses
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
import torch

from lib.bundle import PredictDataset, file_sha256, is_oom, member_logits, place
from lib.common import PipelineError, get_logger, num_workers
from lib.config import ORIG
from lib.metrics import nll
from lib.models import model_from_checkpoint
from lib.oof import Predictions, TopK, mean_predictions, prediction_scores
from lib.preprocess import Preprocessing
from lib.stacker import Stacker, log_probs, nested_fits

log = get_logger("plan")

Selection = dict[str, list[str]]  # member name -> its views, in candidate order
MIN_GAIN = 1e-4  # log-loss improvement below which a member or view is not worth its time
PLAN_ROWS = 50_000  # images the plan's nested blend scores at most (a seeded subsample above)


class PlanError(PipelineError):
    """A candidate cannot be planned (e.g. it cannot run at its own input size); the message says why."""


@dataclass
class Member:
    """One candidate experiment: its fold checkpoints, preprocessing, OOF logits per view, measured costs.

    ``oof``: view -> logits aligned with folds.csv, float [N, C] or a lib.oof.TopK (a large view file);
    ``model_ms``: input side (px) -> ms per image of all its folds; ``load_s``: seconds to hash and load its
    files.
    """

    name: str
    folds: list[int | str]  # fold ids; ["full"] when the full fit ships (config full_fit)
    checkpoints: list[Path]
    classes: list[str]
    config: dict[str, Any]
    pre: Preprocessing
    oof: dict[str, Predictions] = field(default_factory=dict)
    model_ms: dict[int, float] = field(default_factory=dict)
    load_s: float = 0.0

    def size(self, view: str) -> int:
        """The input side (px) of ``view``."""
        return self.pre.view(view).size

    def usable(self, views: list[str]) -> list[str]:
        """The views it has OOF logits and a model time for (a fixed-size model may lack scale views)."""
        return [v for v in views if v in self.oof and self.size(v) in self.model_ms]

    def feature(self, views: list[str], rows: np.ndarray | None = None) -> Predictions:
        """Its stacker feature for ``views``: the mean of its OOF logits over them, float32 [N, C] (exact), or
        for top-k views the TopK of that mean (lib/oof.mean_predictions); only ``rows`` (indices) if given."""
        parts = [self.oof[v] for v in views]
        if rows is not None:
            parts = [p[rows] if isinstance(p, np.ndarray) else p.rows(rows) for p in parts]
        return mean_predictions(parts)


@dataclass
class Costs:
    """Per-image costs measured here: ``decode_ms`` per image, ``prep_ms`` per distinct preprocessing (ms
    per image), and the members' model and loading times."""

    members: dict[str, Member]
    decode_ms: float
    prep_ms: dict[Preprocessing, float]

    def per_image(self, sel: Selection, folds: dict[str, list[int]] | None = None) -> float:
        """ms per image of ``sel`` (``folds``: member -> the fold ids run, when not all of them)."""
        preps, model = set(), 0.0
        for name, views in sel.items():
            m = self.members[name]
            share = len(folds[name]) / len(m.folds) if folds and name in folds else 1.0
            for v in views:
                preps.add(m.pre.view(v))
                model += m.model_ms[m.size(v)] * share
        return self.decode_ms + sum(self.prep_ms.get(p, 0.0) for p in preps) + model

    def load_s(self, sel: Selection) -> float:
        """Seconds to load the members of ``sel``."""
        return sum(self.members[n].load_s for n in sel)


@dataclass
class Budget:
    """What predict.py may spend. ``kind``: none (everything) | ms_per_image (``ms_per_image`` per image) |
    time_limit (``time_limit`` s for ``images`` test images, after ``startup_s`` and loading, keeping
    ``margin_s`` in reserve)."""

    kind: str
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
        """Projected predict.py wall time (s) for ``images`` images (start-up and loading included)."""
        return self.startup_s + costs.load_s(sel) + self.images * costs.per_image(sel) / 1000

    def per_image_ms(self, costs: Costs, sel: Selection) -> float | None:
        """The per-image budget (ms) left for ``sel`` (time limit: after start-up, loading and margin)."""
        if self.kind == "ms_per_image":
            return self.ms_per_image
        if self.kind == "time_limit":
            left = self.time_limit - self.margin_s - self.startup_s - costs.load_s(sel)
            return left / self.images * 1000
        return None

    def default_time_limit(self, costs: Costs, sel: Selection) -> float:
        """The time limit (s) predict.py applies when given none: the limit planned for; with a per-image
        budget and a test-set size, the projected time with 5% and 1 s to spare (at least predict.py's
        safety margin); else 0 (none)."""
        if self.kind == "time_limit":
            return self.time_limit
        if self.kind == "ms_per_image" and self.images:
            seconds = self.startup_s + costs.load_s(sel) + self.images * self.ms_per_image / 1000
            return 1.05 * seconds + 1.0
        return 0.0


# ---------------------------------------------------------------------------------------------------------
# Choosing.


def quick_loss(
    members: dict[str, Member], sel: Selection, y: np.ndarray, folds: np.ndarray, template: Stacker,
    max_rows: int = PLAN_ROWS,
) -> float:  # fmt: skip
    """Nested OOF log-loss of a blend (``template``'s settings; weights and temperature fitted without the
    fold scored) over the selection's features: a member helps when its weight pays, whatever its strength
    alone. ``y``, ``folds``: int [N] class indices and fold ids. Above ``max_rows`` images it is computed on
    a fixed seeded subsample of that many rows (the same for every call, so gains stay comparable): the plan
    compares candidates, and a 50,000-row estimate of a log-loss difference is as decisive as the full one
    at a fraction of the cost."""
    rows = None
    if len(y) > max_rows:
        rows = np.sort(np.random.default_rng(0).choice(len(y), size=max_rows, replace=False))
        y, folds = y[rows], folds[rows]
    feats = [members[n].feature(v, rows) for n, v in sel.items()]
    nested = log_probs(nested_fits(template.clone("blend"), feats, y, folds)[0])
    if isinstance(nested, TopK):  # top-k members give a TopK of log-probabilities
        return float(-nested.log_prob(y).mean())
    return nll(nested, y)


def _ordered(sel: Selection, names: list[str]) -> Selection:
    return {n: sel[n] for n in names if n in sel}


def choose_plan(
    members: dict[str, Member], views: list[str], costs: Costs, budget: Budget, y: np.ndarray,
    folds: np.ndarray, *, template: Stacker,
) -> tuple[Selection, list[dict]]:  # fmt: skip
    """Greedy selection: the best single member (plain view), then the move (a view for a chosen member, or a
    new member with its plain view) of largest OOF gain per ms that fits, until none gains or fits. With
    budget kind none, every member with every usable view. Returns the selection and its steps (the log)."""
    names = list(members)
    singles = {n: quick_loss(members, {n: [ORIG]}, y, folds, template) for n in names}
    best = min(names, key=lambda n: (singles[n], costs.per_image({n: [ORIG]})))
    if budget.kind == "none":
        sel = {n: members[n].usable(views) for n in names}
        return sel, [{"step": "everything (no time_limit, no ms_per_image)", "members": sel}]
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
    while move := _best_move(members, views, costs, budget, sel, loss, y, folds, template):
        gain, name, view, sel = move
        loss -= gain
        ms = costs.per_image(sel)
        steps.append({"step": f"add {name} {view}", "gain": gain, "log_loss": loss, "ms_per_image": ms})
    return sel, steps


def _best_move(
    members: dict[str, Member], views: list[str], costs: Costs, budget: Budget, sel: Selection, loss: float,
    y: np.ndarray, folds: np.ndarray, template: Stacker,
) -> tuple[float, str, str, Selection] | None:  # fmt: skip
    """The fitting move of largest gain per ms, as (gain, member, view, new selection), or None."""
    names = list(members)
    moves = [(n, v) for n in sel for v in members[n].usable(views) if v not in sel[n]]
    moves += [(n, ORIG) for n in names if n not in sel]
    scored = []
    for n, v in moves:
        new = _ordered({**sel, n: [*sel.get(n, []), v]}, names)
        if not budget.fits(costs, new):
            continue
        gain = loss - quick_loss(members, new, y, folds, template)
        extra = max(costs.per_image(new) - costs.per_image(sel), 1e-6)
        if gain > MIN_GAIN:
            scored.append((gain / extra, gain, n, v, new))
    if not scored:
        return None
    return max(scored, key=lambda t: t[0])[1:]


def make_ladder(sel: Selection, members: dict[str, Member], costs: Costs) -> list[dict]:
    """full -> orig views only (same stacker) -> fastest member (all folds, no stacker) -> its first fold
    -> fallback; a step is kept only when it is cheaper (ms per image) than the one before."""
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


@dataclass
class Plan:
    """A chosen plan: the candidates and views considered, the measured costs, the budget, the selection
    (member -> views), the steps that chose it, the ladder, and where it was measured (predict.py's batch
    size, :func:`machine`)."""

    members: dict[str, Member]
    views: list[str]
    costs: Costs
    budget: Budget
    selection: Selection
    steps: list[dict]
    ladder: list[dict]
    batch: int
    machine: dict[str, Any]

    @property
    def ms_per_image(self) -> float:
        return self.costs.per_image(self.selection)

    def record(self) -> dict[str, Any]:
        """The manifest's ``plan`` entry (JSON values)."""
        budget, costs, sel = self.budget, self.costs, self.selection
        return {
            "budget": dataclasses.asdict(budget) | {"per_image_ms": budget.per_image_ms(costs, sel)},
            "ms_per_image": self.ms_per_image,
            "decode_ms_per_image": costs.decode_ms,
            "projected_s": budget.seconds(costs, sel) if budget.images else None,
            "chosen": sel,
            "steps": self.steps,
            "batch_size": self.batch,
            "machine": self.machine,
        }

    def candidates(self, y: np.ndarray, classes: list[str]) -> list[dict[str, Any]]:
        """The manifest's ``candidates``: per member and usable view its size, costs and OOF scores."""
        rows = []
        for m in self.members.values():
            for v in m.usable(self.views):
                size = m.size(v)
                rows.append({
                    "member": m.name, "view": v, "size": size, "model_ms_per_image": m.model_ms[size],
                    "preprocess_ms_per_image": self.costs.prep_ms.get(m.pre.view(v), 0.0), "load_s": m.load_s,
                    "oof": prediction_scores(m.oof[v], y, len(classes)),
                    "chosen": v in self.selection.get(m.name, []),
                })  # fmt: skip
        return rows


def make_plan(
    members: dict[str, Member], views: list[str], costs: Costs, budget: Budget, y: np.ndarray,
    folds: np.ndarray, *, template: Stacker, batch: int, machine: dict[str, Any],
) -> Plan:  # fmt: skip
    """:func:`choose_plan` and :func:`make_ladder` as one :class:`Plan`."""
    sel, steps = choose_plan(members, views, costs, budget, y, folds, template=template)
    ladder = make_ladder(sel, members, costs)
    return Plan(members, views, costs, budget, sel, steps, ladder, batch, machine)


# ---------------------------------------------------------------------------------------------------------
# Measurements.


def time_models(
    models: list[torch.nn.Module], pre: Preprocessing, batch: int, device: torch.device,
    dtype: torch.dtype | None, min_seconds: float = 0.5, max_reps: int = 5,
) -> float:  # fmt: skip
    """Milliseconds per image of running every model on a synthetic batch [batch, in_chans, size, size] at
    ``pre``'s size: the fastest of 2..``max_reps`` repetitions (within ``min_seconds``) after a warm-up. On
    a GPU that runs out of memory, at half the batch (as predict.py does); any other error is raised."""
    try:
        inputs = {pre: torch.randn(batch, pre.in_chans, pre.size, pre.size)}
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
    except RuntimeError as e:
        if not is_oom(e) or batch == 1:
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log.warning("out of memory at batch %d and %d px: timing batch %d", batch, pre.size, batch // 2)
        return time_models(models, pre, batch // 2, device, dtype, min_seconds, max_reps)


def measure_member(
    member: Member, files: list[Path], views: list[str], batch: int, device: torch.device,
    dtype: torch.dtype | None,
) -> None:  # fmt: skip
    """Fill ``member.load_s`` (s to hash and load ``files``, its slim fold checkpoints) and
    ``member.model_ms`` (ms per image of all folds, in ``dtype`` as predict.py runs them) per input size of
    ``views``. A size the model cannot run at (a fixed-size model and a scale view) is left out.

    Raises:
        PlanError: the member cannot run at its own input size.
    """
    start = time.perf_counter()
    for f in files:
        file_sha256(f)
    models = [place(model_from_checkpoint(f)[0], member.pre, device) for f in files]
    member.load_s = time.perf_counter() - start
    for pre in sorted({member.pre.view(v) for v in views}, key=lambda p: p.size):
        try:
            member.model_ms[pre.size] = time_models(models, pre, batch, device, dtype)
        except RuntimeError as e:
            log.warning(
                "%s cannot run at %d px (%s): its views at that size are left out", member.name, pre.size, e
            )
    if member.size(ORIG) not in member.model_ms:
        raise PlanError(f"member {member.name!r} cannot run at its own size {member.size(ORIG)} px")
    log.info(
        "%s: %d fold(s), load %.2f s, model %s ms/image", member.name, len(files), member.load_s,
        ", ".join(f"{ms:.2f} at {s} px" for s, ms in member.model_ms.items()),
    )  # fmt: skip


def measure_data(files: list[Path], preps: list[Preprocessing]) -> tuple[float, dict[Preprocessing, float]]:
    """Milliseconds per image of decoding (as predict.py decodes), and of each preprocessing, on the real
    images ``files`` (in this process)."""
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


def measure_startup(src: Path, module: str = "predict") -> float:
    """Seconds for a fresh Python to import ``module`` from the folder ``src`` (interpreter, torch, timm):
    what predict.py pays before any image. Raises subprocess.CalledProcessError when the import fails."""
    start = time.perf_counter()
    code = f"import sys; sys.path.insert(0, {str(src)!r}); import {module}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True, timeout=600)
    return time.perf_counter() - start


def machine(device: torch.device) -> dict[str, Any]:
    """Where the costs were measured: device type and name (GPU, else the CPU model), cores, torch threads,
    torch and Python versions."""
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
