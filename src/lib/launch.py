"""Where a fold runs: distributed setup under torchrun, and one fold per GPU when there are several.

One fold on several GPUs or nodes: ``torchrun --nproc_per_node 4 src/train.py --fold 0`` (NCCL on GPUs,
gloo on CPU). Several folds on several GPUs: :func:`run_folds_in_parallel` starts one process per GPU
(``CUDA_VISIBLE_DEVICES``), the remaining folds queued.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from lib.common import get_logger

log = get_logger("launch")


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process; initialises the process group under torchrun
    (RANK, LOCAL_RANK, WORLD_SIZE set): NCCL on GPUs, else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, device


def gather_rows(indices: np.ndarray, values: np.ndarray, world: int) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's (indices [n], values [n, ...]) shard, concatenated on all ranks, ordered by index."""
    if world > 1:
        shards: list = [None] * world
        dist.all_gather_object(shards, (indices, values))
        indices = np.concatenate([s[0] for s in shards])
        values = np.concatenate([s[1] for s in shards])
    order = np.argsort(indices, kind="stable")
    return indices[order], values[order]


def visible_gpus() -> list[str]:
    """GPU ids this process may use, as CUDA_VISIBLE_DEVICES names them (empty on a CPU machine)."""
    count = torch.cuda.device_count()
    named = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g]
    return named[:count] if named else [str(i) for i in range(count)]


def without_fold(argv: list[str]) -> list[str]:
    """A command line without its ``--fold X`` / ``--fold=X``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--fold":
            skip = True
        elif not a.startswith("--fold="):
            out.append(a)
    return out


def run_folds_in_parallel(script: Path, folds: list[int], gpus: list[str], argv: list[str]) -> int:
    """``python script argv --fold k`` for every fold, one process per GPU at a time; the worst exit code."""
    queue, running, worst = list(folds), {}, 0
    base = without_fold(argv)
    while queue or running:
        for gpu in gpus:
            if queue and gpu not in running:
                fold = queue.pop(0)
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
                log.info(f"fold {fold} -> GPU {gpu}")
                running[gpu] = (fold, subprocess.Popen([sys.executable, str(script), *base, "--fold", str(fold)], env=env))
        time.sleep(1)
        for gpu, (fold, proc) in list(running.items()):
            if proc.poll() is not None:
                if proc.returncode:
                    log.error(f"fold {fold} on GPU {gpu} failed with exit code {proc.returncode}")
                worst = max(worst, proc.returncode)
                del running[gpu]
    return worst
