"""What `validate` checks before any rank starts: ranks, batch arithmetic, files, the DeepSpeed
JSON, masks (through the registry in scaling/masking.py), heads and fine-tune inputs."""
from __future__ import annotations

import json
from pathlib import Path

from scaling.config.schema import (
    CPU_RANKS_KEY,
    DS_OWNED_KEYS,
    SAMPLINGS,
    SUPERVISED_STAGES,
    ConfigError,
    RunConfig,
    data_sources,
    micro_batch,
    resolve_ds_config,
)
from scaling.data.sources import expand_shards
from scaling.masking import MASK_MODES, check_mask
from scaling.models.classify import HEADS
from scaling.models.probe_heads import PROBE_HEADS
from scaling.models.vit import VIT_SIZES, get_size, num_tokens
from scaling.train.offload_optimizer import problem_with as offload_adam_problem


def validate_finetune(cfg: RunConfig, world_size: int, check_files: bool = True) -> None:
    f, t, o = cfg.finetune, cfg.train, cfg.optim
    if f.num_classes < 2:
        raise ConfigError(f"finetune.num_classes must be at least 2, got {f.num_classes}")
    if check_files and f.init_from not in ("", "previous") and not Path(f.init_from).is_file():
        raise ConfigError(f"finetune.init_from '{f.init_from}' is not a file; give an exported .pt/.pth checkpoint, "
                          "'previous' in a pipeline, or ''")
    if not 0 < f.layer_decay <= 1:
        raise ConfigError(f"finetune.layer_decay must be in (0, 1], got {f.layer_decay}")
    validate_mar(cfg)
    clips = micro_batch(cfg, world_size) * cfg.data.num_sample
    if (f.mixup > 0 or f.cutmix > 0) and clips % 2:
        raise ConfigError(f"mixup/cutmix pair clips within a rank's batch, which holds {clips} (odd); make "
                          "global_batch / (ranks x grad_accum) x data.num_sample even or set finetune.mixup=0 finetune.cutmix=0")
    if f.val_shards and check_files:
        try:
            expand_shards(f.val_shards)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"finetune.val_shards matches no files ({e}); check the path") from None
    if f.eval_every < 0 or (f.eval_every and not f.val_shards):
        raise ConfigError(f"finetune.eval_every={f.eval_every} validates on finetune.val_shards every that many epochs; "
                          "set finetune.val_shards, or finetune.eval_every=0")
    if f.test_with not in ("last", "best") or (f.test_with == "best" and not f.eval_every):
        raise ConfigError(f"finetune.test_with must be last or best (best needs finetune.eval_every > 0), got {f.test_with!r}")
    if t.epochs < 0 or o.warmup_epochs < 0:
        raise ConfigError(f"train.epochs and optim.warmup_epochs must be 0 or more, got {t.epochs} and {o.warmup_epochs}")
    if t.epochs and o.warmup_steps <= 0 and o.warmup_epochs >= t.epochs:
        raise ConfigError(f"optim.warmup_epochs={o.warmup_epochs} must be below train.epochs={t.epochs}")
    if not t.epochs and o.warmup_steps >= t.steps:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} must be below train.steps={t.steps}")


def validate_mar(cfg: RunConfig) -> None:
    """The fine-tune head, the fine-tune encoder mask and the reconstruction branch (MAR)."""
    m, k, f = cfg.model, cfg.mask, cfg.finetune
    if m.head not in HEADS:
        raise ConfigError(f"model.head '{m.head}' is unknown; choose one of {', '.join(HEADS)}")
    mode = MASK_MODES["finetune"].get(k.finetune)  # the grid only where the mode has a check (a known model)
    grid = num_tokens(get_size(m.name), m.num_frames, m.input_size) if mode is not None and mode.check else None
    problem = check_mask("finetune", k.finetune, grid, k.finetune_ratio, "mask.finetune", "mask.finetune_ratio", m.input_size)
    if problem:
        raise ConfigError(problem)
    if not 0 <= f.head_drop < 1:
        raise ConfigError(f"finetune.head_drop must be in [0, 1), got {f.head_drop}")
    if f.reconstruction_weight < 0:
        raise ConfigError(f"finetune.reconstruction_weight must be 0 (no decoder) or positive, got {f.reconstruction_weight}")
    if f.reconstruction_weight > 0 and k.finetune == "none":
        raise ConfigError("finetune.reconstruction_weight > 0 rebuilds the tokens the fine-tune mask drops, and "
                          "mask.finetune is none; set mask.finetune=running_cell or finetune.reconstruction_weight=0")


