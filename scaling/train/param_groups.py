"""Optimizer parameter groups: weight decay on/off, and layer-wise lr decay for fine-tuning.

Layer decay (BEiT, MAE, VideoMAE V2): with L = depth, the patch embedding is layer 0, block
i is layer i + 1 and everything after the blocks (fc_norm, head) is layer L + 1; a parameter
of layer j trains at `peak_lr * layer_decay ** (L + 1 - j)`, so the head gets the full lr and
the patch embedding the smallest. L + 1 is read off the model as its largest `layer_id`.

How the scale reaches the optimizer: `scaling.train.schedule.warmup_cosine` is a LambdaLR,
which sets each group's lr to `(that group's lr when the scheduler was built) * factor(step)`.
So the scale is baked into each group's initial `lr` (pass `base_lr` = the peak lr), and the
ratio between groups then holds at every step, warmup and floor included. `lr_scale` is kept
on each group too, for logging and for schedulers that multiply it in themselves (timm's).
Do not pass both: a scheduler that applies `lr_scale` to groups whose `lr` already carries
it would apply the decay twice.
"""
from __future__ import annotations

from torch import nn


def no_decay_names(model: nn.Module) -> set[str]:
    return set(getattr(model, "no_weight_decay", lambda: set())())


def skips_decay(name: str, p, skip: set[str]) -> bool:
    """The one no-decay rule: biases, 1-D parameters (norms) and the model's `no_weight_decay()` names."""
    # Under zero.Init a partitioned parameter's .shape is empty; ds_shape keeps the true one.
    ndim = len(getattr(p, "ds_shape", p.shape))
    return ndim <= 1 or name.endswith(".bias") or name in skip


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0,
                       base_lr: float | None = None) -> list[dict]:
    """Groups with `params`, `weight_decay`, `lr_scale`, `group_name` (and `lr` when `base_lr`).

    No weight decay on biases, 1-D parameters (norms) and the model's `no_weight_decay()`
    names. With `layer_decay == 1.0` this is exactly two groups, decay then no-decay, in
    parameter order, as `scaling.train.engine.param_groups` builds them.
    """
    skip = no_decay_names(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if layer_decay == 1.0:
        layer_of = {n: 0 for n, _ in named}
        top = 0
    else:
        if not hasattr(model, "layer_id"):
            raise ValueError(f"layer_decay={layer_decay} needs a model with layer_id(name); "
                             f"{type(model).__name__} has none, so set layer_decay to 1.0")
        layer_of = {n: model.layer_id(n) for n, _ in model.named_parameters()}
        top = max(layer_of.values())  # L + 1: the head's layer

    groups: dict[tuple[int, bool], dict] = {}
    if layer_decay == 1.0:  # both groups always exist, as in engine.param_groups
        for no_decay in (False, True):
            groups[(0, no_decay)] = _group(0, no_decay, weight_decay, 1.0, base_lr, plain=True)
    for name, p in named:
        no_decay = skips_decay(name, p, skip)
        layer = layer_of[name]
        key = (layer, no_decay)
        if key not in groups:
            groups[key] = _group(layer, no_decay, weight_decay, layer_lr_scale(layer_decay, layer, top), base_lr, plain=False)
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def layer_lr_scale(layer_decay: float, layer: int, top: int) -> float:
    """The lr multiplier of layer `layer` when the head is layer `top` (= depth + 1)."""
    return layer_decay ** (top - layer)


def _group(layer: int, no_decay: bool, weight_decay: float, scale: float, base_lr: float | None, plain: bool) -> dict:
    kind = "no_decay" if no_decay else "decay"
    group = {
        "params": [],
        "weight_decay": 0.0 if no_decay else weight_decay,
        "lr_scale": scale,
        "group_name": kind if plain else f"layer_{layer}_{kind}",
    }
    if base_lr is not None:
        group["lr"] = base_lr * scale
    return group
