"""Supervised training (post-pre-training on K710, task fine-tuning), one rank's view.

Same engine, checkpointing and tracking as pre-training; what differs is the model (a
classifier started from the previous stage's weights), layer-wise lr decay, mixup/cutmix with
soft targets, a finite loader read once per epoch, and a multi-view evaluation at the end.

MAR (`mask.finetune: running_cell`): each clip drops half of its tokens before the encoder,
with a random start offset and slot order per clip; with `finetune.reconstruction_weight`
the pre-training decoder rebuilds the dropped tokens as an auxiliary loss.
"""
from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from scaling.config import RunConfig, data_sources, micro_batch
from scaling.data.finite import build_finetune_loader
from scaling.evaluate import evaluate
from scaling.losses import finetune_loss
from scaling.masking import finetune_drop_mask
from scaling.models.classify import VideoClassifier, build_classifier
from scaling.precision import input_dtype
from scaling.tracking import closes_runs_on_error
from scaling.train import run  # the run skeleton shared with pre-training
from scaling.train.engine import build_model, initialize, peak_lr, run_steps
from scaling.train.guard import DivergenceGuard
from scaling.train.init_weights import load_initial_weights
from scaling.train.param_groups import layer_decay_groups
from scaling.train.schedule import steps_per_epoch as epoch_length
from scaling.train.signals import StopRequest
from scaling.train.step_metrics import StepMetrics
from scaling.use.validation import Validation


def train_loader_for(cfg: RunConfig, rank: int, world: int):
    d, m, f = cfg.data, cfg.model, cfg.finetune
    return build_finetune_loader(
        sources=data_sources(cfg), videos_per_batch=micro_batch(cfg, world), num_frames=m.num_frames,
        input_size=m.input_size, num_sample=d.num_sample, num_workers=d.num_workers, seed=cfg.train.seed,
        rank=rank, world_size=world, train=True, rand_aug=f.rand_aug or None, reprob=f.reprob, sampling=d.sampling,
    )


def batches_from(loader, start_step: int, steps_per_epoch: int, grad_accum: int):
    """Endless micro-batches over epochs, starting inside the epoch of `start_step`.

    Each epoch gives exactly steps_per_epoch x grad_accum micro-batches (the epoch of
    scaling/train/schedule.py); the loader's batches past them are left unread, so no optimizer
    step straddles two epochs and a resumed run finds every step's batches where the
    uninterrupted run found them."""
    per_epoch = steps_per_epoch * grad_accum
    epoch = start_step // steps_per_epoch
    skip = (start_step % steps_per_epoch) * grad_accum
    while True:
        loader.set_epoch(epoch)
        loader.skip_batches = skip  # the loader skips without decoding
        yield from itertools.islice(iter(loader), per_epoch - skip)
        epoch, skip = epoch + 1, 0


def criterion_for(cfg: RunConfig):
    f = cfg.finetune
    if f.mixup > 0 or f.cutmix > 0:
        mixup = Mixup(mixup_alpha=f.mixup, cutmix_alpha=f.cutmix, label_smoothing=f.label_smoothing, num_classes=f.num_classes)
        return mixup, SoftTargetCrossEntropy()  # mixup already smooths the targets
    return None, LabelSmoothingCrossEntropy(f.label_smoothing) if f.label_smoothing else torch.nn.CrossEntropyLoss()


def classifier_for(cfg: RunConfig) -> VideoClassifier:
    """The stage's classifier: linear or bridging head, with the reconstruction branch when weighted."""
    m, f = cfg.model, cfg.finetune
    return build_classifier(m.name, f.num_classes, m.num_frames, m.input_size, m.drop_path, head=m.head,
                            head_drop=f.head_drop, reconstruction=f.reconstruction_weight > 0)


def drop_mask_for_rank(cfg: RunConfig, grid, step: int, micro: int, rank: int, rows: int, world: int):
    """Training drop masks (True = dropped) for the global micro-batch, sliced to this rank, so
    a clip's mask depends on (seed, step, micro-step, row) only; None without fine-tune masking."""
    k = cfg.mask
    if k.finetune == "none":
        return None
    g = torch.Generator().manual_seed(run.step_seed(cfg.train.seed, step, micro))
    mask = finetune_drop_mask(k.finetune, rows * world, grid, k.finetune_ratio, train=True, generator=g)
    return mask[rank * rows:(rank + 1) * rows]


