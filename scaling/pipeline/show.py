"""`scaling pipeline show`: each stage's effective values, resolved the way training resolves them.

Nothing here launches a rank or reads a video: the numbers come from the functions the
training loops call (`scaling.train.schedule` for the lr rule, the run length and the epoch,
`scaling.train.param_groups` for layer decay), applied to the typed stage configs with their
stage defaults; DeepSpeed is not even imported. Without the shards on disk an epoch is
counted from `data.num_videos`, which a recipe states with its source; with the shards the
videos are counted from the tar headers, as the fine-tune loader does.
"""
from __future__ import annotations

import json

from scaling.config import ConfigError, RunConfig, data_sources, validate
from scaling.config.schema import SUPERVISED_STAGES
from scaling.data.sources import expand_shards
from scaling.models.vit import get_size
from scaling.pipeline.slurm import job_shapes
from scaling.pipeline.spec import Pipeline, Stage, load_pipeline
from scaling.train.param_groups import layer_lr_scale
from scaling.train.schedule import (
    clips_per_step,
    min_lr,
    peak_lr,
    run_steps,
    steps_per_epoch,
    videos_per_step,
    warmup_lr,
)


def count_videos(cfg: RunConfig) -> tuple[int, str]:
    """(videos in one epoch, where the number comes from): the shards' own count when every
    shard exists, else the recipe's `data.num_videos`, else (0, 'unknown')."""
    try:
        urls = [(k, url) for k, s in enumerate(data_sources(cfg)) for url in expand_shards(s.shards)]
    except (ConfigError, ValueError, FileNotFoundError):
        urls = []
    if urls:
        from scaling.data.finite import ShardIndex  # imports torch's DataLoader; only needed here

        index = ShardIndex()
        try:
            for k, url in urls:
                index.add_shard(url, k)
            return len(index), "counted in the shards"
        except (OSError, ValueError):
            pass
    if cfg.data.num_videos:
        return cfg.data.num_videos, "data.num_videos"
    return 0, "unknown"


