"""Fine-tuning resumes exactly when an epoch is not a whole number of accumulation windows.

20 videos on 2 ranks, 2 videos per rank per micro-batch: the loader has ceil(20 / 4) = 5
micro-batches per rank per epoch, grad_accum is 2, and an epoch is 20 // 8 = 2 optimizer steps
(scaling/train/schedule.py), so the 5th micro-batch of every epoch is not used. A run stopped
after step 3 (inside epoch 1) and resumed must log the losses of the uninterrupted run; it did
not when a step could straddle two epochs (the uninterrupted run used the 5th micro-batch, the
resumed one skipped to where the epoch's steps start), nor while opening an epoch's DataLoader
drew from the global torch RNG (the drop-path draws of that step moved). The same run's logged
lr is checked against the reference's per-iteration schedule formula.
"""
import math
import subprocess

import numpy as np
import pytest
from helpers import SCALING, env_for
from helpers import SMOKE as SMOKE_PATH
from test_distributed import metrics  # the 2-rank helpers of the pre-training tests

PEAK, FLOOR, START = 0.1 * 8 / 256, 0.001 * 8 / 256, 0.01 * 8 / 256  # lr args x 8 videos / 256


@pytest.fixture(scope="module")
def shards(synth_shards):
    out = synth_shards(20, 5)
    return f"{out}/synth-{{000000..000003}}.tar"


def finetune(out, shards, tmp, *extra):
    cmd = [*SCALING, "finetune", "--config", str(SMOKE_PATH), f"train.output_dir={out}", f"data.shards={shards}",
           "finetune.num_classes=4", "finetune.mixup=0", "finetune.cutmix=0", "finetune.rand_aug=''", "finetune.reprob=0",
           "train.ranks=2", "train.global_batch=8", "train.grad_accum=2", "train.epochs=3", "train.save_every=100",
           "optim.warmup_steps=0", "optim.warmup_epochs=1", "optim.base_lr=0.1", "optim.min_lr=0.001",
           "optim.warmup_lr=0.01", "data.num_workers=0", "model.activation_checkpointing=false", "tracking.enabled=false", *extra]
    proc = subprocess.run(cmd, env=env_for(tmp), cwd=tmp, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def reference_lr(step: int, warmup: int = 2, total: int = 6) -> float:
    """VideoMAE V2's utils.cosine_scheduler, per iteration."""
    schedule = np.concatenate((np.linspace(START, PEAK, warmup), [
        FLOOR + 0.5 * (PEAK - FLOOR) * (1 + math.cos(math.pi * i / (total - warmup))) for i in range(total - warmup)]))
    return float(schedule[step])


def test_stopped_mid_epoch_resumes_to_the_uninterrupted_losses_and_lr_follows_the_reference(shards, tmp_path):
    whole = tmp_path / "whole"
    log = finetune(whole, shards, tmp_path)
    assert "20 videos, 2 steps/epoch, 6 steps" in log
    reference = metrics(whole)
    assert [r["step"] for r in reference] == [1, 2, 3, 4, 5, 6]
    for r in reference:
        assert math.isclose(r["lr"], reference_lr(r["step"] - 1), rel_tol=1e-9), r

    parts = tmp_path / "parts"
    finetune(parts, shards, tmp_path, "train.max_steps_this_run=3")
    assert [r["step"] for r in metrics(parts)] == [1, 2, 3]
    log = finetune(parts, shards, tmp_path)
    assert "resuming at step 3" in log
    resumed = metrics(parts)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference], "same batches, drop path and updates"
    assert [r["lr"] for r in resumed] == [r["lr"] for r in reference]