def validate_probe(cfg: RunConfig) -> None:
    """A probe trains a head on every token of a frozen encoder."""
    if cfg.probe.head not in PROBE_HEADS:
        raise ConfigError(f"probe.head '{cfg.probe.head}' is unknown; choose one of {', '.join(PROBE_HEADS)}")
    if cfg.mask.finetune != "none" or cfg.finetune.reconstruction_weight > 0:
        raise ConfigError("a probe runs the frozen encoder on every token; set mask.finetune=none and "
                          "finetune.reconstruction_weight=0 (MAR's token dropping is for fine-tuning)")


def validate(cfg: RunConfig, world_size: int, check_files: bool = True) -> None:
    """Everything a user can get wrong, refused before any rank starts. `check_files=False`
    checks the values only (`scaling pipeline show` before the shards and weights exist)."""
    m, t, k, d, o = cfg.model, cfg.train, cfg.mask, cfg.data, cfg.optim
    validate_counts(cfg, world_size)
    validate_ds_json(cfg)
    if cfg.stage not in ("pretrain", *SUPERVISED_STAGES):
        raise ConfigError(f"stage '{cfg.stage}' is unknown; choose pretrain, finetune or probe")
    if m.name not in VIT_SIZES:
        raise ConfigError(f"unknown model.name '{m.name}'; choose one of: {', '.join(VIT_SIZES)}")
    try:
        grid = num_tokens(get_size(m.name), m.num_frames, m.input_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    depth = get_size(m.name).depth
    if not isinstance(m.activation_checkpointing, bool) and not 0 <= m.activation_checkpointing <= depth:
        raise ConfigError(f"model.activation_checkpointing={m.activation_checkpointing} is not a block count of "
                          f"{m.name} ({depth} blocks); use true, false or a number from 0 to {depth}")
    problems = [check_mask("encoder", k.encoder, grid, k.encoder_ratio, "mask.encoder", "mask.encoder_ratio", m.input_size),
                check_mask("decoder", k.decoder, grid, k.decoder_ratio, "mask.decoder", "mask.decoder_ratio", m.input_size)]
    if problems[0]:
        raise ConfigError(problems[0])
    if k.decoder not in MASK_MODES["decoder"]:
        raise ConfigError(problems[1])
    if not 0.0 < k.encoder_ratio < 1.0:
        raise ConfigError(f"mask.encoder_ratio must be between 0 and 1 (exclusive), got {k.encoder_ratio}")
    if problems[1]:
        raise ConfigError(problems[1])
    if t.global_batch < 1 or t.grad_accum < 1 or t.steps < 1:
        raise ConfigError("train.global_batch, train.grad_accum and train.steps must all be at least 1")
    if t.global_batch % (world_size * t.grad_accum):
        raise ConfigError(
            f"train.global_batch={t.global_batch} is not divisible by ranks x grad_accum = {world_size} x {t.grad_accum}; "
            f"use a multiple of {world_size * t.grad_accum}"
        )
    if t.max_nonfinite_steps < 1:
        raise ConfigError(f"train.max_nonfinite_steps must be at least 1, got {t.max_nonfinite_steps}")
    if t.precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ConfigError(f"train.precision '{t.precision}' is unknown; choose auto, bf16, fp16 or fp32")
    if t.zero_stage not in (0, 1, 2, 3, "auto"):
        raise ConfigError(f"train.zero_stage must be 0, 1, 2, 3 or auto, got {t.zero_stage!r}")
    if t.compile and t.zero_stage == 3:
        raise ConfigError("train.compile=true does not work with train.zero_stage=3 (torch.compile cannot trace ZeRO-3's "
                          "partitioned parameters); use train.zero_stage=auto, 1 or 2, or train.compile=false")
    if check_files:
        resolve_ds_config(t.ds_config)
    if d.source not in ("shards", "noise"):
        raise ConfigError(f"data.source '{d.source}' is unknown; choose shards or noise")
    if d.source == "shards" and not check_files:
        data_sources(cfg)  # the shape of the sources, not their files
    if d.source == "shards" and check_files:
        for source in data_sources(cfg):
            try:
                expand_shards(source.shards)
            except (ValueError, FileNotFoundError) as e:
                raise ConfigError(f"data source '{source.name}' matches no files ({e}); check the path, "
                                  "or make shards with `scaling synth --out <dir>` or `scaling shard`") from None
    if d.num_sample < 1 or d.stride < 1 or d.num_workers < 0:
        raise ConfigError("data.num_sample and data.stride must be at least 1 and data.num_workers at least 0")
    if o.base_lr <= 0 or o.min_lr < 0 or o.min_lr > o.base_lr:
        raise ConfigError(f"optim.base_lr must be > 0 and 0 <= optim.min_lr <= base_lr (got {o.base_lr}, {o.min_lr})")
    if not 0 <= o.warmup_lr <= o.base_lr:
        raise ConfigError(f"optim.warmup_lr must be between 0 and optim.base_lr={o.base_lr}, got {o.warmup_lr}")
    if d.sampling not in SAMPLINGS:
        raise ConfigError(f"data.sampling '{d.sampling}' is unknown; choose one of {', '.join(SAMPLINGS)}")
    if d.num_videos < 0:
        raise ConfigError(f"data.num_videos must be 0 (unknown) or the number of videos, got {d.num_videos}")
    if cfg.stage in SUPERVISED_STAGES:
        validate_finetune_inputs(cfg)
        validate_finetune(cfg, world_size, check_files)
        if cfg.stage == "probe":
            validate_probe(cfg)
        return
    if d.sampling != "stride":
        raise ConfigError("data.sampling=segments is for fine-tuning and testing; pre-training takes frames "
                          "at data.stride (2 for SSv2-like clips), so set data.sampling=stride")
    if t.epochs:
        raise ConfigError(f"pre-training runs train.steps, not epochs; remove train.epochs={t.epochs} and set "
                          "train.steps (epochs x train.steps_per_epoch)")
    if o.warmup_steps >= t.steps:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} must be below train.steps={t.steps}")