def split(cfg: RunConfig, ranks: int) -> dict:
    """Per-rank videos per micro-batch and gradient accumulation for `ranks` ranks."""
    t = cfg.train
    if t.global_batch % (ranks * t.grad_accum):
        return {"ranks": ranks, "micro_batch": None, "grad_accum": t.grad_accum,
                "note": f"{t.global_batch} videos do not split over {ranks} ranks x {t.grad_accum} accumulation steps"}
    return {"ranks": ranks, "micro_batch": t.global_batch // (ranks * t.grad_accum), "grad_accum": t.grad_accum}


def starts_from(pipe: Pipeline, stage: Stage) -> str:
    init = stage.config.finetune.init_from if stage.config.stage in SUPERVISED_STAGES else ""
    if init == "previous":
        previous = pipe.previous(stage)
        return f"stage {previous.name} ({previous.export})"
    return f"file {init}" if init else "scratch (random init)"


def zero_stage_row(cfg: RunConfig, gpus_per_node: int, nodes: int) -> dict:
    """The ZeRO stage a run will use: as set, or what `auto` picks for that job on 80 GiB GPUs."""
    if cfg.train.zero_stage != "auto":
        return {"setting": cfg.train.zero_stage, "stage": cfg.train.zero_stage, "reason": "set in the recipe"}
    from scaling.memory.zero_choice import DEFAULT_GPU_MEMORY_GB, choose_zero_stage

    choice = choose_zero_stage(cfg, gpus_per_node, nodes, DEFAULT_GPU_MEMORY_GB)
    return {"setting": "auto", "stage": choice.stage, "reason": choice.reason}


def stage_values(pipe: Pipeline, stage: Stage, job_ranks: int | None, shape=None) -> dict:
    cfg = stage.config
    o, t, d, m, k, f = cfg.optim, cfg.train, cfg.data, cfg.model, cfg.mask, cfg.finetune
    supervised = cfg.stage in SUPERVISED_STAGES
    if supervised:
        videos, videos_from = count_videos(cfg)
        epoch_steps = steps_per_epoch(videos, t.global_batch) if videos else 0
    else:  # streaming: an epoch is whatever the recipe says it is
        videos, videos_from = d.num_videos, "train.steps_per_epoch"
        epoch_steps = t.steps_per_epoch
    total, warmup = run_steps(cfg, epoch_steps)
    known = not (supervised and t.epochs and not epoch_steps)
    depth = get_size(m.name).depth
    ld = f.layer_decay if supervised else 1.0
    sources = data_sources(cfg)
    values = {
        "stage": stage.name, "kind": cfg.stage, "model": m.name, "starts_from": starts_from(pipe, stage),
        "videos_per_step": videos_per_step(cfg), "clips_per_step": clips_per_step(cfg), "num_sample": d.num_sample,
        "local": split(cfg, pipe.ranks), "slurm": split(cfg, job_ranks) if job_ranks else None,
        "videos_per_epoch": videos, "videos_per_epoch_from": videos_from, "steps_per_epoch": epoch_steps,
        "epochs": t.epochs if t.epochs else (round(total / epoch_steps, 3) if epoch_steps else None),
        "total_steps": total if known else None, "warmup_steps": warmup if known else None,
        "base_lr": o.base_lr, "peak_lr": peak_lr(cfg), "min_lr": min_lr(cfg), "warmup_lr": warmup_lr(cfg),
        "layer_decay": ld,
        "lr_first_block": peak_lr(cfg) * layer_lr_scale(ld, 1, depth + 1),
        "lr_last_block": peak_lr(cfg) * layer_lr_scale(ld, depth, depth + 1),
        "weight_decay": o.weight_decay, "clip_grad": o.clip_grad, "betas": list(o.betas), "drop_path": m.drop_path,
        "masking": (f"encoder {k.encoder} {k.encoder_ratio:g}, decoder {k.decoder}"
                    + (f" {k.decoder_ratio:g}" if k.decoder != "none" else "")) if not supervised
        else (f"MAR {k.finetune} {k.finetune_ratio:g}" if k.finetune != "none" else "none (every token)"),
        "sampling": (f"segments ({m.num_frames} per clip)" if supervised and d.sampling == "segments"
                     else "stride " + ", ".join(f"{s.name} {s.stride}" for s in sources)),
        "test_views": f"{f.test_clips} clips x {f.test_crops} crops" if supervised else None,
        "sources": [{"name": s.name, "shards": s.shards, "weight": s.weight} for s in sources],
        "zero": zero_stage_row(cfg, shape.gpus_per_node, shape.nodes) if shape else zero_stage_row(cfg, pipe.ranks, 1),
    }
    return values


def show_pipeline(path: str, overrides: list[str] = ()) -> list[dict]:
    """Every stage's effective values; the configs are validated except for files on disk."""
    pipe = load_pipeline(path, overrides, only="")  # typed, not yet checked against files
    shapes = job_shapes(pipe) if pipe.raw.get("slurm") else {}
    rows = []
    for stage in pipe.stages:
        shape = shapes.get(stage.name)
        job_ranks = shape.nodes * shape.gpus_per_node if shape else None
        try:
            validate(stage.config, job_ranks or pipe.ranks, check_files=False)
        except ConfigError as e:
            raise ConfigError(f"stage '{stage.name}': {e}") from None
        rows.append(stage_values(pipe, stage, job_ranks, shape))
    return rows


def _lr(x: float) -> str:
    return f"{x:.4g}"


def _split_text(s: dict | None) -> str:
    if s is None:
        return "-"
    if s["micro_batch"] is None:
        return s["note"]
    return f"{s['ranks']} ranks x {s['micro_batch']} videos x {s['grad_accum']} accumulation"


def format_table(rows: list[dict]) -> str:
    """One block per stage, one effective value per line."""
    out = []
    for r in rows:
        steps = (f"{r['total_steps']} total, {r['warmup_steps']} warmup" if r["total_steps"] is not None
                 else "unknown: set data.num_videos or make the shards")
        counted = f"{r['videos_per_epoch']} videos, " if r["videos_per_epoch"] else ""
        epoch = (f"{r['steps_per_epoch']} steps ({counted}{r['videos_per_epoch_from']})"
                 if r["steps_per_epoch"] else f"not counted ({r['videos_per_epoch_from']})")
        lines = [
            ("starts from", r["starts_from"]),
            ("per step", f"{r['videos_per_step']} videos x {r['num_sample']} clips = {r['clips_per_step']} clips"),
            ("local ranks", _split_text(r["local"])),
            ("Slurm job", _split_text(r["slurm"])),
            ("optimizer steps", steps),
            ("epoch", epoch + (f", {r['epochs']:g} epochs" if r["epochs"] else "")),
            ("lr", f"peak {_lr(r['peak_lr'])} (base_lr {r['base_lr']:g} x {r['videos_per_step']} / 256), "
                   f"min {_lr(r['min_lr'])}, warmup from {_lr(r['warmup_lr'])}"),
            ("layer decay", f"{r['layer_decay']:g}: first block lr {_lr(r['lr_first_block'])}, "
                            f"last block lr {_lr(r['lr_last_block'])}" if r["kind"] == "finetune" else "none"),
            ("optimizer", f"AdamW betas ({r['betas'][0]:g}, {r['betas'][1]:g}), weight decay {r['weight_decay']:g}, "
                          f"clip {r['clip_grad']:g}" + (" (off)" if not r["clip_grad"] else "")),
            ("drop path", f"{r['drop_path']:g}"),
            ("masking", r["masking"]),
            ("sampling", r["sampling"]),
            ("test views", r["test_views"] or "-"),
            ("data", ", ".join(f"{s['name']} (weight {s['weight']:g})" for s in r["sources"])),
            ("ZeRO", f"stage {r['zero']['stage']}" + (f" ({r['zero']['reason']})" if r["zero"]["setting"] == "auto" else "")),
        ]
        out.append(f"{r['stage']} [{r['kind']}, {r['model']}]")
        out += [f"  {k:<16}{v}" for k, v in lines]
    return "\n".join(out)


def cmd_show(args) -> int:
    rows = show_pipeline(args.pipeline, args.overrides)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0
