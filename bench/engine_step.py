"""Seconds per optimizer step through our DeepSpeed engine, next to plain torch DDP, on local ranks.

    python bench/engine_step.py --model vit_b --arms ddp,ddp_compiled,zero1,zero2,zero3,auto_compiled \
        --rounds 2 --steps 2 --out bench/results/engine_step_vit_b.json

Each arm is one `torchrun --nproc-per-node RANKS` launch of this file (`--worker`); the arms run
interleaved (A, B, C, A, B, C, ...) so that load from other work on the machine falls on all of
them alike, and the load averages go into the JSON. Every arm trains the same pre-training model
(`scaling.models.pretrain`) from the same seed on the same I/O-free clips (`data.source=noise`),
the same masks, normalized-pixel target and loss as `scaling pretrain`, with the same per-rank
batch.

Arms:
  ddp, ddp_compiled         torch DistributedDataParallel + torch AdamW (the plain data-parallel
                            baseline; `_compiled`: torch.compile of the DDP-wrapped model), with the
                            reference's step: its training loop takes the gradient norm before every
                            optimizer step (clip_grad_norm_ with optim.clip_grad, else its
                            get_grad_norm_), as DeepSpeed's does; `_nonorm` leaves it out
  zero1, zero2, zero3, auto our engine (`scaling.train.engine`, as `scaling pretrain` builds it) at
                            that ZeRO stage (`auto`: train.zero_stage=auto)
  suffix _compiled          train.compile=true;  suffix _ckpt: activation checkpointing
  suffix _dsgather          ZeRO-1/2 gather the updated partitions after the step with DeepSpeed's
                            all_gather_into_tensor, as before scaling/train/gloo_gather.py (which the
                            engine installs on gloo: one broadcast per owner, 3.5x faster there,
                            bench/zero_comm.py)
  suffix _nooverlap         ZeRO-1/2 reduce each gradient bucket inside backward, as DeepSpeed does on
                            CPU, instead of asynchronously while backward goes on
                            (scaling/train/overlap_reduce.py, which the engine installs on gloo)
  suffix _inflightN         ZeRO-1/2's overlapped reduction keeps at most N gradient buckets in flight
                            (default OverlappedReduction.IN_FLIGHT; 1 = only DeepSpeed's two buffers)
  suffix _newgrad           ZeRO-1/2 put their gradient partitions (the contiguous copy in backward,
                            the flattened one in the step) in new memory in every step, as DeepSpeed
                            does, instead of buffers kept between steps
                            (scaling/train/grad_partition_buffer.py, which the engine installs on gloo)
  suffix _noshare           ZeRO-1/2 keep each rank's own copy of the weights and gather them after the
                            step, instead of sharing one copy among the machine's ranks and waiting
                            at a barrier (scaling/train/shared_params.py, which the engine installs
                            on gloo)
  :key=value[:key=value]    DeepSpeed `zero_optimization` settings over the JSON's, e.g.
                            zero1:use_multi_rank_bucket_allreduce=false (values are JSON)

Compiled arms share one Inductor cache (--compile-cache) across launches, as a resumed run
reuses the one beside its checkpoints: only the first launch of an arm compiles from zero.
`--profile` adds torch.profiler's busiest ops (self CPU time) of rank 0's last step per launch.

Each engine step is timed by phase, as the training loop runs it (scaling/train/pretrain.py):
data (next clip batch), inputs (masks + target), forward (+ loss), backward (engine.backward:
autograd and, for ZeRO-1/2, the gradient reduction it triggers), optimizer (engine.step), rest
(the loop's per-step loss all-reduce and the divergence check). `comm_s` per phase is the time
DeepSpeed's comms logger measured in its collectives during that phase; it sees only the launch
of ZeRO-3's gathers (issued with async_op=True), so `zero_parts_median_s` adds, per phase, the
wall time inside the DeepSpeed functions that do ZeRO's communication (`time_zero_internals`).
`cpu_s` is rank 0's CPU time over the step (all its threads, gloo's included): the work an arm
does, which other load on a shared machine disturbs far less than wall time. The first
`--warmup` steps of each launch (compilation, ZeRO-3's trace) are reported apart.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = ("data", "inputs", "forward", "backward", "optimizer", "rest")


# ---------------------------------------------------------------- one rank

def run_config(args, arm: str, out_dir: str):
    from scaling.config import load_config

    stage = arm.split(":")[0].split("_")[0]
    overrides = [f"model.name={args.model}", "data.source=noise", f"train.precision={args.precision}",
                 f"train.global_batch={args.videos_per_rank * args.ranks}", f"data.num_sample={args.num_sample}",
                 f"train.steps={args.warmup + args.steps}", "optim.warmup_steps=0", "tracking.enabled=false",
                 f"train.output_dir={out_dir}", f"model.activation_checkpointing={'_ckpt' in arm}",
                 f"train.zero_stage={'auto' if stage == 'auto' else stage.removeprefix('zero') if stage != 'ddp' else 1}",
                 f"train.compile={'_compiled' in arm}", f"train.ds_config={args.ds_config}"]
    return load_config(None, overrides)


class PhaseTimer:
    """Wall seconds per phase of one step, the collective time DeepSpeed's comms logger saw in
    it, and the wall seconds of the ZeRO internals `time_zero_internals` times (PARTS) in it."""

    def __init__(self):
        self.seconds, self.comm, self.parts = {}, {}, {}

    @contextmanager
    def __call__(self, name: str):
        comm0, parts0, t0 = comm_seconds(), dict(PARTS), time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        self.comm[name] = self.comm.get(name, 0.0) + comm_seconds() - comm0
        for part, s in PARTS.items():
            if s > parts0.get(part, 0.0):
                in_phase = self.parts.setdefault(name, {})
                in_phase[part] = in_phase.get(part, 0.0) + s - parts0.get(part, 0.0)


# Wall seconds spent so far in the ZeRO internals below, per part. The comms logger cannot see
# ZeRO-3's gathers (issued with async_op=True, it times only their launch), so the bench times
# the DeepSpeed functions that issue and wait for them.
PARTS: dict[str, float] = {}


def timed(owner, attr: str, part: str) -> None:
    """Count the wall seconds of every call of `owner.attr` into PARTS[part]."""
    fn = getattr(owner, attr)

    @functools.wraps(fn)
    def timed_call(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            PARTS[part] = PARTS.get(part, 0.0) + time.perf_counter() - t0

    setattr(owner, attr, timed_call)


def time_zero_internals(stage: int) -> None:
    """ZeRO-3: param_fetch (gather the weights a module needs, wait for them, launch the
    prefetch of the next ones), param_release (free them after the module), grad_reduce (the
    bucketed reduce-scatter of gradients). ZeRO-1/2: grad_reduce (the bucket reduction) and
    param_gather (the gather of the updated partitions after the optimizer step); with the
    overlapped reduction (scaling/train/overlap_reduce.py) grad_reduce counts starting a bucket's
    all-reduce and waiting for the one before, backward_epilogue the end of backward, which waits
    for the last bucket."""
    if stage == 3:
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

        timed(PartitionedParameterCoordinator, "fetch_sub_module", "param_fetch")
        timed(PartitionedParameterCoordinator, "release_sub_module", "param_release")
        timed(DeepSpeedZeroOptimizer_Stage3, "_DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads",
              "grad_reduce")
    else:
        import deepspeed.runtime.zero.stage_1_and_2 as zero_1_2

        timed(zero_1_2.DeepSpeedZeroOptimizer, "reduce_ipg_grads", "grad_reduce")
        timed(zero_1_2, "all_gather_dp_groups", "param_gather")


def comm_seconds() -> float:
    """Total latency (s) of the collectives DeepSpeed's comms logger has recorded so far. Each
    record holds its op's timer read without reset, i.e. running totals (ms): the largest is the total."""
    from deepspeed.comm.comm import comms_logger

    return sum(max(max(r[1]) for r in sizes.values()) for sizes in comms_logger.comms_dict.values()) / 1000


