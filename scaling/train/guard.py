"""Divergence guard: a step whose loss or gradient norm is not finite changes nothing.

DeepSpeed already refuses to apply such a step: its ZeRO optimizers (and the bf16 one) compute
the global gradient norm before updating and, when it is inf/NaN, zero the gradients and
return without touching the fp32 weights or the Adam moments; the engine then also leaves the
lr schedule where it was (`engine.was_step_applied()` is False). What was missing is knowing
it happened and stopping when it keeps happening: the guard counts such steps
(`train/skipped_steps`), and after `train.max_nonfinite_steps` in a row ends the run with one
sentence, before any checkpoint of a diverged model is written (the step loops save only
after a finite step).

With fp16 dynamic loss scaling a step DeepSpeed skips for an overflow is normal (the scale
goes down and the step is retried on the next batch); it counts only once the scale is at its
minimum, when skipping can no longer help.
"""
from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist

from scaling.train.checkpoint import RunFailed

# Test-only: "3" or "3,4,5" makes those steps' loss NaN (1-based step numbers, as logged), so
# tests can drive a real divergence on real ranks. Never set it outside tests.
NAN_AT_STEP_ENV = "SCALING_TEST_NAN_AT_STEP"


class Diverged(RunFailed):
    """Too many non-finite steps in a row; the message is one sentence."""


def injected_nan_steps() -> set[int]:
    raw = os.environ.get(NAN_AT_STEP_ENV, "")
    return {int(s) for s in raw.split(",") if s.strip()}


class DivergenceGuard:
    """`inject(loss, step)` on every micro-step (test hook), `check(...)` once per step, then
    (after logging the step) `raise_if_diverged()`."""

    def __init__(self, max_nonfinite: int, precision: str, last_good_step: int):
        self.max_nonfinite = max_nonfinite
        self.fp16 = precision == "fp16"
        self.skipped = 0  # non-finite steps this run, logged as train/skipped_steps
        self.in_a_row = 0
        self.last_good_step = last_good_step
        self.nan_steps = injected_nan_steps()
        self.failure = ""  # set once the run must stop

    def inject(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        return loss * float("nan") if step + 1 in self.nan_steps else loss

    def check(self, engine, step: int, step_loss: float) -> bool:
        """True when the step was finite on every rank (all ranks agree); otherwise counts it, and
        after `max_nonfinite` in a row marks the run as diverged. Call on every rank after the
        boundary `engine.step()`."""
        bad = torch.tensor([0.0 if self.finite_here(engine, step_loss) else 1.0])
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if not bad.item():
            self.in_a_row = 0
            self.last_good_step = step + 1
            return True
        self.skipped += 1
        self.in_a_row += 1
        if engine.was_step_applied():
            self.failure = (f"step {step + 1} was not finite and the optimizer applied it anyway (this DeepSpeed "
                            f"set-up does not check gradients), so the weights are no longer trustworthy; resume from "
                            f"the checkpoint of step {self.last_good_step} with a lower optim.base_lr")
        elif self.in_a_row >= self.max_nonfinite:
            self.failure = (f"training diverged: {self.in_a_row} steps in a row up to step {step + 1} had a non-finite "
                            f"loss or gradient norm and were skipped; the newest checkpoint is from step "
                            f"{self.last_good_step} or before, lower optim.base_lr (or raise optim.warmup_steps) and "
                            f"run again with --allow-changed to resume from it")
        return False

    def raise_if_diverged(self) -> None:
        if self.failure:
            raise Diverged(self.failure)

    def finite_here(self, engine, step_loss: float) -> bool:
        if not math.isfinite(step_loss):
            return False
        if engine.was_step_applied():
            norm = engine.get_global_grad_norm()
            return norm is None or math.isfinite(float(norm))
        if self.fp16:  # DeepSpeed skipped an fp16 overflow: fine unless the scale cannot go lower
            scaler = getattr(engine.optimizer, "loss_scaler", None)
            return scaler is None or not getattr(scaler, "dynamic", False) or scaler.cur_scale > scaler.min_scale
        return False  # skipped by DeepSpeed for a non-finite gradient norm

    def optimizer_step(self, engine, step: int) -> None:
        """`engine.step()`; with fp16, DeepSpeed raises once an overflow meets a loss scale already
        at its minimum: that is a divergence too."""
        try:
            engine.step()
        except Exception as e:  # DeepSpeed raises a bare Exception here
            if "loss scale already at minimum" not in str(e):
                raise
            raise Diverged(f"training diverged: at step {step + 1} the fp16 loss scale was already at its minimum "
                           f"and the gradients still overflowed; the newest checkpoint is from step "
                           f"{self.last_good_step} or before, lower optim.base_lr or train in bf16") from None
