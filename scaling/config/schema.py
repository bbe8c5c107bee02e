"""One typed config per run: dataclasses, YAML loading, dotted overrides, validation.

`load_config("pipelines/pretrain_smoke.yaml", ["train.steps=40"])` returns a `RunConfig`; unknown
keys and values of the wrong type are refused with the dotted key and the fix. `validate()`
checks what can only be checked against the world (ranks, files) and runs before any rank
is launched.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from scaling.data.sources import Source, as_sources, expand_shards
from scaling.errors import UserError
from scaling.masking import MASK_MODES, check_mask
from scaling.models.classify import HEADS
from scaling.models.vit import VIT_SIZES, get_size, num_tokens

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLINGS = ("stride", "segments")


class ConfigError(UserError, ValueError):
    """A user-fixable config problem; the message is one sentence naming the key and the fix."""


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that exponent numbers without a dot (1e-3, 1e6) are numbers:
    YAML 1.1 reads them as strings, YAML 1.2 and JSON as numbers, and users write them so."""


YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))
NUMBER = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$")


def parse_yaml(text: str, where: str):
    """YAML text -> Python values; a syntax error becomes one sentence with line and column
    (the column alone for one line of text, such as an override's value)."""
    try:
        return yaml.load(text, Loader=YamlLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        line = "" if "\n" not in text.strip() else f"line {mark.line + 1}, " if mark is not None else ""
        at = f" at {line}column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{where} is not valid YAML{at}: {problem}; fix the syntax there "
                          "(quote values that contain ':', '#', '[' or '{')") from None


def read_yaml(path: str | os.PathLike) -> dict:
    """A YAML file that must hold a mapping (or nothing)."""
    data = parse_yaml(Path(path).read_text(), f"'{path}'")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"'{path}' must hold a mapping of keys (e.g. 'train: {{steps: 40}}'), not a {type(data).__name__}")
    return data


@dataclass
class ModelConfig:
    name: str = "vit_b"
    num_frames: int = 16
    input_size: int = 224
    drop_path: float = 0.0
    activation_checkpointing: bool = False
    head: str = "linear"  # finetune: linear (VideoMAE V2) | bridging (MAR: 2 blocks of width 512 on the kept tokens)


@dataclass
class MaskConfig:
    encoder: str = "tube"  # tube (VideoMAE) | random (MAE-ST)
    encoder_ratio: float = 0.9
    decoder: str = "running_cell"  # running_cell (VideoMAE V2 dual masking) | none (encoder-only)
    decoder_ratio: float = 0.5
    # finetune: none (every token) | running_cell (MAR: drop finetune_ratio of the tokens before
    # the encoder, random offset and slot order per video in training, one fixed pattern in test)
    finetune: str = "none"
    finetune_ratio: float = 0.5


@dataclass
class DataConfig:
    source: str = "shards"  # shards | noise (pure-function random clips: I/O-free benchmarks and tests)
    shards: str = ""  # brace pattern or glob, e.g. data/synth/synth-{000000..000003}.tar
    stride: int = 4
    # Fine-tune/test frame choice: stride (`num_frames` frames `stride` apart, Kinetics) | segments
    # (the video cut into `num_frames` equal segments, one frame from each: SSv2 in VideoMAE V2).
    sampling: str = "stride"
    # Videos in one epoch when the shards are not on disk yet (`scaling pipeline show`); the run
    # itself counts the shards. 0 = unknown.
    num_videos: int = 0
    # A weighted mix of shard sets instead of `shards` (the unlabeled hybrid), each with its own
    # weight, frame stride and flip rule: [{name: k710, shards: ..., weight: 0.49}, ...].
    sources: list[Source] = field(default_factory=list)
    num_sample: int = 4  # clips per decoded video (repeated augmentation); not counted by the lr rule
    num_workers: int = 2


