"""Checking a DeepSpeed checkpoint folder given by path before DeepSpeed unpickles it.

DeepSpeed's own loaders (`zero_to_fp32`, `load_checkpoint`) call `torch.load(weights_only=False)`,
so a crafted `.pt` in a folder passed to `scaling export` would run code. Each file is first
read with PyTorch's weights-only unpickler (tensors memory-mapped, not read), allowing only the
classes DeepSpeed itself pickles into a checkpoint; a file that needs anything else is refused.
"""
from __future__ import annotations

from pathlib import Path

from scaling.models.convert import safe_load


def deepspeed_checkpoint_globals() -> list:
    """Classes DeepSpeed pickles into checkpoints besides tensors and containers: the ZeRO stage
    in the optimizer state, and the loss scaler object (static for bf16/fp32, dynamic for fp16)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [ZeroStageEnum, LossScaler, DynamicLossScaler]


def check_checkpoint_folder(tag_dir: str | Path) -> None:
    """Raise UntrustedCheckpointError (naming the file and --trust-checkpoint) if any `.pt` in
    `tag_dir` holds more than DeepSpeed writes; FileNotFoundError if there is no such folder."""
    tag_dir = Path(tag_dir)
    files = sorted(tag_dir.glob("*.pt"))
    if not files:
        raise FileNotFoundError(f"no checkpoint files (*.pt) in {tag_dir}; pass a run folder whose checkpoints/ "
                                "holds a DeepSpeed checkpoint, or --tag for another step")
    allowed = deepspeed_checkpoint_globals()
    for f in files:
        safe_load(f, extra_globals=allowed, mmap=True)
