"""ZeRO-1/2's gradient buckets all-reduced while backward goes on, on CPU ranks (gloo).

DeepSpeed's ZeRO-1/2 reduce each full gradient bucket from inside backward (the hook of the
parameter that fills it). With `overlap_comm` it runs that reduction on a side CUDA stream; the
CPU accelerator has no streams, so on CPU ranks backward waits for every bucket's all-reduce and
its copies: 0.72 s of a 5.2 s ViT-B step on 2 ranks (bench/engine_step.py), where torch DDP,
which starts each bucket's all-reduce asynchronously and waits only when it needs the result,
pays 0.26 s for the same bytes.

`OverlappedReduction` gives ZeRO-1/2 what DDP does, inside DeepSpeed's own bucketing: the
bucket's all-reduce starts asynchronously (gloo works in its own threads while autograd goes on)
and is waited for once `IN_FLIGHT` buckets are reducing or at the end of backward; the copies of
this rank's partition out of the bucket (`copy_grads_in_partition`) wait with it. DeepSpeed
alternates two bucket buffers, which would allow one bucket in flight: each bucket that starts
reducing gives DeepSpeed a spare buffer for its slot and keeps its own until it is waited for.
The sums are gloo's, the average the same multiplication by 1/world DeepSpeed applies after its
all-reduce, the copies in the same order: the parameters after a step equal DeepSpeed's bit for
bit (tests/integration/test_gloo_gather.py).

Measured on a quiet machine (ViT-B fp32 compiled, 2 CPU ranks, bench/engine_step.py): backward
3.02 s instead of 3.23 s with one bucket in flight (the step over compiled DDP's 1.10 instead of
1.15, bench/results/engine_step_vit_b_fp32_overlap_quiet.json); with DDP's 25 MB buckets and 4
in flight, the reduction waits 0.46 s instead of 0.57 s per step and backward equals DDP's
(2.83 s, bench/results/engine_step_vit_b_fp32_cpu_zero12_quiet.json).

Installed only where the result is known to be the same: DeepSpeed's ZeRO-1/2 optimizer with
contiguous gradients, overlap_comm, plain averaging (no predivide factor, no sequence
parallelism), gradients reduced in their own dtype, no CPU offload, no MoE or ZenFlow, on gloo.
Elsewhere DeepSpeed's reduction runs and the start log says why.
"""
from __future__ import annotations

import collections

import torch
import torch.distributed as dist

from scaling.train.zero12_install import install_where_possible


