"""Optimiser and learning-rate schedule: Ranger21 (or AdamW / SGD) driven per step by SGDR.

Ranger21 (Wright & Demeure, 2021: AdamW core with gradient centralisation, positive-negative momentum,
stable weight decay, norm loss and lookahead) is pytorch-optimizer's maintained implementation: the
``ranger21`` 0.1.0 wheel applies its weight decay to only the last tensor of each group (see
../shared/DESIGN.md). Its own warm-up and warm-down are switched off so that the schedule here owns the
learning rate: SGDR (Loshchilov & Hutter, ICLR 2017: cosine annealing with warm restarts) stepped per
optimiser step, after an optional linear warm-up.
"""

from __future__ import annotations

from typing import Literal

import torch
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingWarmRestarts, LinearLR, LRScheduler, SequentialLR


def build_optimizer(
    model: nn.Module,
    *,
    name: Literal["ranger21", "adamw", "sgd"] = "ranger21",
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    momentum: float = 0.9,
    total_steps: int = 1,
) -> torch.optim.Optimizer:
    """Ranger21, AdamW or SGD (Nesterov, ``momentum``) over ``model``'s parameters; no weight decay on
    biases and norm weights (timm's grouping). ``total_steps``: optimiser steps of the whole run (Ranger21
    sizes its internal schedules by it)."""
    if name == "ranger21":
        from pytorch_optimizer import Ranger21

        groups = param_groups_weight_decay(model, weight_decay)
        return Ranger21(
            groups, num_iterations=max(total_steps, 1), lr=lr, weight_decay=weight_decay,
            disable_lr_scheduler=True, num_warm_up_iterations=0, num_warm_down_iterations=0,
        )  # fmt: skip
    opt = "adamw" if name == "adamw" else "nesterov"
    return create_optimizer_v2(model, opt, lr=lr, weight_decay=weight_decay, momentum=momentum)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    steps_per_epoch: int,
    sgdr_t0: float = 8.0,
    sgdr_t_mult: int = 2,
    eta_min: float = 1e-6,
    warmup_epochs: float = 1.0,
) -> LRScheduler:
    """SGDR stepped per optimiser step: cosine cycles of ``sgdr_t0`` epochs, each ``sgdr_t_mult`` times the
    one before, down to ``eta_min``; after a linear warm-up of ``warmup_epochs`` (0: none) from 1e-3 x lr."""
    cycle = max(1, round(sgdr_t0 * steps_per_epoch))
    sgdr = CosineAnnealingWarmRestarts(optimizer, T_0=cycle, T_mult=sgdr_t_mult, eta_min=eta_min)
    warm = round(warmup_epochs * steps_per_epoch)
    if warm <= 0:
        return sgdr
    ramp = LinearLR(optimizer, start_factor=1e-3, end_factor=1.0, total_iters=warm)
    return SequentialLR(optimizer, [ramp, sgdr], milestones=[warm])
