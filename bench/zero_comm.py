"""The collectives of one data-parallel step of a model of N fp32 parameters, alone, on local gloo ranks.

    python bench/zero_comm.py --params 86e6 --repeats 5 --out bench/results/zero_comm_vit_b_fp32.json

What each way of training moves once per step (bucketed as DeepSpeed buckets, --bucket elements):
  allreduce               torch DDP; also ZeRO-1/2's gradient reduction as DeepSpeed does it by
                          default (use_multi_rank_bucket_allreduce=true: the whole bucket is
                          all-reduced, each rank then keeps its own partition)
  reduce_to_owner         ZeRO-1/2 with use_multi_rank_bucket_allreduce=false: each partition of a
                          bucket is reduced onto the rank that owns it (half the bytes of an all-reduce)
  allgather               ZeRO-1/2 after the optimizer step: every rank gathers the updated
                          partitions of the others (ZeRO-3 does this in forward and again in backward)
  allgather_list, broadcast_from_owner   the same gather through gloo's other collectives
  allreduce_shm           the all-reduce through DeepSpeed's shared-memory kernel for ranks on one
                          node (torch.ops.deepspeed.inference_all_reduce_, the `deepspeed_shm_comm`
                          op its CPU accelerator builds), bucket by bucket
The patterns run interleaved (A, B, C, A, B, C, ...) in one launch, so that load from other work
on the machine falls on all of them alike; the load averages go into the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PATTERNS = ("allreduce", "allreduce_shm", "reduce_to_owner", "allgather", "allgather_list", "broadcast_from_owner")


def buckets(n: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(size, n - start)) for start in range(0, n, size)]


def run_pattern(name: str, flat, part_size: int, bucket: int) -> None:
    """One step's worth of `name` over the flat fp32 buffer `flat` (world x part_size elements)."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    if name == "allreduce":
        for start, numel in buckets(flat.numel(), bucket):
            dist.all_reduce(flat.narrow(0, start, numel))
    elif name == "allreduce_shm":
        import torch

        for start, numel in buckets(flat.numel(), bucket):
            torch.ops.deepspeed.inference_all_reduce_(flat.narrow(0, start, numel))
    elif name == "reduce_to_owner":
        for start, numel in buckets(flat.numel(), bucket):
            for owner in range(world):  # the slice of this bucket inside `owner`'s partition
                lo, hi = max(start, owner * part_size), min(start + numel, (owner + 1) * part_size)
                if hi > lo:
                    dist.reduce(flat.narrow(0, lo, hi - lo), dst=owner)
    elif name == "allgather":  # what DeepSpeed's all_gather_dp_groups calls where the backend has it
        dist.all_gather_into_tensor(flat, flat.narrow(0, rank * part_size, part_size))
    elif name == "allgather_list":
        dist.all_gather(list(flat.split(part_size)), flat.narrow(0, rank * part_size, part_size).clone())
    else:
        for owner in range(world):
            dist.broadcast(flat.narrow(0, owner * part_size, part_size), src=owner)


def worker(args) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    # DeepSpeed maps its shared-memory all-reduce buffers only when LOCAL_SIZE (its launcher's
    # name for torchrun's LOCAL_WORLD_SIZE) says that every rank is on this node.
    os.environ.setdefault("LOCAL_SIZE", os.environ["LOCAL_WORLD_SIZE"])
    deepspeed.init_distributed("gloo")
    world = dist.get_world_size()
    part = int(args.params) // world
    flat = torch.randn(part * world)
    seconds = {p: [] for p in PATTERNS}
    for repeat in range(args.repeats + 1):  # the first round warms the connections up, unrecorded
        for p in PATTERNS:
            dist.barrier()
            t0 = time.perf_counter()
            run_pattern(p, flat, part, int(args.bucket))
            dist.barrier()
            if repeat:
                seconds[p].append(time.perf_counter() - t0)
    if dist.get_rank() == 0:
        Path(args.result).write_text(json.dumps({"seconds": seconds, "load_avg": os.getloadavg()}))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--params", type=float, default=86e6, help="fp32 elements (ViT-B pre-training model: ~86e6)")
    p.add_argument("--bucket", type=float, default=5e7, help="elements per bucket (ds_configs: reduce_bucket_size)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    from scaling.launch import free_port

    result = Path(args.out or "/tmp/zero_comm.json").with_suffix(".worker.json")
    load_before = os.getloadavg()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.ranks}",
                    f"--master-port={free_port()}", __file__, "--worker", "--result", str(result),
                    "--params", str(args.params), "--bucket", str(args.bucket), "--repeats", str(args.repeats)],
                   check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    measured = json.loads(result.read_text())
    result.unlink()
    summary = {p: statistics.median(s) for p, s in measured["seconds"].items()}
    for pattern, s in summary.items():
        print(f"{pattern:<18}{s:8.3f} s (median of {args.repeats})")
    ddp = summary["allreduce"]
    print(f"per step: DDP {ddp:.3f} s; ZeRO-1/2 default {ddp + summary['allgather']:.3f} s; "
          f"reduce_to_owner {summary['reduce_to_owner'] + summary['allgather']:.3f} s")
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": vars(args), "median_s": summary, **measured,
                                              "load_avg_before": load_before}, indent=1))


if __name__ == "__main__":
    main()