class OverlappedReduction:
    """Stands in for `optimizer.average_tensor` (start the all-reduce), `copy_grads_in_partition`
    (after the wait) and `reduce_ipg_grads` (at the end of backward: wait for every bucket).

    DeepSpeed alternates two bucket buffers, so with them alone one bucket can be in flight
    while the next fills, and backward stops whenever gloo has not finished the previous bucket
    when the next is full. Instead, each bucket whose reduction starts hands DeepSpeed a spare
    buffer for its slot and keeps its own until its reduction is waited for: up to `IN_FLIGHT`
    buckets reduce at once (more than that waits for the oldest), as DDP keeps all of its
    buckets in flight."""

    IN_FLIGHT = 4

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.world = dist.get_world_size(optimizer.dp_process_group)
        self.pending = collections.deque()  # [work, bucket tensor, its buffer or None, [(param, group index)]]
        self.spares = []  # buffers of finished reductions, handed to DeepSpeed's next buckets
        self.own_copy = optimizer.copy_grads_in_partition
        self.own_reduce_ipg_grads = optimizer.reduce_ipg_grads
        self.own_epilogue = optimizer.independent_gradient_partition_epilogue
        self.ending = False
        optimizer.average_tensor = self.average_tensor
        optimizer.copy_grads_in_partition = self.copy_grads_in_partition
        optimizer.reduce_ipg_grads = self.reduce_ipg_grads
        optimizer.independent_gradient_partition_epilogue = self.epilogue

    def average_tensor(self, tensor, communication_data_type=None) -> None:
        if len(self.pending) >= self.IN_FLIGHT:
            self.finish_oldest()
        work = dist.all_reduce(tensor, group=self.optimizer.dp_process_group, async_op=True)
        buffer = None
        bucket = self.optimizer.ipg_buckets.get(communication_data_type)
        if bucket is not None and bucket.buffer and tensor.data_ptr() == bucket.buffer[bucket.index].data_ptr():
            # DeepSpeed would refill this buffer two buckets on: it gets a spare for the slot instead
            buffer = bucket.buffer[bucket.index]
            bucket.buffer[bucket.index] = self.spare_like(buffer)
        # (An oversized parameter's gradient is reduced in place: no buffer of DeepSpeed's to keep.)
        self.pending.append((work, tensor, buffer, []))

    def spare_like(self, buffer):
        while self.spares:
            spare = self.spares.pop()
            if spare.shape == buffer.shape and spare.dtype == buffer.dtype:
                return spare
        return torch.empty_like(buffer)

    def copy_grads_in_partition(self, param, group_idx=None) -> None:
        if not self.pending:
            return self.own_copy(param, group_idx)
        self.pending[-1][3].append((param, group_idx))

    def finish_oldest(self) -> None:
        """Wait for the oldest bucket in flight, average it, copy this rank's partition out of it."""
        work, tensor, buffer, copies = self.pending.popleft()
        work.wait()
        tensor.mul_(1.0 / self.world)  # DeepSpeed's post-scaling (gradient_reduction_w_predivide)
        for param, group_idx in copies:  # their gradients are views of `tensor`
            self.own_copy(param, group_idx)
        if buffer is not None:
            self.spares.append(buffer)

    def finish(self) -> None:
        while self.pending:
            self.finish_oldest()

    def reduce_ipg_grads(self, comm_dtype=None) -> None:
        self.own_reduce_ipg_grads(comm_dtype)
        if self.ending:
            self.finish()

    def epilogue(self) -> None:
        """DeepSpeed's end of backward, which reads the reduced gradients after reducing the last
        bucket: every bucket is waited for inside it."""
        self.ending = True
        try:
            self.own_epilogue()
        finally:
            self.ending = False


def problem(optimizer) -> str | None:
    """Why `optimizer`'s gradient reduction cannot overlap backward this way (None: it can)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if type(optimizer) is not DeepSpeedZeroOptimizer:
        return f"the ZeRO optimizer is {type(optimizer).__name__}"
    if dist.get_backend(optimizer.dp_process_group) != "gloo":
        return f"the backend is {dist.get_backend(optimizer.dp_process_group)}, whose streams DeepSpeed overlaps itself"
    needed = {"contiguous_gradients": True, "overlap_comm": True, "gradient_average": True,
              "postscale_gradients": True, "gradient_predivide_factor": 1.0, "sequence_parallel_size": 1,
              "cpu_offload": False, "zenflow": False, "use_grad_accum_attribute": False,
              "autoep_folding_tp_group": None}
    for attr, value in needed.items():
        if not hasattr(optimizer, attr) or getattr(optimizer, attr) != value:
            return f"{attr} is {getattr(optimizer, attr, 'absent')}, not {value}"
    if optimizer.has_moe_layers:
        return "the model has MoE layers"
    if any(optimizer._use_compact_grad_partition_buffer(i) for i in range(len(optimizer.bit16_groups))):
        return "gradients accumulate in another dtype than the parameters'"
    return None


def install_for(engine) -> None:
    """Overlap a ZeRO-1/2 engine's gradient reduction with backward where `problem` finds none."""
    install_where_possible(engine, problem, OverlappedReduction,
                           "ZeRO-1/2 all-reduce gradient buckets while backward goes on (gloo, async)",
                           "ZeRO-1/2 reduce gradients inside backward as DeepSpeed does")


def uninstall(engine) -> None:
    """DeepSpeed's own reduction back (the bench's and the test's comparison arm)."""
    for name in ("average_tensor", "copy_grads_in_partition", "reduce_ipg_grads",
                 "independent_gradient_partition_epilogue"):
        vars(engine.optimizer).pop(name, None)
