"""The offloaded optimizer step: torch AdamW against DeepSpeed's CPU Adam, on 2 local ranks.

    .venv/bin/python bench/offload_optimizer.py --rounds 3 --out bench/results/offload_optimizer.json

Two parts, each with its arms interleaved (A, B, C, A, B, C, ...) so that load from other work
on the machine falls on all arms alike; the load averages go into the JSON.

step    The optimizer step alone, as ZeRO-3 with an offloaded optimizer runs it: each rank owns
        1/ranks of the ViT-B pre-training model's parameters (94.2 M) as flat fp32 tensors of
        at most `sub_group_size` elements and steps them one sub-group at a time. Arms: torch
        AdamW fused, torch AdamW foreach, DeepSpeedCPUAdam. Both ranks step together (a
        barrier before each arm), so they share the memory bandwidth as in a real run. From
        the same parameters, gradients and states, every arm must give the same update (max
        difference recorded).
engine  One step of our engine (scaling.train.engine, as `scaling pretrain` builds it) on the
        ViT-B pre-training model, ZeRO-3 + bf16, optimizer offloaded to CPU or to NVMe swap
        files (ds_configs/zero3_nvme_offload.json; a copy with the device and a fresh folder),
        with optim.offload_adam=torch or deepspeed. The clip is 4 frames at 128 px so that
        forward and backward stay short; the parameter count, and so the optimizer's work,
        does not depend on the clip. Times forward, backward and engine.step() (for NVMe: swap
        in, Adam, swap out, per sub-group) after one warm-up step.

ViT-g seconds per step are extrapolated linearly in the parameter count from ViT-B's (an
extrapolation: ViT-g was not run here).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VIT_B_PARAMS = 94_210_944  # the ViT-B pre-training model (encoder + decoder)
VIT_G_PARAMS = 1_026_300_000  # the ViT-g pre-training model (1026.3 M)
STEP_ARMS = ("torch_fused", "torch_foreach", "deepspeed")
ENGINE_ARMS = ("cpu_torch", "cpu_deepspeed", "nvme_torch", "nvme_deepspeed")


# ---------------------------------------------------------------- one rank: the optimizer step alone

def make_optimizer(arm: str, params: list, lr: float, betas: tuple[float, float], weight_decay: float):
    import torch

    if arm == "deepspeed":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=lr, betas=betas, weight_decay=weight_decay, adamw_mode=True)
    kind = {"fused": True} if arm == "torch_fused" else {"foreach": True}
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, **kind)


def step_by_sub_group(optimizer, sub_groups: list) -> None:
    """What ZeRO-3's offloaded step does (stage3.py `_optimizer_step`): the group holds one flat
    sub-group at a time."""
    group = optimizer.param_groups[0]
    for flat in sub_groups:
        group["params"] = [flat]
        optimizer.step()
    group["params"] = []


def worker_step(args) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = VIT_B_PARAMS // world
    sizes = [min(args.sub_group_size, per_rank - start) for start in range(0, per_rank, args.sub_group_size)]
    gen = torch.Generator().manual_seed(rank)
    start_params = [torch.randn(n, generator=gen) for n in sizes]
    grads = [torch.randn(n, generator=gen) * 1e-3 for n in sizes]
    arms = {}
    for arm in STEP_ARMS:
        flats = [p.clone().requires_grad_(True) for p in start_params]
        for flat, grad in zip(flats, grads):
            flat.grad = grad  # shared: no arm changes the gradient
        optimizer = make_optimizer(arm, flats[:1], lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
        arms[arm] = (optimizer, flats)
    del start_params
    seconds = {arm: [] for arm in STEP_ARMS}
    max_diff = {}
    for rnd in range(args.rounds + 1):  # round 0: warm-up (state allocation), and the equality check
        for arm, (optimizer, flats) in arms.items():
            dist.barrier()
            t0 = time.perf_counter()
            step_by_sub_group(optimizer, flats)
            dist.barrier()
            if rnd:
                seconds[arm].append(time.perf_counter() - t0)
        if rnd == 0:
            ref = arms["torch_fused"][1]
            max_diff = {arm: max(float((a - b).abs().max()) for a, b in zip(flats, ref)) for arm, (_, flats) in arms.items()}
    if rank == 0:
        Path(args.worker_out).write_text(json.dumps({
            "params_per_rank": per_rank, "sub_groups": sizes, "threads_per_rank": torch.get_num_threads(),
            "seconds": seconds, "max_abs_diff_after_one_step_vs_torch_fused": max_diff}))
    dist.destroy_process_group()


# ---------------------------------------------------------------- one rank: one engine step

def worker_engine(args) -> None:
    import torch
    import torch.distributed as dist

    from scaling.config import load_config, micro_batch, validate
    from scaling.data.noise import noise_batches
    from scaling.losses import masked_reconstruction_loss, normalized_pixel_target
    from scaling.models.pretrain import build_pretrain_model
    from scaling.precision import input_dtype
    from scaling.train.engine import build_ds_config, build_model, initialize
    from scaling.train.pretrain import masks_for_rank
    from scaling.train.run import init_ranks

    rank, world = init_ranks()
    offload, impl = args.arm.split("_")
    cfg = load_config(None, [
        "model.name=vit_b", "model.num_frames=4", "model.input_size=128", "data.source=noise", "data.num_sample=1",
        f"train.global_batch={world}", "train.precision=bf16", f"train.steps={1 + args.steps}", "optim.warmup_steps=0",
        "tracking.enabled=false", f"train.ds_config={args.ds_config}", f"optim.offload_adam={impl}"])
    validate(cfg, world)
    ds_config = build_ds_config(cfg, world)
    m = cfg.model
    torch.manual_seed(0)
    model = build_model(lambda: build_pretrain_model(m.name, m.num_frames, m.input_size), ds_config)
    engine, _ = initialize(model, cfg, ds_config)
    batches = noise_batches(seed=0, rank=rank, clips_per_rank=micro_batch(cfg, world), grad_accum=1,
                            num_frames=m.num_frames, input_size=m.input_size)
    rows = []
    for step in range(1 + args.steps):
        video = next(batches)["video"]
        enc, dec = masks_for_rank(cfg, model.grid, step, 0, rank, micro_batch(cfg, world), world)
        target = normalized_pixel_target(video, model.size.patch, model.size.tubelet)
        dist.barrier()
        t0 = time.perf_counter()
        loss = masked_reconstruction_loss(engine(video.to(input_dtype(cfg.train.precision)), enc, dec), target, enc, dec)
        t1 = time.perf_counter()
        engine.backward(loss)
        t2 = time.perf_counter()
        engine.step()
        t3 = time.perf_counter()
        dist.barrier()
        rows.append({"forward_s": t1 - t0, "backward_s": t2 - t1, "step_s": t3 - t2, "total_s": time.perf_counter() - t0,
                     "loss": float(loss)})
    if rank == 0:
        Path(args.worker_out).write_text(json.dumps({
            "optimizer": type(engine.optimizer.optimizer).__name__, "warmup": rows[0], "steps": rows[1:]}))
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------- the controller

def torchrun(args, worker: str, out: Path, extra: list[str], ranks: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
           str(29600 + os.getpid() % 300), __file__, "--worker", worker, "--worker-out", str(out), *extra]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // ranks)))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise SystemExit(f"{worker} worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


def offload_ds_config(device: str, tmp: Path) -> Path:
    """ds_configs/zero3_nvme_offload.json with the offload device set and a fresh swap folder."""
    ds = json.loads((REPO / "ds_configs" / "zero3_nvme_offload.json").read_text())
    offload = ds["zero_optimization"]["offload_optimizer"]
    offload["device"] = device
    offload["nvme_path"] = str(tmp / f"swap_{device}")
    path = tmp / f"offload_{device}.json"
    path.write_text(json.dumps(ds))
    return path


def summarize(samples: list[float]) -> dict:
    return {"median_s": round(statistics.median(samples), 4), "min_s": round(min(samples), 4),
            "samples_s": [round(s, 4) for s in samples]}


def run_step_part(args, tmp: Path) -> dict:
    raw = torchrun(args, "step", tmp / "step.json", ["--rounds", str(args.rounds), "--sub-group-size",
                                                    str(args.sub_group_size)], args.ranks)
    arms = {arm: summarize(s) for arm, s in raw["seconds"].items()}
    for row in arms.values():
        row["vit_g_extrapolated_s"] = round(row["median_s"] * VIT_G_PARAMS / VIT_B_PARAMS, 2)
    return {**{k: v for k, v in raw.items() if k != "seconds"}, "arms": arms}


def run_engine_part(args, tmp: Path) -> dict:
    configs = {device: offload_ds_config(device, tmp) for device in ("cpu", "nvme")}
    rows = {arm: [] for arm in args.engine_arms}
    optimizer_class, loadavg = {}, []
    for rnd in range(args.rounds):
        for arm in args.engine_arms:
            raw = torchrun(args, "engine", tmp / f"{arm}.json", ["--arm", arm, "--steps", str(args.engine_steps),
                                                                  "--ds-config", str(configs[arm.split('_')[0]])], args.ranks)
            optimizer_class[arm] = raw["optimizer"]
            rows[arm] += raw["steps"]
            loadavg.append(os.getloadavg())
            print(f"[offload_optimizer] round {rnd + 1} {arm}: engine.step "
                  f"{statistics.median(r['step_s'] for r in raw['steps']):.2f} s", flush=True)
    arms = {}
    for arm, steps in rows.items():
        arms[arm] = {"optimizer": optimizer_class[arm],
                     **{phase: summarize([r[f"{phase}_s"] for r in steps]) for phase in ("forward", "backward", "step", "total")},
                     "losses": [round(r["loss"], 6) for r in steps]}
        arms[arm]["step"]["vit_g_extrapolated_s"] = round(arms[arm]["step"]["median_s"] * VIT_G_PARAMS / VIT_B_PARAMS, 1)
    return {"arms": arms, "loadavg_after_each_launch": loadavg}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=("step", "engine"))
    ap.add_argument("--worker-out")
    ap.add_argument("--arm")
    ap.add_argument("--ds-config")
    ap.add_argument("--parts", default="step,engine")
    ap.add_argument("--engine-arms", default=",".join(ENGINE_ARMS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", "--engine-steps", dest="engine_steps", type=int, default=2)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--sub-group-size", type=int, default=25_000_000)  # ds_configs/zero3_nvme_offload.json's
    ap.add_argument("--out", default="bench/results/offload_optimizer.json")
    args = ap.parse_args()
    if args.worker == "step":
        worker_step(args)
        return 0
    if args.worker == "engine":
        args.steps = args.engine_steps
        worker_engine(args)
        return 0
    args.engine_arms = args.engine_arms.split(",")
    import torch

    started = time.perf_counter()
    result = {"command": " ".join([".venv/bin/python", "bench/offload_optimizer.py", *sys.argv[1:]]),
              "cpu": open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": \t"),
              "cores": os.cpu_count(), "ranks": args.ranks, "torch": torch.__version__,
              "loadavg_before": os.getloadavg(),
              "extrapolation": "ViT-g seconds = ViT-B median x 1026.3 M / 94.2 M parameters (linear; not measured on ViT-g)"}
    with tempfile.TemporaryDirectory(prefix="offload_optimizer_") as tmp:
        if "step" in args.parts:
            result["step"] = run_step_part(args, Path(tmp))
            print(json.dumps(result["step"]["arms"], indent=1), flush=True)
        if "engine" in args.parts:
            result["engine"] = run_engine_part(args, Path(tmp))
    result["loadavg_after"] = os.getloadavg()
    result["wall_s"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
