"""ZeRO-1/2's flat parameter groups in one memory mapping shared by the CPU ranks of a machine.

After each optimizer step a ZeRO-1/2 rank has updated the partition it owns of every flat
parameter group, and every rank needs all partitions before the next forward: DeepSpeed
all-gathers them, on gloo by one broadcast per owner (scaling/train/gloo_gather.py), 0.12-0.14 s
of a 4.5 s ViT-B step on 2 CPU ranks where torch DDP, which steps the whole model on every
rank, gathers nothing (bench/engine_step.py). When every rank of the data-parallel group runs on
this machine, the groups can live in one shared mapping instead (an anonymous memfd, so nothing
is left behind in /dev/shm and its size limit does not apply): each rank writes the partition it
owns into it during its step, and the gather becomes a barrier. The machine also holds the
model's weights once instead of once per rank. (The fp32 master weights stay each rank's own:
made views of the shared weights, they would save the whole group into every rank's optimizer
checkpoint, torch.save writing a view's whole storage.)

Why no rank reads a partition while its owner writes it: an owner writes only inside its
optimizer step, which starts after the step's last gradient all-reduce, so after every rank
finished its backward; every rank then waits at the gather's barrier before its next forward.
(Loading a checkpoint writes the same bytes on every rank.) The parameters after each step
equal DeepSpeed's own path bit for bit (tests/integration/test_gloo_gather.py).

Installed only for DeepSpeed's ZeRO-1/2 optimizer without CPU offload, on gloo, with the
broadcast gather in place (which turns into the barrier), and where every rank of the group
maps the memory; elsewhere DeepSpeed's own buffers stay and the start log says why.
"""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

# Set on a flat group that lives in shared memory (on the tensor itself, so that it goes with its
# engine): gloo_gather waits at a barrier for such a group instead of gathering it.
MARK = "_scaling_shared_by_ranks"


def machine() -> str:
    """This machine's identity: its host name and the kernel's boot id."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f"{socket.gethostname()}/{f.read().strip()}"
    except OSError:
        return socket.gethostname()


def problem(optimizer) -> str | None:
    """Why `optimizer`'s flat groups cannot be shared this way (None: they can). Collective: every
    rank of the group calls it."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from scaling.train import gloo_gather

    if type(optimizer) is not DeepSpeedZeroOptimizer:
        return f"the ZeRO optimizer is {type(optimizer).__name__}"
    if optimizer.cpu_offload:
        return "the optimizer is offloaded"
    groups = {id(g): g for g in optimizer.real_dp_process_group}.values()
    if any(dist.get_backend(g) != "gloo" for g in groups):
        return "the backend is not gloo"
    if all(dist.get_world_size(g) == 1 for g in groups):
        return "one rank: there is nothing to gather"
    if not gloo_gather.installed():
        return "DeepSpeed's own gather runs (see the line above)"
    for group in groups:
        machines = [None] * dist.get_world_size(group)
        dist.all_gather_object(machines, machine(), group=group)
        if len(set(machines)) > 1:
            return f"the data-parallel ranks run on {len(set(machines))} machines"
    return None


def shared_empty(numel: int, dtype: torch.dtype, group) -> torch.Tensor | None:
    """A tensor mapped by every rank of `group` onto the same memory (a memfd the group's first
    rank makes and the others open through /proc), or None on every rank if any rank could not."""
    first = dist.get_global_rank(group, 0)
    fd, where = None, [None]
    if dist.get_rank(group) == 0:
        try:
            fd = os.memfd_create("scaling-zero-params")
            os.ftruncate(fd, numel * dtype.itemsize)
            where = [f"/proc/{os.getpid()}/fd/{fd}"]
        except OSError as e:
            where = [f"!{e}"]
    dist.broadcast_object_list(where, src=first, group=group)
    tensor = None
    if not where[0].startswith("!"):
        try:
            tensor = torch.from_file(where[0], shared=True, size=numel, dtype=dtype)
        except RuntimeError:
            tensor = None
    mapped = torch.tensor([1 if tensor is not None else 0])
    dist.all_reduce(mapped, op=dist.ReduceOp.MIN, group=group)  # everyone has mapped it (or someone failed)
    if fd is not None:
        os.close(fd)  # the mappings keep the memory; it goes with the last of them
    return tensor if mapped.item() else None


def rehome(optimizer, i: int, flat: torch.Tensor) -> None:
    """Move flat group `i` of a ZeRO-1/2 optimizer into `flat` (same size and dtype, already holding
    the weights): the model's weights and the partitions become views of it. Call
    `optimizer._link_all_hp_params()` after the last: DeepSpeed's links from weights to master
    weights hold views of the weights."""
    optimizer.bit16_groups_flat[i] = flat
    optimizer._update_model_bit16_weights(i)
    optimizer.parallel_partitioned_bit16_groups[i] = optimizer.get_data_parallel_partitions(flat, i)


def install_for(engine) -> None:
    """Share a ZeRO-1/2 engine's flat parameter groups among the ranks of this machine where
    `problem` finds nothing against it; rank 0 prints the outcome."""
    if engine.zero_optimization_stage() not in (1, 2):
        return
    optimizer = engine.optimizer
    why_not = problem(optimizer)
    for i, flat in enumerate(optimizer.bit16_groups_flat if why_not is None else ()):
        group = optimizer.real_dp_process_group[i]
        shared = shared_empty(flat.numel(), flat.dtype, group)
        if shared is None:
            why_not = "this machine would not map shared memory for them"
            uninstall(engine)  # the groups shared before this one
            break
        if dist.get_rank(group) == 0:
            shared.copy_(flat)  # every rank holds the same weights now
        dist.barrier(group=group)
        setattr(shared, MARK, True)
        rehome(optimizer, i, shared)
    if why_not is None:
        optimizer._link_all_hp_params()
    if int(os.environ.get("RANK", "0")) == 0:
        print("[scaling] ZeRO-1/2 weights in memory shared by this machine's ranks: the gather after each step is a "
              "barrier" if why_not is None else f"[scaling] ZeRO-1/2 weights in each rank's own memory: {why_not}",
              flush=True)


def is_shared(flat: torch.Tensor) -> bool:
    return getattr(flat, MARK, False)


def uninstall(engine) -> None:
    """Each rank's own copy of the weights again (the bench's and the test's comparison arm)."""
    optimizer = engine.optimizer
    shared = [i for i, flat in enumerate(getattr(optimizer, "bit16_groups_flat", ())) if is_shared(flat)]
    for i in shared:
        rehome(optimizer, i, optimizer.bit16_groups_flat[i].clone())
    if shared:
        optimizer._link_all_hp_params()
