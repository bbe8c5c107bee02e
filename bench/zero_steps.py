"""One rank of a measured pre-training run: the project's own ZeRO set-up and step, plus RSS.

    torchrun --nproc-per-node 2 bench/zero_steps.py --out DIR --config pipelines/pretrain_smoke.yaml \
        model.name=vit_b data.source=noise train.steps=2 ...

Builds the model, DeepSpeed config and optimizer with `scaling.train.engine` exactly as
`scaling pretrain` does, and runs the same micro-step (masks, normalized-pixel target,
forward, loss, backward, step). It leaves out what `scaling pretrain` adds around it:
MLflow, resume and the checkpoint saved after the last step — that save swaps a ViT-g's
NVMe-offloaded optimizer states back into memory, and the bench wants the step's peak.

Each rank writes DIR/rank<r>.json: the high-water RSS (`ru_maxrss`) after each phase, so the
model states, the first step (when Adam's moments appear) and later steps can be told apart.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path


def peak_rss() -> int:
    """High-water resident set of this process in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    phases = {}

    def mark(name: str) -> None:
        phases[name] = {"peak_rss": peak_rss(), "rss": current_rss(), "t": time.perf_counter()}

    import torch
    import torch.distributed as dist

    from scaling.config import load_config, micro_batch, validate
    from scaling.data.noise import noise_batches
    from scaling.losses import masked_reconstruction_loss, normalized_pixel_target
    from scaling.models.pretrain import build_pretrain_model
    from scaling.precision import input_dtype
    from scaling.train.engine import build_ds_config, build_model, initialize
    from scaling.train.pretrain import masks_for_rank, step_seed
    from scaling.train.run import init_ranks

    rank, world = init_ranks()
    # An idle rank: framework imported, process group up, no model yet. Everything above this
    # line is the same for every model size; the planner predicts what comes after it.
    dist.barrier()
    mark("baseline")

    cfg = load_config(args.config, args.overrides)
    validate(cfg, world)
    if cfg.data.source != "noise":
        raise SystemExit("bench/zero_steps.py runs on data.source=noise only (no loader memory in the measurement)")
    ds_config = build_ds_config(cfg, world)
    m, t = cfg.model, cfg.train
    torch.manual_seed(t.seed)
    model = build_model(lambda: build_pretrain_model(m.name, m.num_frames, m.input_size, m.drop_path), ds_config)
    model.set_grad_checkpointing(m.activation_checkpointing)
    grid, patch, tubelet = model.grid, model.size.patch, model.size.tubelet
    mark("model_built")
    engine, _ = initialize(model, cfg, ds_config)
    mark("engine_ready")

    clips_per_rank = micro_batch(cfg, world) * cfg.data.num_sample
    batches = noise_batches(seed=t.seed, rank=rank, clips_per_rank=clips_per_rank, grad_accum=t.grad_accum,
                            num_frames=m.num_frames, input_size=m.input_size)
    dtype = input_dtype(t.precision)
    steps = []
    for step in range(t.steps):
        dist.barrier()  # both ranks start the step together: step time is the slower rank's
        t0 = time.perf_counter()
        torch.manual_seed(step_seed(t.seed, step, rank=rank + 1))
        loss_sum = 0.0
        for micro in range(t.grad_accum):
            video = next(batches)["video"]  # (B, 3, T, H, W) float32
            enc, dec = masks_for_rank(cfg, grid, step, micro, rank, clips_per_rank, world)
            target = normalized_pixel_target(video, patch, tubelet)
            loss = masked_reconstruction_loss(engine(video.to(dtype), enc, dec), target, enc, dec)
            engine.backward(loss)
            engine.step()
            loss_sum += float(loss.detach()) / t.grad_accum
        dist.barrier()
        seconds = time.perf_counter() - t0
        mark(f"step_{step + 1}")
        steps.append({"step": step + 1, "seconds": seconds, "loss": loss_sum})
        if rank == 0:
            print(f"[zero_steps] step {step + 1}/{t.steps} loss {loss_sum:.4f} {seconds:.1f}s "
                  f"peak RSS {peak_rss() / 2**30:.2f} GiB", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"rank": rank, "world": world, "clips_per_rank": clips_per_rank, "steps": steps,
              # peak_rss/rss in bytes; s = seconds since the baseline mark
              "phases": {k: {"peak_rss": v["peak_rss"], "rss": v["rss"], "s": round(v["t"] - phases["baseline"]["t"], 1)}
                         for k, v in phases.items()},
              "ds_config": ds_config}
    (out / f"rank{rank}.json").write_text(json.dumps(record, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
