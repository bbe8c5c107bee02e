"""The reference VideoMAE (V2) attention, for side-by-side comparison with our SDPA path.

`reference_forward` is the public code's `Attention.forward` (explicit softmax: the full
(B, h, N, N) probability matrix is materialized and kept for backward), written against our
parameter names, which are the same as the public checkpoints'. `naive_copy(model)`
returns a copy of a model with it swapped into every `scaling.models.vit.Attention`, so the
same weights and inputs run both implementations in one process.
"""
from __future__ import annotations

import types
from copy import deepcopy

import torch
import torch.nn.functional as F
from torch import nn

from scaling.models import vit


def reference_forward(self: vit.Attention, x: torch.Tensor) -> torch.Tensor:
    B, N, C = x.shape
    scale = (C // self.heads) ** -0.5
    qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias, requires_grad=False), self.v_bias))
    qkv = F.linear(input=x, weight=self.qkv.weight, bias=qkv_bias)
    qkv = qkv.reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (B, h, N, c)
    q = q * scale
    attn = q @ k.transpose(-2, -1)  # (B, h, N, N)
    attn = attn.softmax(dim=-1)
    x = (attn @ v).transpose(1, 2).reshape(B, N, -1)
    return self.proj(x)


def naive_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` (same weights) whose every `vit.Attention` runs `reference_forward`.

    Patched per instance, not on the class, so the original model keeps its own attention and
    both can run (and be `torch.compile`d) side by side in one process.
    """
    copy = deepcopy(model)
    for module in copy.modules():
        if isinstance(module, vit.Attention):
            module.forward = types.MethodType(reference_forward, module)
    return copy