@dataclass(frozen=True)
class SupervisedModel:
    """What a supervised stage trains, everything else in `run_finetune` being shared: how the
    model is built, started from `finetune.init_from` (returns the keys left at their init), and
    split into optimizer groups. The probe stage (scaling/train/probe.py) brings its own."""

    build: Callable[[RunConfig], torch.nn.Module]
    load: Callable[[torch.nn.Module, RunConfig], list[str]]
    groups: Callable[[torch.nn.Module, RunConfig], list[dict]]
    describe: Callable[[RunConfig], str]


def describe_classifier(cfg: RunConfig) -> str:
    f = cfg.finetune
    mar = (f", MAR {cfg.mask.finetune} {cfg.mask.finetune_ratio:g}" if cfg.mask.finetune != "none" else "") + \
          (f" + reconstruction x {f.reconstruction_weight:g}" if f.reconstruction_weight > 0 else "")
    return f"{cfg.model.name}, {cfg.model.head} head{mar}"


def load_classifier(model: VideoClassifier, cfg: RunConfig) -> list[str]:
    fresh = load_initial_weights(model, cfg.finetune.init_from, cfg.finetune.trust_checkpoint)
    if model.reconstruction is not None and dist.get_rank() == 0:
        no_decoder = any(k.startswith("reconstruction.") for k in fresh)
        source = "its init (no decoder in that checkpoint)" if no_decoder else "that checkpoint's decoder"
        print(f"[scaling] reconstruction branch starts from {source}", flush=True)
    return fresh


FINETUNE = SupervisedModel(
    build=lambda cfg: classifier_for(cfg), load=load_classifier, describe=describe_classifier,
    groups=lambda model, cfg: layer_decay_groups(model, cfg.optim.weight_decay, cfg.finetune.layer_decay, base_lr=peak_lr(cfg)))


