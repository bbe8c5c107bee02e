"""ZeRO-1/2's gather of the updated parameters, as one broadcast per owner on gloo (CPU ranks).

After each optimizer step a ZeRO-1/2 rank holds the updated partition it owns of every flat
parameter group, and every rank needs all partitions before the next forward. DeepSpeed
(0.19) gathers them in `deepspeed.runtime.utils.all_gather_dp_groups`, with one
`all_gather_into_tensor` per group. On gloo that collective is slow: for ViT-B's 86 M fp32
parameters on 2 local ranks it takes 1.54 s, where one broadcast per owner of the same bytes
takes 0.44 s (median of 5, bench/zero_comm.py, bench/results/zero_comm_vit_b_fp32.json), and
DeepSpeed's `allgather_partitions: false` does not change it (the key is read into the config
and used nowhere). In the engine step it is most of the optimizer phase (2.16 -> 0.96 s with
broadcasts, bench/results/engine_step_vit_b_fp32_bcast.json).

So on gloo, and only while DeepSpeed's function is the one this was written against (same
name, same parameters), the ZeRO-1/2 optimizers call `gather_by_broadcast` instead. Both
write the owners' bytes unchanged into every rank's flat buffer: the parameters after a step are
the same bit for bit (tests/integration/test_gloo_gather.py). Elsewhere (NCCL, another
DeepSpeed) DeepSpeed's own gather runs and the start log says so.
"""
from __future__ import annotations

import inspect
import os

import torch.distributed as dist

# The modules that call DeepSpeed's gather by this name: ZeRO-1/2's optimizer, and the one
# DeepSpeed wraps ZeRO-1 with for bf16 weights with fp32 gradient accumulation.
CALLERS = ("deepspeed.runtime.zero.stage_1_and_2", "deepspeed.runtime.bf16_optimizer")
NAME = "all_gather_dp_groups"
PARAMETERS = ("groups_flat", "partitioned_param_groups", "dp_process_group", "start_alignment_factor",
              "allgather_bucket_size")

_original = {}  # caller module -> DeepSpeed's function it held before `install`


def gather_by_broadcast(groups_flat, partitioned_param_groups, dp_process_group, start_alignment_factor,
                        allgather_bucket_size) -> None:
    """DeepSpeed's `all_gather_dp_groups`, as one broadcast per owner: partition `owner` of a
    group is a view into that group's flat buffer, so broadcasting it from its owner fills the
    buffer on every rank. (The alignment and bucket size only shape DeepSpeed's fallback.) A group
    the ranks share (scaling/train/shared_params.py) is complete once every rank has written its
    partition: a barrier."""
    import deepspeed.comm as ds_dist  # DeepSpeed's wrapper, so its comms logger counts these

    from scaling.train.shared_params import is_shared

    for flat, partitions, group in zip(groups_flat, partitioned_param_groups, dp_process_group):
        if dist.get_world_size(group) == 1:
            continue
        if is_shared(flat):  # every rank wrote its partition into the same memory: wait for them all
            ds_dist.barrier(group=group)
            continue
        for owner, partition in enumerate(partitions):
            ds_dist.broadcast(partition, src=dist.get_global_rank(group, owner), group=group)


def deepspeed_gather_problem(module) -> str | None:
    """Why `module`'s gather is not the DeepSpeed function this replaces (None: it is)."""
    from deepspeed.runtime import utils

    fn = getattr(module, NAME, None)
    if fn is None:
        return f"{module.__name__} has no {NAME}"
    if fn is gather_by_broadcast:
        return None
    if fn is not getattr(utils, NAME, None):
        return f"{module.__name__}.{NAME} is not deepspeed.runtime.utils.{NAME}"
    params = tuple(inspect.signature(fn).parameters)
    if params != PARAMETERS:
        return f"{NAME} takes {params}, not {PARAMETERS}"
    return None


def install(backend: str) -> str:
    """Use `gather_by_broadcast` in ZeRO-1/2 when the process group's `backend` is gloo and
    DeepSpeed's gather is the expected one; otherwise leave DeepSpeed's. Returns a line for the
    start log."""
    import importlib

    if backend != "gloo":
        return f"ZeRO-1/2 gather parameters with DeepSpeed's all_gather_into_tensor ({backend})"
    modules = [importlib.import_module(name) for name in CALLERS]
    problems = [p for p in map(deepspeed_gather_problem, modules) if p]
    if problems:
        return f"ZeRO-1/2 gather parameters with DeepSpeed's own gather: {'; '.join(problems)}"
    for module in modules:
        if getattr(module, NAME) is not gather_by_broadcast:
            _original[module] = getattr(module, NAME)
            setattr(module, NAME, gather_by_broadcast)
    return ("ZeRO-1/2 gather parameters by one broadcast per owner (gloo: 3.5x faster than its "
            "all_gather_into_tensor, scaling/train/gloo_gather.py)")


def installed() -> bool:
    """Whether ZeRO-1/2 call `gather_by_broadcast` now."""
    import importlib

    return all(getattr(importlib.import_module(name), NAME, None) is gather_by_broadcast for name in CALLERS)


def uninstall() -> None:
    """Give DeepSpeed its own gather back (the bench's and the test's comparison arm)."""
    while _original:
        module, fn = _original.popitem()
        setattr(module, NAME, fn)


def install_for(engine) -> None:
    """`install` for a ZeRO-1/2 engine, the outcome printed once by rank 0."""
    if engine.zero_optimization_stage() not in (1, 2):
        return
    message = install(dist.get_backend())
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[scaling] {message}", flush=True)
