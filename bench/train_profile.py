"""Where one optimizer step of src/train.py's Trainer spends its time: phase by phase, operator by operator.

The Trainer is train.py's own, built on the first ``--images`` training images of fold 0 as
bench/train_bench.py builds it (same config, loaders, optimizer, precision). After ``--warmup`` untimed steps,
``--steps`` optimizer steps are timed with synchronous wall-clock timers (time.perf_counter; on the CPU
every op has finished when it returns) around each phase of the step:

- data wait: ``next()`` on the training loader (the epoch prologue of train_one_epoch included: train mode,
  sampler and loader reseeding, zero_grad, and the worker start-up of a new epoch, as its loaders restart
  their workers every epoch);
- host prep: ``.to(device)``, ``.contiguous(channels_last)`` and MixUp/CutMix when enabled (the dtype cast
  happens inside autocast, so it is part of forward);
- forward: ``Trainer.net(x)`` under train.py's autocast dtype; loss: ``Trainer.criterion`` under the same
  autocast, plus the isfinite check;
- backward: ``Trainer.scaler.scale(loss / accum_steps).backward()``;
- optimizer: ``Trainer._optimizer_step()`` itself (clipping, scaler, optimizer step, zero_grad, scheduler),
  with the EMA update it ends with timed apart as ``ema``;
- bookkeeping: the ``loss.item()`` running-loss updates train_one_epoch does per batch.

train_one_epoch is one loop, so this replicates its per-batch sequence call for call (Trainer's own net,
criterion, scaler, mixup and _optimizer_step; only the tqdm bar, off when not on a terminal, is left out),
split only where the timers go: forward and loss are two autocast blocks instead of one. A step is one
optimizer step, i.e. ``accum_steps`` batches.

The loader workers decode and augment in other processes: their CPU time is not in data wait, but on a
machine with few cores it slows the other phases, most in a step that opens an epoch (its workers start
afresh and fill their prefetch queue). So the table has the median beside the mean, and each step's total
is printed with those steps marked.

Then torch.profiler (CPU activities, with shapes) records ``--profile-steps`` more steps: the top operators
by self CPU time of the main thread, and the share of convolution ops and of depthwise ones among them
(weight of shape [C_out, 1, k, k] with C_in > 1, i.e. groups == in_channels). All of it is done for the
config's precision and, unless that is already fp32 (or ``--no-fp32``), again in fp32 from the same
starting weights.

Run from a checkout with the demo data: ``python bench/train_profile.py --config configs/demo.yaml``
(any config key is a flag, e.g. ``--img-size 224``; ``--images``, ``--steps``, ``--warmup``).
The figures hold for the CPU they ran on: it is printed (model name, avx512_bf16 / AMX flags), with the
torch threads; precision ``auto`` means bf16 only on CPUs with those flags. They hold only while nothing
else runs on the machine: sharing its cores slows the many small ops (optimizer) most.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import timm
import torch
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_bench, also when imported from tests

from train_bench import check_inputs, subset  # it puts src/ on sys.path

from lib.common import seed_everything
from lib.config import Config, parse_config
from lib.layout import FoldData
from lib.models import autocast
from train import Trainer, TrainError

PHASES = ("data wait", "host prep", "forward", "loss", "backward", "optimizer", "ema", "bookkeeping")
# Convolution ops by name: (index of the input, index of the weight) among their recorded input shapes.
CONV_ARGS = {
    "aten::conv2d": (0, 1), "aten::convolution": (0, 1), "aten::_convolution": (0, 1),
    "aten::mkldnn_convolution": (0, 1), "aten::_mkldnn_convolution": (0, 1),
    "aten::_slow_conv2d_forward": (0, 1), "aten::thnn_conv2d": (0, 1),
    "aten::convolution_backward": (1, 2), "aten::mkldnn_convolution_backward": (0, 2),
    "aten::_slow_conv2d_backward": (1, 2),
}  # fmt: skip
TOP_OPS = 12


@dataclass
class Step:
    """One timed optimizer step: ms per phase, images trained, whether it opened a training epoch."""

    ms: dict[str, float]
    images: int
    new_epoch: bool


class Laps:
    """Wall-clock milliseconds per phase: ``lap(phase)`` charges the time since the previous lap to it."""

    def __init__(self) -> None:
        self.ms = dict.fromkeys(PHASES, 0.0)
        self.tick = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.ms[phase] += (now - self.tick) * 1e3
        self.tick = now


def cpu_description() -> str:
    """The CPU model and its bf16 / AMX flags from /proc/cpuinfo (what precision auto keys on)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU (no /proc/cpuinfo)"
    lines = info.splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "unknown")
    flags = set(next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), []))
    marks = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx512_bf16", "amx_bf16", "amx_tile"))
    return f"{model} ({marks})"


