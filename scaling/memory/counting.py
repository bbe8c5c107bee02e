"""Measuring primitives: FLOPs per module, bytes autograd saves for backward, step time.

Each works on real tensors and on meta tensors (`meta_counting`), so a ViT-g step can be
counted without computing it. They only observe: none changes what the measured code does.

    flops = count_flops(lambda: model(x))              # {"total": ..., "modules": {...}}
    split = step_flops(lambda: model(x).sum())         # {"forward": ..., "backward": ...}
    saved = saved_tensor_bytes(lambda: model(x), exclude=model.parameters())
    timing = time_step(lambda: model(x).sum().backward(), repeats=3)
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _cpu_flash_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# FlopCounterMode knows the CUDA attention kernels but not the CPU flash kernel that SDPA
# picks on CPU (torch 2.14); without these the attention matmuls would count as zero there.
CPU_ATTENTION_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward_flop,
}


def flop_counter() -> FlopCounterMode:
    """A silent FlopCounterMode that also counts CPU fused attention. Use it as a context
    manager around forward or backward, then read it with `flop_summary`."""
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)


def flop_summary(counter: FlopCounterMode) -> dict:
    """{"total": FLOPs, "modules": {module path: FLOPs}, "ops": {aten op: FLOPs}}.

    Module paths are FlopCounterMode's: the top module's class name, then attribute names,
    e.g. "VideoMAEPretrain.decoder.blocks.0"; each entry holds its whole subtree. A multiply-
    accumulate is 2 FLOPs. Only matmuls, convolutions and attention are counted (norms,
    activations and softmax are not), which is how MAC tables are usually made.
    """
    counts = counter.get_flop_counts()
    ops = {str(op): int(n) for op, n in counts.get("Global", {}).items()}
    modules = {name: int(sum(per_op.values())) for name, per_op in counts.items() if name != "Global"}
    return {"total": int(counter.get_total_flops()), "modules": modules, "ops": ops}


def count_flops(fn: Callable[[], Any]) -> dict:
    """FLOPs of everything `fn()` runs (forward, backward, or both), as `flop_summary` gives."""
    with flop_counter() as counter:
        fn()
    return flop_summary(counter)


def step_flops(forward: Callable[[], torch.Tensor]) -> dict:
    """FLOPs of one training step, split: {"forward": summary, "backward": summary}.

    `forward()` returns a scalar loss; it is run and backpropagated under one counter, because
    FlopCounterMode can only attribute backward FLOPs to modules whose forward it watched.
    Backward includes what activation checkpointing recomputes.
    """
    with flop_counter() as counter:
        loss = forward()
        fwd = flop_summary(counter)
        loss.backward()
        both = flop_summary(counter)
    return {"forward": fwd, "backward": _difference(both, fwd)}


def _difference(after: dict, before: dict) -> dict:
    return {
        "total": after["total"] - before["total"],
        "modules": {k: v - before["modules"].get(k, 0) for k, v in after["modules"].items() if v != before["modules"].get(k, 0)},
        "ops": {k: v - before["ops"].get(k, 0) for k, v in after["ops"].items() if v != before["ops"].get(k, 0)},
    }


def _storage_key(t: torch.Tensor) -> int:
    # The address of the StorageImpl: shared by every view of one tensor, and unlike
    # data_ptr it is distinct for meta tensors (which all have data_ptr 0).
    return t.untyped_storage()._cdata


class SavedTensors:
    """Context manager that records every tensor autograd saves for backward while active.

    `bytes` counts each storage once (views and tensors saved by several ops share one),
    whole storage size (a saved view keeps its whole storage alive), and skips the storages of
    `exclude` (parameters and buffers live anyway; only extra memory is of interest). Tensors
    saved inside activation-checkpointed regions are dropped by the checkpoint, so only what
    it really keeps (the block inputs) is seen here.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._excluded = {_storage_key(t) for t in exclude}
        self._storages: dict[int, torch.UntypedStorage] = {}
        self._hooks = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in self._excluded:
            # Holding the storage keeps its address from being reused by another tensor.
            self._storages.setdefault(key, t.untyped_storage())
        return t

    def __enter__(self) -> SavedTensors:
        # Entering again adds to the same count (e.g. a forward split over several calls).
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(s.nbytes() for s in self._storages.values())

    @property
    def count(self) -> int:
        return len(self._storages)