@closes_runs_on_error  # a run that raises ends FAILED in MLflow, not RUNNING or FINISHED
def run_finetune(cfg: RunConfig, kind: SupervisedModel = FINETUNE) -> dict:
    """Train for `train.epochs` (or `train.steps`), evaluate on `finetune.val_shards`; returns eval metrics."""
    rank, world = run.init_ranks()
    out = Path(cfg.train.output_dir)
    ds_config, resume_tag = run.ds_config_for(cfg, rank, world)
    m, f, t = cfg.model, cfg.finetune, cfg.train

    torch.manual_seed(t.seed)
    model = build_model(lambda: kind.build(cfg), ds_config)
    grid = model.grid
    model.set_grad_checkpointing(m.activation_checkpointing)
    if f.init_from and resume_tag is None:
        # Before deepspeed.initialize: the optimizer's fp32 master copy is taken from these weights.
        kind.load(model, cfg)

    loader = train_loader_for(cfg, rank, world)
    steps_per_epoch = epoch_length(loader.num_samples, t.global_batch)
    if steps_per_epoch < 1:
        raise ValueError(f"the training shards hold {loader.num_samples} videos, fewer than one optimizer step of "
                         f"train.global_batch={t.global_batch}; lower train.global_batch or add videos")
    total, warmup = run_steps(cfg, steps_per_epoch)
    groups = kind.groups(model, cfg)
    engine, scheduler = initialize(model, cfg, ds_config, groups, total, warmup)
    validation = Validation(cfg, rank, world, steps_per_epoch)  # finetune.eval_every
    perf = StepMetrics(cfg, rank, world)  # FLOPs per step, device peak; times steps and data wait

    state, tracker = run.resume_and_track(engine, scheduler, cfg, rank, ds_config, {
        "world_size": world, "steps_total": total, "steps_per_epoch": steps_per_epoch, "peak_lr": peak_lr(cfg),
        **perf.params()}, resume_tag)
    start = state.get("step", 0)
    if rank == 0:
        print(f"[scaling] {cfg.stage} {'resuming at step ' + str(start) if start else 'starting'}: {kind.describe(cfg)}, "
              f"{f.num_classes} classes, {loader.num_samples} videos, "
              f"{steps_per_epoch} steps/epoch, {total} steps", flush=True)

    mixup, criterion = criterion_for(cfg)
    batches = batches_from(loader, start, steps_per_epoch, t.grad_accum)
    dtype = input_dtype(t.precision)
    end = min(total, start + t.max_steps_this_run) if t.max_steps_this_run else total
    stop = StopRequest(out, rank)
    guard = DivergenceGuard(t.max_nonfinite_steps, t.precision, start)
    perf.set_range(start, end, total)
    for step in range(start, end):
        perf.step_started()
        torch.manual_seed(run.step_seed(t.seed, step, rank=rank + 1))  # drop path, random erasing in-process
        np.random.seed(run.step_seed(t.seed, step, rank=rank + 1))  # timm's Mixup draws from numpy
        # Layer decay lives in each group's lr (peak x lr_scale); the schedule scales all alike.
        lr = max(g["lr"] for g in scheduler.optimizer.param_groups)
        lr_lowest = min(g["lr"] for g in scheduler.optimizer.param_groups)
        parts: dict[str, torch.Tensor] = {}
        for micro in range(t.grad_accum):
            with perf.waiting_for_data():
                batch = next(batches)
            video, target = batch["video"], batch["label"]  # (B, 3, T, H, W), (B,)
            if mixup is not None:
                video, target = mixup(video, target)  # target: (B, classes) soft
            drop_mask = drop_mask_for_rank(cfg, grid, step, micro, rank, video.shape[0], world)  # (B, N) or None
            loss, pieces = finetune_loss(engine, video.to(dtype), target, criterion, drop_mask, f.reconstruction_weight)
            loss = guard.inject(loss, step)
            engine.backward(loss)
            guard.optimizer_step(engine, step)
            for k, v in {"loss": loss.detach(), **pieces}.items():
                parts[k] = parts.get(k, 0) + v.float() / t.grad_accum
        losses = torch.stack(list(parts.values()))
        dist.all_reduce(losses)
        losses = dict(zip(parts, (losses / world).tolist()))
        step_loss = losses.pop("loss")
        finite = guard.check(engine, step, step_loss)  # DeepSpeed did not apply it if not
        if f.reconstruction_weight <= 0:
            losses = {}  # loss_cls is the loss itself
        perf.step_ended()
        logging = (step + 1) % t.log_every == 0
        counters = run.summed(loader.stats) if logging else {}
        figures = perf.collect(step + 1) if logging else {}  # throughput, MFU, data wait, memory, ETA
        if rank == 0 and logging:
            grad_norm = engine.get_global_grad_norm()
            metrics = {"loss": step_loss, **losses, "train/skipped_steps": guard.skipped, "lr": lr,
                       "lr_lowest_layer": lr_lowest, **figures, "epoch": (step + 1) / steps_per_epoch,
                       **({"grad_norm": float(grad_norm)} if grad_norm is not None else {}),
                       **{f"data/{k}": v for k, v in counters.items()}}
            run.log_step(tracker, out, step + 1, total, metrics, perf.line(step + 1, metrics))
        state = run.client_state(step + 1, tracker, t.seed, epoch=(step + 1) // steps_per_epoch)
        validation.after_step(engine, tracker, step + 1, state)
        if run.end_of_step(engine, cfg, guard, stop, tracker, rank, step + 1, end, finite, step_loss, state):
            end = step + 1
            break

    results = {}
    if end == total and f.val_shards:
        validation.load_for_test(engine)
        began = time.perf_counter()
        results = evaluate(engine, cfg, rank, world)
        if rank == 0:
            results["seconds"] = time.perf_counter() - began
            results["videos_per_s"] = results["videos"] / results["seconds"]
            per_class = results.pop("per_class_accuracy")
            (out / "eval.json").write_text(json.dumps({**results, "per_class_accuracy": per_class}, indent=2))
            tracker.log_metrics({f"eval/{k}": v for k, v in results.items()}, step=end)
            tracker.log_artifact(str(out / "eval.json"))
            print(f"[scaling] eval: top1 {results['top1']:.2f} top5 {results['top5']:.2f} on {results['videos']} videos "
                  f"({f.test_clips} clips x {f.test_crops} crops) in {results['seconds']:.1f} s, "
                  f"{results['videos_per_s']:.2f} videos/s", flush=True)
    if end == total:
        validation.export_best(tracker)
    run.close_run(tracker, stop, rank)
    return results
