"""ZeRO-1/2's gradient partitions written into buffers kept from step to step (CPU ranks).

DeepSpeed's ZeRO-1/2 put a rank's reduced gradients into two partition-sized tensors per step,
each new: during backward the contiguous copy of the gradients it owns (`grads_in_partition`,
dropped at the end of backward and made again at the next), and in the optimizer step their
flattening into the fp32 gradient the optimizer steps with (freed after the step). On the GPU
the caching allocator hands back the same memory; on the CPU a tensor that large is a fresh
mapping each time, whose pages the kernel faults in and zeroes on first write: for ViT-B's
43 M-element partition (fp32, 2 ranks) the flatten takes 0.091 s into new memory and 0.016 s
into a kept buffer (one thread, torch.cat of 300 k-element views,
`python bench/flatten_buffer.py --numel 43e6`, bench/results/flatten_buffer.json).

`KeptGradPartition` keeps both:
- DeepSpeed's flatten, while its optimizer step runs, gets a buffer kept per (size, dtype)
  instead of a new tensor. The groups are flattened one after another and each one's flat
  gradient is dropped after its update, so a buffer is never read after the next flatten into
  it. Outside the step (loading a checkpoint) DeepSpeed's flatten runs as is.
- The contiguous partition DeepSpeed drops at the end of backward is handed back to it after the
  next optimizer step, when nothing reads it any more (the step has consumed the gradients;
  between the micro-steps of gradient accumulation it still holds the sums, so DeepSpeed makes a
  new one there as before). Every element DeepSpeed reads from it is written first.
Both hold the same bytes DeepSpeed's new tensors would.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from scaling.train.zero12_install import install_where_possible


class KeptGradPartition:
    """Stands in for `optimizer.flatten` (while `optimizer.step` runs), `optimizer.step` (after
    which it hands the partition back) and `optimizer._release_ipg_buffers` (which drops it)."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.own_flatten = optimizer.flatten
        self.own_step = optimizer.step
        self.own_release = optimizer._release_ipg_buffers
        self.buffers: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self.released = None  # the contiguous gradient partition DeepSpeed let go of last
        self.stepping = False
        optimizer.flatten = self.flatten
        optimizer.step = self.step
        optimizer._release_ipg_buffers = self.release

    def step(self, *args, **kwargs):
        self.stepping = True
        try:
            return self.own_step(*args, **kwargs)
        finally:
            self.stepping = False
            self.give_back_partition()

    def release(self) -> None:
        """DeepSpeed's end of backward, which drops its contiguous gradient partition: keep it."""
        if self.optimizer.grads_in_partition is not None:
            self.released = self.optimizer.grads_in_partition
        self.own_release()

    def give_back_partition(self) -> None:
        """After a step: the partition DeepSpeed dropped, for the next backward to write into, once
        no gradient list of DeepSpeed's still refers to it."""
        o = self.optimizer
        in_use = any(v is not None for v in (*o.averaged_gradients.values(), *o.all_grad_tensors.values()))
        if self.released is not None and o.grads_in_partition is None and not in_use:
            o.grads_in_partition, o.grads_in_partition_offset = self.released, 0
        self.released = None

    def flatten(self, tensors):
        if not self.stepping or not tensors:
            return self.own_flatten(tensors)
        key = (sum(t.numel() for t in tensors), tensors[0].dtype)
        if any(t.dtype != key[1] or t.device != tensors[0].device for t in tensors):
            return self.own_flatten(tensors)
        out = self.buffers.get(key)
        if out is None or out.device != tensors[0].device:
            out = self.buffers[key] = torch.empty(key[0], dtype=key[1], device=tensors[0].device)
        return torch.cat([t.reshape(-1) for t in tensors], out=out)


def problem(optimizer) -> str | None:
    """Why `optimizer`'s gradient partitions cannot be kept this way (None: they can)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    from torch._utils import _flatten_dense_tensors

    if type(optimizer) is not DeepSpeedZeroOptimizer:
        return f"the ZeRO optimizer is {type(optimizer).__name__}"
    if dist.get_backend(optimizer.dp_process_group) != "gloo":
        return "GPU ranks: the caching allocator reuses the memory already"
    if optimizer.cpu_offload:
        return "the optimizer is offloaded (its gradient partition is kept already)"
    if getattr(optimizer, "flatten", None) is not _flatten_dense_tensors:
        return "DeepSpeed's flatten is not torch's _flatten_dense_tensors"
    missing = [a for a in ("grads_in_partition", "grads_in_partition_offset", "averaged_gradients", "all_grad_tensors",
                           "_release_ipg_buffers") if not hasattr(optimizer, a)]
    if missing:
        return f"DeepSpeed's ZeRO optimizer has no {', '.join(missing)}"
    return None


def install_for(engine) -> None:
    """Keep a ZeRO-1/2 engine's gradient partitions between steps where `problem` finds nothing
    against it."""
    install_where_possible(engine, problem, KeptGradPartition,
                           "ZeRO-1/2 keep their gradient partitions in buffers between steps",
                           "ZeRO-1/2 put their gradient partitions in new memory each step")


def uninstall(engine) -> None:
    """DeepSpeed's own flatten and partition handling back (the bench's and the test's comparison arm)."""
    kept = getattr(vars(engine.optimizer).get("step"), "__self__", None)
    if isinstance(kept, KeptGradPartition):
        engine.optimizer.flatten = kept.own_flatten  # DeepSpeed's instance attribute, as it was
        del engine.optimizer.step
        del engine.optimizer._release_ipg_buffers
