"""Start a stage from weights: the previous stage's export or a public VideoMAE (V2) checkpoint.

Loading happens after the model is built (possibly partitioned by ZeRO-3's zero.Init) and
before `deepspeed.initialize`, which takes the fp32 master copy from the loaded weights.
"""
from __future__ import annotations

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from scaling.models.convert import FRESH_PREFIXES, check_fit, encoder_weights_for_classifier, load_checkpoint_file

# Parts a classifier may start fresh: the head (linear or bridging) of a new label space or
# head type, fc_norm when coming from a pre-training checkpoint (whose final `norm` is not
# carried over), and MAR's reconstruction branch when the checkpoint holds no decoder:
# FRESH_PREFIXES (scaling/models/convert.py).


def load_initial_weights(model: nn.Module, path: str, trust: bool = False) -> list[str]:
    """Encoder weights of any of our exports or a public checkpoint; a 710-way head becomes the
    model's 400/600/700-way head through the K710 index maps (`convert.adapt_head`). Returns
    the model's keys the checkpoint did not set (left at their init). The file is read with
    the weights-only unpickler unless `trust` (finetune.trust_checkpoint)."""
    return load_gathered(model, encoder_weights_for_classifier(load_checkpoint_file(path, trust), model))


def load_gathered(model: nn.Module, state: dict[str, torch.Tensor], allow_missing: tuple[str, ...] = FRESH_PREFIXES) -> list[str]:
    """Copy a full state dict into a model whose parameters may be ZeRO-3 partitions; returns
    the keys `state` lacks.

    Module by module, so at most one module's full weights exist at a time: each parameter
    group is gathered, rank 0 writes it, and DeepSpeed re-partitions rank 0's values."""
    missing = check_fit(model, state, strict=True, allow_missing=allow_missing)  # clear error before any copy
    writer = not dist.is_initialized() or dist.get_rank() == 0
    for module_name, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
            if writer:
                prefix = f"{module_name}." if module_name else ""
                with torch.no_grad():
                    for name, p in params.items():
                        if prefix + name in state:
                            p.data.copy_(state[prefix + name].to(p.dtype))
    return missing
