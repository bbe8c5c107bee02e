"""Per-step learning-rate schedule: linear warmup, then cosine down to a floor."""
from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based).

    Warmup reaches the peak at its last step instead of starting from 0 (DeepSpeed's
    WarmupCosineLR and VideoMAE's schedule both spend the first step at lr 0).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: Optimizer, warmup_steps: int, total_steps: int, min_ratio: float) -> LambdaLR:
    """A LambdaLR over every param group, so per-group lr scales (layer decay) are kept."""
    return LambdaLR(optimizer, lambda step: warmup_cosine_factor(step, warmup_steps, total_steps, min_ratio))


def resync_lr(scheduler: LambdaLR) -> None:
    """Set every group's lr from the schedule at its restored position.

    A checkpoint restores the optimizer's last lr; if the run resumes with a different
    `train.steps`, the schedule (not the stale value) must decide the next step's lr."""
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