def validate_counts(cfg: RunConfig, world_size: int) -> None:
    """Counts that divide or repeat something: zero or negative would crash inside the ranks."""
    t = cfg.train
    if t.ranks < 1 or world_size < 1:
        raise ConfigError(f"train.ranks must be at least 1, got {t.ranks if t.ranks < 1 else world_size}; "
                          "set train.ranks=1 for one process or the number of local processes to start")
    for key in ("save_every", "log_every"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key} must be at least 1 (steps between {key.split('_')[0]}s), got {getattr(t, key)}")
    if t.keep_checkpoints < 0:
        raise ConfigError(f"train.keep_checkpoints must be 0 (keep all) or more, got {t.keep_checkpoints}")


def validate_ds_json(cfg: RunConfig) -> None:
    """The DeepSpeed JSON parses and leaves to the run config what the run config decides."""
    path = resolve_ds_config(cfg.train.ds_config)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.ds_config {path} is not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"train.ds_config {path} must hold a JSON object")
    if not isinstance(ds.get(CPU_RANKS_KEY, {}), dict):
        raise ConfigError(f"train.ds_config {path}: {CPU_RANKS_KEY} must be a JSON object of DeepSpeed settings for "
                          f"CPU ranks, e.g. {{\"zero_optimization\": {{\"reduce_bucket_size\": 6250000}}}}")
    problem = offload_adam_problem(cfg.optim.offload_adam, ds, path)
    if problem:
        raise ConfigError(problem)
    clashes = [k for k in DS_OWNED_KEYS if k in ds or k in ds.get(CPU_RANKS_KEY, {})]
    if clashes:
        owners = ", ".join(f"{k} (set by {DS_OWNED_KEYS[k]})" for k in clashes)
        raise ConfigError(f"train.ds_config {path} sets {owners}, which the run config computes; remove those keys "
                          "from the JSON and set the run config keys instead")


def validate_finetune_inputs(cfg: RunConfig) -> None:
    """What a supervised stage reads: labelled shards, and weights that load without running code."""
    f = cfg.finetune
    if cfg.data.source != "shards":
        raise ConfigError(f"data.source={cfg.data.source} has no labels, so a fine-tune stage cannot use it; "
                          "set data.source=shards and data.shards to labelled shards (e.g. from `scaling synth`)")
    if f.init_from not in ("", "previous") and Path(f.init_from).is_file() and not f.trust_checkpoint:
        from scaling.models.convert import UntrustedCheckpointError, safe_load

        try:
            safe_load(Path(f.init_from), mmap=True)  # the ranks' own unpickler, tensors mapped, not read
        except UntrustedCheckpointError as e:
            raise ConfigError(f"finetune.init_from {e}") from None
        except Exception as e:  # noqa: BLE001 - truncated or not a checkpoint at all
            raise ConfigError(f"finetune.init_from {f.init_from} cannot be read as a checkpoint ({str(e).splitlines()[0][:200]}); "
                              "give an exported .pt/.pth file") from None