def batches(trainer: Trainer) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Training batches across epochs, each epoch opened as train_one_epoch opens it."""
    cfg = trainer.cfg
    while True:
        trainer.open_epoch()
        usable = trainer.steps_per_epoch * cfg.accum_steps
        for i, batch in enumerate(trainer.train_loader):
            if i >= usable:
                break
            yield batch
        trainer.epoch += 1


def optimizer_step(trainer: Trainer, laps: Laps) -> None:
    """Trainer._optimizer_step, with the EMA update it ends with (same call, same step) timed apart."""
    ema, trainer.ema = trainer.ema, None
    try:
        trainer._optimizer_step()
    finally:
        trainer.ema = ema
    laps.lap("optimizer")
    if ema:
        ema.update(trainer.model, step=trainer.step)
        laps.lap("ema")


def timed_step(trainer: Trainer, data: Iterator) -> Step:
    """One optimizer step (``accum_steps`` batches) as train_one_epoch runs it, timed phase by phase."""
    cfg, laps, images, epoch = trainer.cfg, Laps(), 0, trainer.epoch
    for i in range(cfg.accum_steps):
        x, y = next(data)
        laps.lap("data wait")
        x = x.to(trainer.device, non_blocking=True).contiguous(memory_format=trainer.memory)
        y = y.to(trainer.device, non_blocking=True)
        if trainer.mixup:
            x, y = trainer.mixup(x, y)
        laps.lap("host prep")
        with autocast(trainer.device, trainer.dtype):
            logits = trainer.net(x)
        laps.lap("forward")
        with autocast(trainer.device, trainer.dtype):
            loss = trainer.criterion(logits, y)
        if not torch.isfinite(loss):
            raise TrainError(f"loss is {loss.item()}: lower --lr or use --precision fp32")
        laps.lap("loss")
        trainer.scaler.scale(loss / cfg.accum_steps).backward()
        laps.lap("backward")
        if i == cfg.accum_steps - 1:
            optimizer_step(trainer, laps)
        running = loss.item() * len(x)  # train_one_epoch's running loss and its deque of recent losses
        running += loss.item()
        images += len(x)
        laps.lap("bookkeeping")
    return Step(laps.ms, images, new_epoch=trainer.epoch != epoch)


def conv_kind(event: FunctionEvent) -> str | None:
    """'depthwise' or 'other' for a convolution op recorded with shapes (None: not a convolution)."""
    where = CONV_ARGS.get(event.name)
    if where is None:
        return None
    shapes = event.input_shapes or []
    x, w = (shapes[k] if k < len(shapes) else [] for k in where)
    if len(x) == 4 and len(w) == 4 and w[1] == 1 and x[1] > 1:
        return "depthwise"
    return "other"


def print_profile(prof: profile, steps: int) -> None:
    """Top operators by self CPU time, and the share of (depthwise) convolutions, forward and backward."""
    averages = sorted(prof.key_averages(), key=lambda a: a.self_cpu_time_total, reverse=True)
    total = sum(a.self_cpu_time_total for a in averages) or 1.0
    print(
        f"\ntorch.profiler, {steps} step(s): self CPU time of the main thread's ops,"
        f" {total / 1e3 / steps:.0f} ms/step"
    )
    print(f"{'operator':<44}{'calls/step':>11}{'ms/step':>10}{'share':>8}")
    for a in averages[:TOP_OPS]:
        ms = a.self_cpu_time_total / 1e3 / steps
        print(f"{a.key[:43]:<44}{a.count / steps:>11.0f}{ms:>10.1f}{a.self_cpu_time_total / total:>8.1%}")
    share = {(kind, way): 0.0 for kind in ("depthwise", "other") for way in ("forward", "backward")}
    layers = {"depthwise": 0, "other": 0}  # convolution layers, counted by their convolution_backward calls
    for event in prof.events():
        kind = conv_kind(event)
        if kind is not None:
            way = "backward" if "backward" in event.name else "forward"
            share[kind, way] += event.self_cpu_time_total / total
            layers[kind] += event.name == "aten::convolution_backward"
    fwd, bwd = (share["depthwise", w] + share["other", w] for w in ("forward", "backward"))
    per_step = total / 1e3 / steps  # ms
    dw_fwd, dw_bwd = share["depthwise", "forward"], share["depthwise", "backward"]
    n_dw, n_all = layers["depthwise"] // steps, (layers["depthwise"] + layers["other"]) // steps
    print(
        f"convolution ops: {(fwd + bwd) * per_step:.0f} ms/step, {fwd + bwd:.1%} of it"
        f" (forward {fwd:.1%}, backward {bwd:.1%})"
    )
    print(
        f"depthwise ones (weight [C, 1, k, k], {n_dw} of {n_all} conv layers):"
        f" {(dw_fwd + dw_bwd) * per_step:.0f} ms/step, {dw_fwd + dw_bwd:.1%}"
        f" (forward {dw_fwd:.1%}, backward {dw_bwd:.1%})"
    )


def print_phases(label: str, steps: list[Step]) -> float:
    """The phase table (mean and median ms per step, share of the mean step), each step's total; images/s."""
    mean = {p: statistics.fmean(s.ms[p] for s in steps) for p in PHASES}
    median = {p: statistics.median(s.ms[p] for s in steps) for p in PHASES}
    total = sum(mean.values())
    rate = sum(s.images for s in steps) / (total * len(steps) / 1e3)
    print(f"\n== {label}: {len(steps)} timed steps, {rate:.1f} images/s ==")
    print(f"{'phase':<13}{'ms/step':>9}{'median':>9}{'share':>8}")
    for p in PHASES:
        print(f"{p:<13}{mean[p]:>9.1f}{median[p]:>9.1f}{mean[p] / total:>8.1%}")
    print(f"{'total':<13}{total:>9.1f}{sum(median.values()):>9.1f}{1:>8.0%}")
    totals = ", ".join(f"{sum(s.ms.values()):.0f}{'*' if s.new_epoch else ''}" for s in steps)
    print(f"step totals, ms: {totals} (*: opened an epoch, its loader workers started afresh)")
    return rate


