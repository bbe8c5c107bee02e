"""The learning-rate schedule and the length of a run, as the VideoMAE V2 reference defines them.

Per optimizer step (the reference's `utils.cosine_scheduler`, one value per iteration):
- warmup, steps 0 .. W-1: evenly spaced from the warmup lr to the peak, both ends included
  (`np.linspace(warmup_lr, peak, W)`), so step 0 runs at the warmup lr and step W-1 at the peak;
- then, for i = 0 .. total-W-1: `min + (peak - min) / 2 * (1 + cos(pi * i / (total - W)))`.
Peak, min and warmup lr are all scaled by videos per step / 256 (`lr_scaled` below).

An epoch is `num_videos // global_batch` optimizer steps (the reference's
`len(dataset) // total_batch_size`): every optimizer step takes `global_batch` videos, and the
videos left over at the end of an epoch's shuffled order (fewer than one step's worth) are not
used in that epoch, as with the reference's `drop_last`. The fine-tune loop reads exactly
`steps_per_epoch * grad_accum` micro-batches per epoch (`scaling.train.finetune.batches_from`).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

if TYPE_CHECKING:
    from scaling.config import RunConfig


def lr_at(step: int, peak: float, floor: float, start: float, warmup_steps: int, total_steps: int) -> float:
    """The lr of optimizer step `step` (0-based); past `total_steps` it stays at the floor."""
    if step < warmup_steps:
        if warmup_steps == 1:
            return start  # linspace(start, peak, 1) == [start]
        return start + (peak - start) * step / (warmup_steps - 1)
    decay_steps = max(1, total_steps - warmup_steps)
    i = min(step - warmup_steps, decay_steps)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * i / decay_steps))


def warmup_cosine(optimizer: Optimizer, peak: float, floor: float, start: float, warmup_steps: int,
                  total_steps: int) -> LambdaLR:
    """A LambdaLR over every param group: each group's initial lr (peak x its layer-decay scale)
    times lr_at / peak, so the per-group ratios hold at every step, warmup and floor included."""
    return LambdaLR(optimizer, lambda step: lr_at(step, peak, floor, start, warmup_steps, total_steps) / peak)


def resync_lr(scheduler: LambdaLR) -> None:
    """Set every group's lr from the schedule at its restored position.

    A checkpoint restores the optimizer's last lr; if the run resumes with a different
    `train.steps`, the schedule (not the stale value) must decide the next step's lr."""
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def steps_per_epoch(num_videos: int, global_batch: int) -> int:
    """Optimizer steps in one pass over `num_videos` videos (see the module docstring)."""
    return num_videos // global_batch


def run_length(epochs: int, steps: int, warmup_epochs: int, warmup_steps: int, epoch_steps: int) -> tuple[int, int]:
    """(total, warmup) optimizer steps. With `epochs` the run is epochs x epoch_steps long, else
    `steps`; a positive `warmup_steps` wins over `warmup_epochs` (as the reference's
    `--warmup_steps`), which counts in epochs of `epoch_steps`."""
    total = epochs * epoch_steps if epochs else steps
    warmup = warmup_steps if warmup_steps > 0 else warmup_epochs * epoch_steps
    return total, warmup


def videos_per_step(cfg: RunConfig) -> int:
    """Videos per optimizer step over all ranks (`train.global_batch`)."""
    return cfg.train.global_batch


def clips_per_step(cfg: RunConfig) -> int:
    """Clips per optimizer step: each video gives `data.num_sample` clips (repeated augmentation)."""
    return cfg.train.global_batch * cfg.data.num_sample


def lr_scaled(cfg: RunConfig, lr_arg: float) -> float:
    """VideoMAE V2's linear scaling rule: lr = lr_arg x videos per step / 256. Repeated
    augmentation is NOT counted (a batch of 32 videos x 4 clips scales by 32, not 128), as in the
    reference's `args.lr * total_batch_size / 256`."""
    return lr_arg * videos_per_step(cfg) / 256


def peak_lr(cfg: RunConfig) -> float:
    return lr_scaled(cfg, cfg.optim.base_lr)


def min_lr(cfg: RunConfig) -> float:
    return lr_scaled(cfg, cfg.optim.min_lr)


def warmup_lr(cfg: RunConfig) -> float:
    return lr_scaled(cfg, cfg.optim.warmup_lr)


def run_steps(cfg: RunConfig, epoch_steps: int | None = None) -> tuple[int, int]:
    """(total, warmup) optimizer steps of the run; `epoch_steps` defaults to `train.steps_per_epoch`."""
    t, o = cfg.train, cfg.optim
    epoch_steps = t.steps_per_epoch if epoch_steps is None else epoch_steps
    return run_length(t.epochs, t.steps, o.warmup_epochs, o.warmup_steps, epoch_steps)


def lr_of_step(cfg: RunConfig, step: int, total: int, warmup: int) -> float:
    """The top group's lr (layer-decay scale 1) at optimizer step `step`: what the run uses."""
    return lr_at(step, peak_lr(cfg), min_lr(cfg), warmup_lr(cfg), warmup, total)