def saved_tensor_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the unique storages autograd saves for backward while `fn()` runs (usually a
    forward pass), not counting the storages of `exclude` (e.g. `model.parameters()`)."""
    with SavedTensors(exclude) as saved:
        fn()
    return saved.bytes


class meta_counting:
    """Context manager that lets a model on the meta device run forward and backward for counting.

    Two things differ from real tensors, and both are fixed here:
    - SDPA on meta always takes the math path, which saves the N x N attention matrix; the
      real CPU and GPU kernels save only q, k, v, the output and a log-sum-exp. While active,
      `F.scaled_dot_product_attention` on meta tensors runs the CPU flash kernel (it has a meta
      implementation), so FLOPs and saved bytes match a real step. It is patched on the module
      rather than caught by a TorchFunctionMode because activation checkpointing recomputes
      blocks in backward, where such a mode is no longer active.
    - Masks stay real CPU tensors, because the model turns them into index lists with data-
      dependent sizes; an op that mixes such a CPU tensor with a meta tensor gets the CPU
      tensor moved to meta (shapes are all that matter there).
    """

    def __enter__(self) -> meta_counting:
        self._sdpa = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = _meta_aware_sdpa(self._sdpa)
        self._mode = _MixCpuIntoMeta()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        F.scaled_dot_product_attention = self._sdpa


def _meta_aware_sdpa(real_sdpa):
    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if not q.is_meta:
            return real_sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        if attn_mask is not None or enable_gqa:
            raise NotImplementedError("meta counting supports plain SDPA only (no attention mask, no GQA)")
        out, _ = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, scale=scale)
        return out

    return sdpa


class _MixCpuIntoMeta(TorchFunctionMode):
    """Moves CPU tensor operands to meta when an op also has meta ones.

    A moved tensor keeps its storage size, strides and offset, and tensors sharing a CPU
    storage share one meta storage, so what autograd saves from them counts as on a real run
    (an expanded index stays one small storage, not a full-size copy).
    """

    def __init__(self):
        super().__init__()
        self._meta_of: dict[tuple, tuple[torch.UntypedStorage, torch.Tensor]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = _flat_tensors((args, kwargs))
        if any(t.is_meta for t in tensors) and any(_movable(t) for t in tensors):
            args, kwargs = tree_map(self._to_meta, (args, kwargs))
        return func(*args, **kwargs)

    def _to_meta(self, a):
        if not isinstance(a, torch.Tensor) or not _movable(a):
            return a
        storage = a.untyped_storage()
        key = (_storage_key(a), a.dtype)
        if key not in self._meta_of:
            # Holding the CPU storage keeps its address from being reused while mapped.
            base = torch.empty(storage.nbytes() // a.element_size(), dtype=a.dtype, device="meta")
            self._meta_of[key] = (storage, base)
        base = self._meta_of[key][1]
        return base.as_strided(a.size(), a.stride(), a.storage_offset())


def _movable(t: torch.Tensor) -> bool:
    # 0-dim CPU tensors already mix with any device.
    return t.device.type == "cpu" and t.dim() > 0


def _flat_tensors(tree) -> list[torch.Tensor]:
    found = []
    tree_map(lambda a: found.append(a) if isinstance(a, torch.Tensor) else None, tree)
    return found


def time_step(step: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> dict:
    """Wall time of `step()`: {"median_s", "times_s", "warmup": n}. The warm-up calls are not
    timed (first calls allocate and pick kernels); CUDA is synchronized around each call."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "times_s": times, "warmup": warmup}


def cuda_peak_bytes(step: Callable[[], Any]) -> int | None:
    """Peak CUDA memory allocated while `step()` runs (everything live, parameters included),
    or None without a GPU."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())
