"""The pre-training loop: one rank's view, top to bottom.

Exact resume: everything random in a step is a pure function of (seed, step, micro-step,
rank) — masks, drop path and the data stream position (the loader skips what was consumed) —
so a run resumed from a checkpoint sees the same clips and masks as an uninterrupted one.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from scaling.config import RunConfig, data_sources, micro_batch
from scaling.data.transforms import normalize_video
from scaling.losses import masked_reconstruction_loss, normalized_pixel_target
from scaling.masking import make_masks
from scaling.models.pretrain import build_pretrain_model
from scaling.precision import input_dtype
from scaling.tracking import closes_runs_on_error
from scaling.train.engine import build_model, clips_per_step, initialize, peak_lr
from scaling.train.guard import DivergenceGuard
from scaling.train.run import (
    client_state,
    close_run,
    ds_config_for,
    end_of_step,
    init_ranks,
    log_step,
    resume_and_track,
    step_seed,
    summed,
)
from scaling.train.signals import StopRequest
from scaling.train.step_metrics import StepMetrics


def masks_for_rank(cfg: RunConfig, grid, step: int, micro: int, rank: int, clips_per_rank: int, world: int):
    """Masks for the global micro-batch, sliced to this rank: the same clip gets the same mask
    whatever the number of ranks."""
    g = torch.Generator().manual_seed(step_seed(cfg.train.seed, step, micro))
    k = cfg.mask
    enc, dec = make_masks(clips_per_rank * world, grid, k.encoder, k.encoder_ratio, k.decoder, k.decoder_ratio, g)
    rows = slice(rank * clips_per_rank, (rank + 1) * clips_per_rank)
    return enc[rows], dec[rows]


def epoch_of(cfg: RunConfig, step: int) -> int:
    return step // cfg.train.steps_per_epoch if cfg.train.steps_per_epoch else 0


def make_batches(cfg: RunConfig, rank: int, world: int, start_step: int):
    """(batch iterator, callable returning the loader's counters: clips, bad samples, per source)."""
    micro = micro_batch(cfg, world)
    m, d = cfg.model, cfg.data
    if d.source == "noise":
        from scaling.data.noise import noise_batches

        return noise_batches(seed=cfg.train.seed, rank=rank, clips_per_rank=micro * d.num_sample,
                             grad_accum=cfg.train.grad_accum, num_frames=m.num_frames, input_size=m.input_size,
                             start_step=start_step), dict
    from scaling.data.stream import build_pretrain_loader

    loader = build_pretrain_loader(
        sources=data_sources(cfg), videos_per_batch=micro, num_frames=m.num_frames, input_size=m.input_size,
        num_sample=d.num_sample, num_workers=d.num_workers, seed=cfg.train.seed, rank=rank, world_size=world,
        skip_batches=start_step * cfg.train.grad_accum,
        normalize=False,  # uint8 out of the workers: 4x less shared memory to hand over (bench/data.py)
    )
    batches = ({"video": normalize_video(b["video"])} for b in loader)  # same values as normalizing in the workers
    return batches, lambda: loader.stats


@closes_runs_on_error  # a run that raises ends FAILED in MLflow, not RUNNING or FINISHED
def run_pretrain(cfg: RunConfig) -> list[float]:
    """Train until `train.steps` (or `max_steps_this_run` more steps); returns this run's losses."""
    rank, world = init_ranks()
    out = Path(cfg.train.output_dir)
    ds_config, resume_tag = ds_config_for(cfg, rank, world)
    m = cfg.model
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank and every run
    model = build_model(lambda: build_pretrain_model(m.name, m.num_frames, m.input_size, m.drop_path), ds_config)
    model.set_grad_checkpointing(m.activation_checkpointing)
    grid, patch, tubelet = model.grid, model.size.patch, model.size.tubelet
    engine, scheduler = initialize(model, cfg, ds_config)
    perf = StepMetrics(cfg, rank, world)  # FLOPs per step, device peak; times steps and data wait

    state, tracker = resume_and_track(engine, scheduler, cfg, rank, ds_config, {
        "world_size": world, "micro_batch": micro_batch(cfg, world), "peak_lr": peak_lr(cfg),
        "clips_per_step": clips_per_step(cfg), **perf.params()}, resume_tag)
    start = state.get("step", 0)
    if rank == 0:
        print(f"[scaling] {'resuming at step ' + str(start) if start else 'starting'}: {m.name}, {world} ranks, "
              f"{clips_per_step(cfg)} clips/step, MLflow run {tracker.run_id}", flush=True)

    end = cfg.train.steps
    if cfg.train.max_steps_this_run:
        end = min(end, start + cfg.train.max_steps_this_run)
    perf.set_range(start, end, cfg.train.steps)
    clips_per_rank = micro_batch(cfg, world) * cfg.data.num_sample
    batches, data_stats = make_batches(cfg, rank, world, start)
    dtype = input_dtype(cfg.train.precision)
    stop = StopRequest(out, rank)
    guard = DivergenceGuard(cfg.train.max_nonfinite_steps, cfg.train.precision, start)
    losses = []
    for step in range(start, end):
        perf.step_started()
        torch.manual_seed(step_seed(cfg.train.seed, step, rank=rank + 1))  # drop path
        lr = scheduler.get_last_lr()[0]  # the lr this step's update uses
        step_loss = torch.zeros(())
        for micro in range(cfg.train.grad_accum):
            with perf.waiting_for_data():
                video = next(batches)["video"]  # (B, 3, T, H, W) normalized, float32
            enc, dec = masks_for_rank(cfg, grid, step, micro, rank, clips_per_rank, world)  # (B, N) bool
            target = normalized_pixel_target(video, patch, tubelet)  # (B, N, 2*p*p*3) float32
            prediction = engine(video.to(dtype), enc, dec)  # (B, N_dec, 2*p*p*3)
            loss = guard.inject(masked_reconstruction_loss(prediction, target, enc, dec), step)
            engine.backward(loss)  # DeepSpeed divides by grad_accum
            guard.optimizer_step(engine, step)  # optimizer + scheduler only at the accumulation boundary
            step_loss += loss.detach().float() / cfg.train.grad_accum
        dist.all_reduce(step_loss)
        step_loss = step_loss.item() / world
        finite = guard.check(engine, step, step_loss)  # DeepSpeed did not apply it if not
        losses.append(step_loss)
        perf.step_ended()
        logging = (step + 1) % cfg.train.log_every == 0
        # Loader counters (decoded videos, skipped bad samples, per-source draws), all ranks summed.
        counters = summed(data_stats()) if logging else {}
        figures = perf.collect(step + 1) if logging else {}  # throughput, MFU, data wait, memory, ETA
        if rank == 0 and logging:
            grad_norm = engine.get_global_grad_norm()
            metrics = {"loss": step_loss, "train/skipped_steps": guard.skipped, "lr": lr, **figures,
                       **({"grad_norm": float(grad_norm)} if grad_norm is not None else {}),
                       **{f"data/{k}": v for k, v in counters.items()}}
            log_step(tracker, out, step + 1, cfg.train.steps, metrics, perf.line(step + 1, metrics))
        state = client_state(step + 1, tracker, cfg.train.seed, epoch=epoch_of(cfg, step + 1),
                             micro_batches_consumed=(step + 1) * cfg.train.grad_accum)
        if end_of_step(engine, cfg, guard, stop, tracker, rank, step + 1, end, finite, step_loss, state):
            break
    if not stop.stopped_at and end == cfg.train.steps:
        from scaling.use.visualize import log_reconstruction_figure

        log_reconstruction_figure(engine, cfg, tracker, rank, end)  # original / masked / reconstruction PNG
    close_run(tracker, stop, rank)
    return losses