@dataclass
class OptimConfig:
    # The lr rule of VideoMAE V2: the peak lr is base_lr x videos per optimizer step
    # (train.global_batch) / 256; num_sample clips per video do not count. min_lr and warmup_lr
    # are scaled the same way. Defaults here are pre-training's; supervised stages get
    # FINETUNE_DEFAULTS below.
    base_lr: float = 1e-3
    min_lr: float = 1e-5  # floor of the cosine
    # lr of the first warmup step (warmup: evenly spaced from warmup_lr to the peak, both
    # included). 0: the reference scales its --warmup_lr but never hands it to its scheduler,
    # so its warmup starts at 0.
    warmup_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 0  # > 0 wins over warmup_epochs
    warmup_epochs: int = 0  # warmup in epochs (see train.steps_per_epoch / train.epochs)
    clip_grad: float = 0.0  # 0 disables clipping


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps
    global_batch: int = 2  # videos per optimizer step over all ranks (clips = x num_sample)
    grad_accum: int = 1
    ranks: int = 1  # local processes when `scaling pretrain` launches them itself
    precision: str = "bf16"  # bf16 | fp16 | fp32
    zero_stage: int = 3
    ds_config: str = "ds_configs/zero3_bf16.json"
    seed: int = 0
    save_every: int = 50  # steps between checkpoints; the last step always saves
    keep_checkpoints: int = 2
    log_every: int = 1
    output_dir: str = "runs/pretrain"
    steps_per_epoch: int = 0  # pre-training: for the epoch count (streaming data has no epochs); 0 = not counted
    # finetune: passes over the finite data, each num_videos // global_batch optimizer steps
    # (scaling/train/schedule.py); sets the run's length when > 0
    epochs: int = 0
    max_steps_this_run: int = 0  # stop after this many steps (0 = until `steps`); for staged runs/tests
    max_nonfinite_steps: int = 5  # skipped non-finite steps in a row before the run stops as diverged


@dataclass
class TrackingConfig:
    enabled: bool = True
    tracking_uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else MLflow's default sqlite:///mlflow.db
    experiment: str = "scaling"
    run_name: str = ""
    parent_run_id: str = ""  # set by `scaling pipeline`: stage runs nest under the pipeline run


@dataclass
class FinetuneConfig:
    """Supervised stages (post-pre-training on K710, task fine-tuning); the VideoMAE V2 recipe's defaults."""

    num_classes: int = 400
    init_from: str = ""  # "" (random init), "previous" (the pipeline's previous stage), or a checkpoint path
    layer_decay: float = 0.75
    label_smoothing: float = 0.1
    mixup: float = 0.8  # 0 disables mixup
    cutmix: float = 1.0  # 0 disables cutmix
    head_drop: float = 0.0  # dropout before the last Linear; MAR's bridging classifier uses 0.1
    # MAR: weight of the decoder's reconstruction of the dropped tokens (0.01 K400, 0.1 SSv2);
    # 0 = no decoder. Needs mask.finetune=running_cell; never run at evaluation.
    reconstruction_weight: float = 0.0
    rand_aug: str = "rand-m7-n4-mstd0.5-inc1"
    reprob: float = 0.25  # random erasing probability
    val_shards: str = ""  # evaluated with test_clips x test_crops views after training
    test_clips: int = 5
    test_crops: int = 3
    # Load `init_from` with full unpickling even if it holds objects that can run code
    # (`--trust-checkpoint`); by default only weights and plain values are read.
    trust_checkpoint: bool = False


@dataclass
class RunConfig:
    stage: str = "pretrain"  # pretrain (masked video modelling) | finetune (supervised)
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


# What a stage gets for every key its YAML does not set: the VideoMAE V2 reference's defaults
# (run_mae_pretraining.py / run_class_finetuning.py argument defaults), merged under the user's
# values before the dataclasses are built, so the config saved beside the checkpoints shows them.
PRETRAIN_DEFAULTS = {
    "optim": {"betas": [0.9, 0.95], "min_lr": 1.0e-5, "warmup_lr": 0.0, "weight_decay": 0.05, "clip_grad": 0.0},
    "data": {"num_sample": 4},
}
FINETUNE_DEFAULTS = {
    "optim": {"betas": [0.9, 0.999], "min_lr": 1.0e-6, "warmup_lr": 0.0, "warmup_epochs": 5, "weight_decay": 0.05,
              "clip_grad": 0.0},
    "data": {"num_sample": 2},
    "model": {"drop_path": 0.1},
    "finetune": {"layer_decay": 0.75, "mixup": 0.8, "cutmix": 1.0, "label_smoothing": 0.1},
}
STAGE_DEFAULTS = {"pretrain": PRETRAIN_DEFAULTS, "finetune": FINETUNE_DEFAULTS}


def with_stage_defaults(data: dict) -> dict:
    """`data` (a run config as nested dicts) over its stage's defaults; user values win."""
    if not isinstance(data, dict):
        return data
    defaults = STAGE_DEFAULTS.get(data.get("stage", "pretrain"), {})
    return merge(defaults, data)


def merge(base: dict, top: dict) -> dict:
    """`top` over `base`, nested mappings merged key by key; neither input is changed."""
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def build_run_config(data: dict) -> RunConfig:
    """A typed RunConfig from nested dicts, with the stage's defaults under them."""
    return from_dict(RunConfig, with_stage_defaults(data))


