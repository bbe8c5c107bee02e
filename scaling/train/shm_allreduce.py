"""DeepSpeed's all-reduces through its shared-memory kernel when every rank is on this one CPU node.

ZeRO-1/2 reduce the gradients bucket by bucket with `deepspeed.comm.all_reduce`, which on CPU
ranks is gloo's all-reduce over loopback TCP. DeepSpeed also builds, for its CPU accelerator, a
shared-memory all-reduce (the `deepspeed_shm_comm` op, `torch.ops.deepspeed.inference_all_reduce_`),
but maps its buffers only when `LOCAL_SIZE` (set by DeepSpeed's own launcher, not by torchrun)
says that all ranks are local, and calls it only from its inference kernels. For ViT-B's 86 M
fp32 gradients in DeepSpeed's 5e7-element buckets on 2 local ranks it takes 0.18 s where gloo
takes 0.31 s (median of 3, bench/zero_comm.py).

So `announce_local_ranks` sets `LOCAL_SIZE` from torchrun's `LOCAL_WORLD_SIZE` before DeepSpeed
starts its backend, and `install` routes DeepSpeed's blocking SUM all-reduces of whole-world CPU
tensors through the shared-memory kernel; anything else (async, another op, a subgroup, a dtype
the CPU's vector units cannot reduce there) goes to gloo as before. The kernel sums the ranks'
buffers in rank order; with 2 ranks that is the one sum gloo computes (a + b == b + a in IEEE
arithmetic), so the parameters after a step are the same bit for bit
(tests/integration/test_gloo_gather.py); with more ranks the order, and so the last bits, may
differ. Elsewhere (NCCL, ranks on several nodes, another DeepSpeed) DeepSpeed's own all-reduce
runs and the start log says so.
"""
from __future__ import annotations

import inspect
import os

import torch
import torch.distributed as dist

PARAMETERS = ("self", "tensor", "op", "group", "async_op")  # DeepSpeed 0.19's TorchBackend.all_reduce
# Lowest vector level of the kernel per dtype (its fp32 sum needs AVX2, bf16/fp16 AVX-512BW).
KERNEL_LEVEL = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 2}

INSTALLED = "ZeRO-1/2 reduce gradients through DeepSpeed's shared-memory all-reduce (all ranks on this node)"
_original = {}  # the DeepSpeed backend -> its own all_reduce, while ours is installed
calls = {"shm": 0}  # all-reduces the kernel has done in this process (the test's evidence)


def announce_local_ranks() -> None:
    """Tell DeepSpeed (before `deepspeed.init_distributed`) that all ranks are on this node when
    torchrun says so, as its own launcher does: it then maps the shared-memory buffers."""
    local, world = os.environ.get("LOCAL_WORLD_SIZE"), os.environ.get("WORLD_SIZE")
    if local and local == world:
        os.environ.setdefault("LOCAL_SIZE", local)


def undecorated(fn, name: str, depth: int = 3):
    """The function called `name` inside DeepSpeed's decorators around `fn` (they keep it only in
    their closures, without functools.wraps); `fn` itself if there is none within `depth` levels."""
    if fn.__name__ == name or depth == 0:
        return fn
    for cell in fn.__closure__ or ():
        inner = cell.cell_contents
        if inspect.isfunction(inner) and inner is not fn:
            found = undecorated(inner, name, depth - 1)
            if found.__name__ == name:
                return found
    return fn


def backend_problem(backend) -> str | None:
    """Why DeepSpeed's communication backend `backend` cannot all-reduce through shared memory
    here (None: it can)."""
    world = dist.get_world_size()
    if dist.get_backend() != "gloo":
        return f"the process group's backend is {dist.get_backend()}, not gloo"
    if getattr(backend, "shm_comm_op", None) is None:
        return "DeepSpeed's shm_comm op is not built"
    if os.environ.get("LOCAL_SIZE") != str(world):
        return f"not all {world} ranks are on this node (LOCAL_SIZE={os.environ.get('LOCAL_SIZE')})"
    if getattr(backend, "shm_vector_kernel_level", 0) < 1:
        return "this CPU lacks AVX2, which the kernel's fp32 sum needs"
    if not hasattr(torch.ops.deepspeed, "inference_all_reduce_"):
        return "torch.ops.deepspeed.inference_all_reduce_ is not registered"
    return signature_problem(type(backend))


def signature_problem(backend_type) -> str | None:
    """Why `backend_type.all_reduce` is not the one this stands in for (None: it is)."""
    params = tuple(inspect.signature(undecorated(backend_type.all_reduce, "all_reduce")).parameters)
    if params != PARAMETERS:
        return f"DeepSpeed's all_reduce takes {params}, not {PARAMETERS}"
    return None


def install() -> str:
    """Route DeepSpeed's all-reduces through shared memory where `backend_problem` finds none;
    returns a line for the start log."""
    from deepspeed.comm import comm

    backend = comm.cdb
    if backend in _original:
        return INSTALLED
    problem = backend_problem(backend)
    if problem:
        return f"ZeRO-1/2 reduce gradients with gloo's all-reduce: {problem}"
    own = backend.all_reduce
    level = backend.shm_vector_kernel_level

    def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if (async_op or backend._reduce_op(op) != dist.ReduceOp.SUM or tensor.device.type != "cpu"
                or not tensor.is_contiguous() or KERNEL_LEVEL.get(tensor.dtype, 99) > level
                or dist.get_world_size(group) != dist.get_world_size()):
            return own(tensor, op, group, async_op)
        torch.ops.deepspeed.inference_all_reduce_(tensor)  # sums over every rank, in place
        calls["shm"] += 1
        return None

    _original[backend] = own
    backend.all_reduce = all_reduce
    return INSTALLED


def uninstall() -> None:
    """Give DeepSpeed its gloo all-reduce back (the bench's and the test's comparison arm)."""
    while _original:
        backend, own = _original.popitem()
        backend.all_reduce = own


def install_for(engine) -> None:
    """`install` for a ZeRO-1/2 engine, the outcome printed once by rank 0."""
    if engine.zero_optimization_stage() not in (1, 2):
        return
    message = install()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[scaling] {message}", flush=True)