def run_precision(cfg: Config, data: FoldData, args: argparse.Namespace, tmp: Path) -> tuple[str, float, str]:
    """Build train.py's Trainer for ``cfg``, warm up, time and profile it; its label, images/s, setup."""
    seed_everything(cfg.seed)  # the same starting weights for every precision
    try:
        trainer = Trainer(cfg, 0, data, tmp, rank=0, world=1, device=torch.device("cpu"))
    except TrainError as e:
        sys.exit(f"train_profile: {e}")
    label = f"{str(trainer.dtype or 'fp32').removeprefix('torch.')} (precision {cfg.precision})"
    stream = batches(trainer)
    for _ in range(args.warmup):
        timed_step(trainer, stream)
    timed = [timed_step(trainer, stream) for _ in range(args.steps)]
    rate = print_phases(label, timed)
    if args.profile_steps > 0:
        # Kineto's log level: no "gpuGetDeviceCount failed" ERROR line on a machine without a GPU.
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(args.profile_steps):
                timed_step(trainer, stream)
        print_profile(prof, args.profile_steps)
    setup = (
        f"{cfg.model} at {trainer.img_size} px, batch {cfg.batch_size} x accum {cfg.accum_steps}, "
        f"{cfg.optimizer}, channels_last={cfg.channels_last}, ema={cfg.ema}, "
        f"{trainer.train_loader.num_workers} loader workers, "
        f"{trainer.steps_per_epoch} steps/epoch"
    )
    return label, rate, setup


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("profile")
    group.add_argument(
        "--images", type=int, default=128, help="training images of fold 0 to draw batches from"
    )
    group.add_argument("--steps", type=int, default=4, help="timed optimizer steps per precision")
    group.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    group.add_argument("--profile-steps", type=int, default=1, help="steps under torch.profiler (0: none)")
    group.add_argument("--no-fp32", action="store_true", help="skip the fp32 comparison run")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = ["--config", "configs/demo.yaml", *argv]
    cfg, args = parse_config(argv, __doc__.splitlines()[0], add_arguments, stage="train")
    if args.steps < 1 or args.warmup < 0 or args.profile_steps < 0:
        sys.exit("train_profile: --steps must be 1 or more, --warmup and --profile-steps 0 or more")
    check_inputs(cfg)
    data = subset(cfg, args.images)
    per_epoch = max(1, args.images // (cfg.batch_size * cfg.accum_steps))
    needed = args.warmup + args.steps + args.profile_steps
    cfg = replace(cfg, epochs=max(cfg.epochs, math.ceil(needed / per_epoch) + 1))  # the schedule spans them
    print(
        f"CPU: {cpu_description()}; {torch.get_num_threads()} torch threads;"
        f" torch {torch.__version__}, timm {timm.__version__}"
    )
    print(
        f"{args.images} images of fold 0, {args.warmup} warm-up + {args.steps} timed"
        f" + {args.profile_steps} profiled steps"
    )
    precisions = [cfg.precision] if cfg.precision == "fp32" or args.no_fp32 else [cfg.precision, "fp32"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:  # never written: no epoch ends in fit()
        for precision in precisions:
            results.append(run_precision(replace(cfg, precision=precision), data, args, Path(tmp)))
    print(f"\nsetup: {results[0][2]}")
    for label, rate, _ in results:
        print(f"{label}: {rate:.1f} images/s")
    if len(results) == 2:
        print(f"{results[0][0]} / {results[1][0]} = {results[0][1] / results[1][1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