def zero_overrides(arm: str) -> dict:
    """`zero1:overlap_comm=false:reduce_bucket_size=2e8` -> {"overlap_comm": False, "reduce_bucket_size": 2e8}."""
    pairs = (kv.split("=", 1) for kv in arm.split(":")[1:])
    return {k: json.loads(v) for k, v in pairs}


def engine_arm(cfg, rank: int, world: int, arm: str):
    """Our engine, built as `scaling pretrain` builds it; returns step(step_index) -> PhaseTimer."""
    import torch
    import torch.distributed as dist

    from scaling.config import micro_batch
    from scaling.losses import masked_reconstruction_loss, normalized_pixel_target
    from scaling.models.pretrain import build_pretrain_model
    from scaling.precision import input_dtype
    from scaling.train.engine import build_ds_config, build_model, initialize
    from scaling.train.guard import DivergenceGuard
    from scaling.train.pretrain import make_batches, masks_for_rank
    from scaling.train.run import step_seed

    ds_config = build_ds_config(cfg, world)
    ds_config["zero_optimization"].update(zero_overrides(arm))
    ds_config["comms_logger"] = {"enabled": True, "prof_all": True, "verbose": False}
    m = cfg.model
    torch.manual_seed(cfg.train.seed)
    model = build_model(lambda: build_pretrain_model(m.name, m.num_frames, m.input_size, m.drop_path), ds_config)
    model.set_grad_checkpointing(m.activation_checkpointing)
    engine, _ = initialize(model, cfg, ds_config)
    if "_dsgather" in arm:
        from scaling.train import gloo_gather

        gloo_gather.uninstall()
    if "_nooverlap" in arm:
        from scaling.train import overlap_reduce

        overlap_reduce.uninstall(engine)
    if "_inflight" in arm:
        reduction = engine.optimizer.average_tensor.__self__  # the OverlappedReduction installed
        reduction.IN_FLIGHT = int(arm.split("_inflight")[1].split("_")[0].split(":")[0])
    if "_newgrad" in arm:
        from scaling.train import grad_partition_buffer

        grad_partition_buffer.uninstall(engine)
    if "_noshare" in arm:
        from scaling.train import shared_params

        shared_params.uninstall(engine)
    time_zero_internals(ds_config["zero_optimization"]["stage"])
    if "reduce_ipg_grads" in vars(engine.optimizer):  # overlapped: time the instance's own entry points
        timed(engine.optimizer, "reduce_ipg_grads", "grad_reduce")
        timed(engine.optimizer, "independent_gradient_partition_epilogue", "backward_epilogue")
    grid, patch, tubelet = model.grid, model.size.patch, model.size.tubelet
    clips_per_rank = micro_batch(cfg, world) * cfg.data.num_sample
    batches, _ = make_batches(cfg, rank, world, 0)
    dtype = input_dtype(cfg.train.precision)
    guard = DivergenceGuard(cfg.train.max_nonfinite_steps, cfg.train.precision, 0)

    def step(i: int) -> PhaseTimer:
        T = PhaseTimer()
        torch.manual_seed(step_seed(cfg.train.seed, i, rank=rank + 1))
        with T("data"):
            video = next(batches)["video"]  # (B, 3, T, H, W)
        with T("inputs"):
            enc, dec = masks_for_rank(cfg, grid, i, 0, rank, clips_per_rank, world)
            target = normalized_pixel_target(video, patch, tubelet)
        with T("forward"):
            loss = masked_reconstruction_loss(engine(video.to(dtype), enc, dec), target, enc, dec)
        with T("backward"):
            engine.backward(loss)
        with T("optimizer"):
            guard.optimizer_step(engine, i)
        with T("rest"):
            step_loss = loss.detach().float()
            dist.all_reduce(step_loss)
            guard.check(engine, i, step_loss.item() / world)
        T.loss = step_loss.item() / world
        return T

    return step


