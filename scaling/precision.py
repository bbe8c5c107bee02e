"""Precision names (bf16, fp16, fp32) -> torch dtypes, for training, evaluation and planning."""
from __future__ import annotations

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def input_dtype(precision: str) -> torch.dtype:
    """DeepSpeed casts the model itself to bf16/fp16; inputs must be cast to match."""
    return DTYPES.get(precision, torch.float32)
