"""Start a stage from weights: the previous stage's export or a public VideoMAE (V2) checkpoint.

Loading happens after the model is built (possibly partitioned by ZeRO-3's zero.Init) and
before `deepspeed.initialize`, which takes the fp32 master copy from the loaded weights.
"""
from __future__ import annotations

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from scaling.models.convert import CheckpointMismatchError, encoder_weights_for_classifier, load_checkpoint_file

# Parts a classifier may start fresh: the head of a new label space, and fc_norm when coming
# from a pre-training checkpoint (whose final `norm` is not carried over).
FRESH = ("head.", "fc_norm.")


def load_initial_weights(model: nn.Module, path: str) -> None:
    """Encoder weights of any of our exports or a public checkpoint; a 710-way head becomes the
    model's 400/600/700-way head through the K710 index maps (`convert.adapt_head`)."""
    load_gathered(model, encoder_weights_for_classifier(load_checkpoint_file(path), model), source=path)


def load_gathered(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint",
                  allow_missing: tuple[str, ...] = FRESH) -> None:
    """Copy a full state dict into a model whose parameters may be ZeRO-3 partitions.

    Module by module, so at most one module's full weights exist at a time: each parameter
    group is gathered, rank 0 writes it, and DeepSpeed re-partitions rank 0's values."""
    expected = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters()}
    missing = sorted(k for k in set(expected) - set(state) if not k.startswith(allow_missing))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{n}: checkpoint {tuple(state[n].shape)} vs model {expected[n]}"
              for n in expected if n in state and tuple(state[n].shape) != expected[n]]
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(
            f"{source} does not fit the model: {len(missing)} missing keys {missing[:10]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:10]}, {len(shapes)} shape mismatches {shapes[:5]}; "
            "check model.name / num_frames / input_size / finetune.num_classes (or head_from_710) against the checkpoint")
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