def ddp_arm(cfg, rank: int, world: int, arm: str):
    """Plain torch DDP of the same model, AdamW with the same groups and lr, the reference's
    gradient norm before each step (unless `_nonorm`); same step otherwise."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from scaling.config import micro_batch
    from scaling.losses import masked_reconstruction_loss, normalized_pixel_target
    from scaling.models.pretrain import build_pretrain_model
    from scaling.precision import input_dtype
    from scaling.train.engine import param_groups, peak_lr
    from scaling.train.offload_optimizer import build_optimizer
    from scaling.train.pretrain import make_batches, masks_for_rank
    from scaling.train.run import step_seed

    m = cfg.model
    torch.manual_seed(cfg.train.seed)
    model = build_pretrain_model(m.name, m.num_frames, m.input_size, m.drop_path)
    model.set_grad_checkpointing(m.activation_checkpointing)
    grid, patch, tubelet = model.grid, model.size.patch, model.size.tubelet
    optimizer = build_optimizer(param_groups(model, cfg.optim.weight_decay), peak_lr(cfg), cfg.optim.betas,
                                "torch", {})  # as the engine builds it without offload
    net = DistributedDataParallel(model)
    if "_compiled" in arm:
        net = torch.compile(net)
    params = [p for p in model.parameters() if p.requires_grad]
    clips_per_rank = micro_batch(cfg, world) * cfg.data.num_sample
    batches, _ = make_batches(cfg, rank, world, 0)
    dtype = input_dtype(cfg.train.precision)

    def step(i: int) -> PhaseTimer:
        T = PhaseTimer()
        torch.manual_seed(step_seed(cfg.train.seed, i, rank=rank + 1))
        with T("data"):
            video = next(batches)["video"]
        with T("inputs"):
            enc, dec = masks_for_rank(cfg, grid, i, 0, rank, clips_per_rank, world)
            target = normalized_pixel_target(video, patch, tubelet)
        with T("forward"):
            loss = masked_reconstruction_loss(net(video.to(dtype), enc, dec), target, enc, dec)
        with T("backward"):
            loss.backward()  # DDP's bucketed all-reduce runs inside
        with T("optimizer"):
            if cfg.optim.clip_grad:
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad)
            elif "_nonorm" not in arm:  # the reference's get_grad_norm_ (logged as grad_norm)
                torch.norm(torch.stack([torch.norm(p.grad.detach(), 2) for p in params]), 2)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        with T("rest"):
            step_loss = loss.detach().float()
            dist.all_reduce(step_loss)
            step_loss.item()
        T.loss = step_loss.item() / world
        return T

    return step


def worker(args) -> None:
    import torch

    from scaling.train.run import init_ranks

    rank, world = init_ranks()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = run_config(args, args.arm, tmp)
        t0 = time.perf_counter()
        if args.arm.startswith("ddp"):
            step = ddp_arm(cfg, rank, world, args.arm)
        else:
            step = engine_arm(cfg, rank, world, args.arm)
        build_s = time.perf_counter() - t0
        records, busiest = [], []
        for i in range(args.warmup + args.steps):
            last = i == args.warmup + args.steps - 1
            with torch.profiler.profile() if args.profile and last else contextlib.nullcontext() as prof:
                t0, cpu0 = time.perf_counter(), time.process_time()
                T = step(i)
                step_s, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
            records.append({"step_s": step_s, "cpu_s": cpu_s, "phases": T.seconds, "comm_s": T.comm, "parts_s": T.parts, "loss": T.loss,
                            "warmup": i < args.warmup, "profiled": bool(args.profile and last)})
            if prof is not None:
                busiest = busiest_ops(prof)
    cpu_per_rank = [None] * world  # the other ranks' CPU seconds per step: which rank waits for which
    torch.distributed.all_gather_object(cpu_per_rank, [r["cpu_s"] for r in records])
    if rank == 0:
        Path(args.result).write_text(json.dumps({"arm": args.arm, "build_s": build_s, "threads": torch.get_num_threads(),
                                                 "cpu_s_per_rank": cpu_per_rank,
                                                 "load_avg": os.getloadavg(), "records": records,
                                                 "busiest_ops": busiest}))
    torch.distributed.destroy_process_group()  # gloo's worker threads stopped before the interpreter goes


def busiest_ops(prof, top: int = 15) -> list[dict]:
    """The ops with the most self CPU time in a profiled step (name, calls, seconds)."""
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key, "calls": e.count, "self_s": e.self_cpu_time_total / 1e6} for e in rows]


# ---------------------------------------------------------------- the driver

def launch(args, arm: str, result: Path) -> dict:
    from scaling.launch import free_port

    cmd = ["torchrun", f"--nproc-per-node={args.ranks}", f"--master-port={free_port()}", __file__, "--worker",
           "--arm", arm, "--result", str(result), *worker_flags(args)]
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS=str(args.threads), TORCHINDUCTOR_CACHE_DIR=args.compile_cache)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", *cmd[1:]], env=env, cwd=REPO,
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"arm {arm} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return {**json.loads(result.read_text()), "launch_s": time.perf_counter() - t0}


def worker_flags(args) -> list[str]:
    return ["--model", args.model, "--precision", args.precision, "--ranks", str(args.ranks),
            "--videos-per-rank", str(args.videos_per_rank), "--num-sample", str(args.num_sample),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--ds-config", args.ds_config,
            *(["--profile"] if args.profile else [])]


def summarize(runs: dict[str, list[dict]]) -> dict:
    out = {}
    for arm, launches in runs.items():
        steps = [r for launch_ in launches for r in launch_["records"] if not r["warmup"] and not r.get("profiled")]
        median = statistics.median(r["step_s"] for r in steps)
        phases = {p: statistics.median(r["phases"].get(p, 0.0) for r in steps) for p in PHASES}
        comm = {p: statistics.median(r["comm_s"].get(p, 0.0) for r in steps) for p in PHASES}
        parts = {p: {k: statistics.median(r.get("parts_s", {}).get(p, {}).get(k, 0.0) for r in steps)
                     for k in {k for r in steps for k in r.get("parts_s", {}).get(p, {})}} for p in PHASES}
        model = phases["forward"] + phases["backward"] - comm["backward"]
        out[arm] = {"median_step_s": median, "min_step_s": min(r["step_s"] for r in steps),
                    "median_cpu_s": statistics.median(r.get("cpu_s", 0.0) for r in steps),
                    "steps_s": [r["step_s"] for r in steps], "phases_median_s": phases, "comm_median_s": comm,
                    "zero_parts_median_s": {p: v for p, v in parts.items() if v},
                    "outside_fwd_bwd_share": 1 - model / median,
                    "warmup_s": [r["step_s"] for launch_ in launches for r in launch_["records"] if r["warmup"]],
                    "build_s": [launch_["build_s"] for launch_ in launches], "loss_first": steps[0]["loss"],
                    "threads_per_rank": launches[0]["threads"]}
    for arm, s in out.items():  # ZeRO overhead: engine step over the plain-DDP step, compiled vs compiled
        base = "ddp_compiled" if "_compiled" in arm else "ddp"
        if not arm.startswith("ddp") and base in out:
            s["over_ddp"] = s["median_step_s"] / out[base]["median_step_s"]
            s["over_ddp_cpu"] = s["median_cpu_s"] / max(out[base]["median_cpu_s"], 1e-9)
            s["over_ddp_by_round"] = [statistics.median(r["step_s"] for r in a["records"] if not r["warmup"])
                                      / statistics.median(r["step_s"] for r in b["records"] if not r["warmup"])
                                      for a, b in zip(runs[arm], runs[base])]
    return out


def table(summary: dict) -> str:
    lines = [f"{'arm':<44}{'step s':>8}{'min s':>8}{'cpu s':>8}" + "".join(f"{p:>10}" for p in PHASES)
             + f"{'comm s':>8}{'outside':>9}{'/ddp':>7}"]
    for arm, s in summary.items():
        lines.append(f"{arm:<44}{s['median_step_s']:8.2f}{s['min_step_s']:8.2f}{s['median_cpu_s']:8.2f}"
                     + "".join(f"{s['phases_median_s'][p]:10.2f}" for p in PHASES)
                     + f"{sum(s['comm_median_s'].values()):8.2f}{s['outside_fwd_bwd_share']:9.0%}"
                     + (f"{s['over_ddp']:7.2f}" if "over_ddp" in s else f"{'-':>7}"))
    for arm, s in summary.items():  # the timed ZeRO internals, per phase
        if s.get("zero_parts_median_s"):
            lines.append(f"{arm}: " + "; ".join(f"{phase} " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(parts.items()))
                                              for phase, parts in s["zero_parts_median_s"].items()))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--arm", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--arms", default="ddp,zero1,zero2,zero3", help="comma-separated, see the module doc")
    p.add_argument("--model", default="vit_b")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="OMP threads per rank")
    p.add_argument("--videos-per-rank", type=int, default=1)
    p.add_argument("--num-sample", type=int, default=2, help="clips per video")
    p.add_argument("--steps", type=int, default=2, help="measured steps per launch")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured first steps per launch")
    p.add_argument("--rounds", type=int, default=2, help="launches per arm, interleaved")
    p.add_argument("--ds-config", default="ds_configs/zero3_bf16.json")
    p.add_argument("--compile-cache", default=str(Path(tempfile.gettempdir()) / "engine_step_inductor_cache"),
                   help="Inductor's cache, shared by all launches")
    p.add_argument("--profile", action="store_true", help="torch.profiler on rank 0's last step of each launch")
    p.add_argument("--out", default="")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    arms = args.arms.split(",")
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for arm in arms:
                runs[arm].append(launch(args, arm, Path(tmp) / f"{arm}_{r}.json"))
                print(f"round {r} {arm}: {[round(x['step_s'], 2) for x in runs[arm][-1]['records']]} "
                      f"{runs[arm][-1]['busiest_ops'][:6]} "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
    summary = summarize(runs)
    print(table(summary))
    result = {"settings": {k: v for k, v in vars(args).items() if k not in ("worker", "arm", "result")},
              "load_avg_before_after": [load_before, os.getloadavg()], "wall_s": time.perf_counter() - t0,
              "summary": summary, "launches": runs}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