def _coerce(value, annotation, key: str):
    """Check/convert one YAML value against a dataclass field type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(annotation):
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(" or ".join(errors))
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        if dataclasses.is_dataclass(item):
            return [from_dict(item, v, f"{key}[{i}].") for i, v in enumerate(value)]
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(typing.get_args(annotation)):
            raise ConfigError(f"config key '{key}' must be a list of {len(typing.get_args(annotation))} numbers, got {value!r}")
        return tuple(_coerce(v, t, key) for v, t in zip(value, typing.get_args(annotation)))
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if annotation is int:
        value = _number(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 1e6 steps
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if annotation is float:
        value = _number(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {annotation} for {key}")


def _number(value):
    """A string that spells a number ('1e-3' from a YAML 1.1 reader, a quoted '0.5') as that number."""
    if isinstance(value, str) and NUMBER.match(value.strip()):
        text = value.strip().replace("_", "")
        return float(text) if any(c in text for c in ".eE") else int(text)
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}'; valid keys here are: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, data[name] or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(data[name], hint, prefix + name)
    return cls(**kwargs)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`key.sub=value` strings onto a nested dict; values are parsed as YAML scalars."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a config section")
        node[parts[-1]] = parse_yaml(raw, f"the value of override '{item}'")
    return data


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> RunConfig:
    data = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{path}' does not exist; pass an existing YAML, e.g. pipelines/pretrain_smoke.yaml")
        data = read_yaml(p)
    return build_run_config(apply_overrides(data, list(overrides)))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def resolve_ds_config(path: str) -> Path:
    """A DeepSpeed JSON path as given, else relative to the repository root."""
    for candidate in (Path(path), REPO_ROOT / path):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"train.ds_config '{path}' not found; use one of ds_configs/*.json")


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


def data_sources(cfg: RunConfig) -> list[Source]:
    """The run's sources: `data.sources`, or `data.shards` as one source with `data.stride`."""
    d = cfg.data
    if d.sources and d.shards:
        raise ConfigError("set either data.shards or data.sources, not both")
    if not d.sources and not d.shards:
        raise ConfigError("data.shards is empty; set it to your shard pattern, e.g. "
                          "data.shards='data/synth/synth-{000000..000003}.tar' (make some with `scaling synth`)")
    try:
        return as_sources(sources=d.sources) if d.sources else as_sources(d.shards, stride=d.stride)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"data.sources: {e}") from None


def micro_batch(cfg: RunConfig, world_size: int) -> int:
    return cfg.train.global_batch // (world_size * cfg.train.grad_accum)


def validate(cfg: RunConfig, world_size: int, check_files: bool = True) -> None:
    """Everything a user can get wrong, refused before any rank starts. `check_files=False`
    checks the values only (`scaling pipeline show` before the shards and weights exist)."""
    m, t, k, d, o = cfg.model, cfg.train, cfg.mask, cfg.data, cfg.optim
    validate_counts(cfg, world_size)
    validate_ds_json(cfg)
    if cfg.stage not in ("pretrain", "finetune"):
        raise ConfigError(f"stage '{cfg.stage}' is unknown; choose pretrain or finetune")
    if m.name not in VIT_SIZES:
        raise ConfigError(f"unknown model.name '{m.name}'; choose one of: {', '.join(VIT_SIZES)}")
    try:
        grid = num_tokens(get_size(m.name), m.num_frames, m.input_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
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
    if t.precision not in ("bf16", "fp16", "fp32"):
        raise ConfigError(f"train.precision '{t.precision}' is unknown; choose bf16, fp16 or fp32")
    if t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage must be 0, 1, 2 or 3, got {t.zero_stage}")
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
    if cfg.stage == "finetune":
        validate_finetune_inputs(cfg)
        validate_finetune(cfg, world_size, check_files)
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


# DeepSpeed keys the run config computes (scaling/train/engine.py merges them into the JSON).
DS_OWNED_KEYS = {"train_batch_size": "train.global_batch", "train_micro_batch_size_per_gpu": "train.global_batch",
                 "gradient_accumulation_steps": "train.grad_accum", "gradient_clipping": "optim.clip_grad",
                 "bf16": "train.precision", "fp16": "train.precision", "optimizer": "optim.*",
                 "scheduler": "optim.* (warmup-cosine)"}


def validate_ds_json(cfg: RunConfig) -> None:
    """The DeepSpeed JSON parses and leaves to the run config what the run config decides."""
    path = resolve_ds_config(cfg.train.ds_config)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.ds_config {path} is not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"train.ds_config {path} must hold a JSON object")
    clashes = [k for k in DS_OWNED_KEYS if k in ds]
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
