"""The run config's schema: dataclasses, YAML loading, dotted overrides, stage defaults.

`load_config("pipelines/pretrain_smoke.yaml", ["train.steps=40"])` returns a `RunConfig`; unknown
keys and values of the wrong type are refused with the dotted key and the fix. The checks
against the world (ranks, files) are in scaling/config/checks.py.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from scaling.data.sources import Source, as_sources
from scaling.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]
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
    # true (every block), false, or N: the first N encoder blocks and the same share of the
    # decoder's / bridging head's blocks (fewer recomputed blocks, more memory; `scaling memory
    # plan --budget-gb` picks N)
    activation_checkpointing: bool | int = False
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
    # the AdamW for optimizer states ZeRO offloads to CPU/NVMe: auto | torch (fused) | deepspeed
    # (DeepSpeedCPUAdam); runs without offload use torch's (scaling/train/offload_optimizer.py)
    offload_adam: str = "auto"


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps
    global_batch: int = 2  # videos per optimizer step over all ranks (clips = x num_sample)
    grad_accum: int = 1
    ranks: int = 1  # local processes when `scaling pretrain` launches them itself
    # auto (bf16 on GPUs that have it, fp16 on those that do not; on CPUs whichever a timed block
    # says is faster, scaling/precision.py) | bf16 | fp16 | fp32
    precision: str = "auto"
    # 0-3, or "auto": the lowest stage whose per-GPU memory fits (scaling/memory/zero_choice.py)
    zero_stage: int | str = 3
    compile: bool = False  # torch.compile the model through DeepSpeed's engine.compile() (scaling/train/engine.py)
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
    system_metrics: bool = True  # MLflow's system metrics (CPU, memory, GPU) of rank 0's node, as `system/...`


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
    eval_every: int = 0  # epochs between validations on val_shards (1 view per video; best kept); 0 = none
    test_with: str = "last"  # weights of the final multi-view test: last | best (by validation top-1; needs eval_every)
    test_clips: int = 5
    test_crops: int = 3
    # Load `init_from` with full unpickling even if it holds objects that can run code
    # (`--trust-checkpoint`); by default only weights and plain values are read.
    trust_checkpoint: bool = False


@dataclass
class ProbeConfig:
    """`stage: probe`: the encoder frozen, only a head trained (labels, data, init_from, test
    views: the finetune section)."""

    head: str = "linear"  # linear (MAE: affine-free BatchNorm + Linear on pooled tokens) | attentive (V-JEPA)


@dataclass
class RunConfig:
    stage: str = "pretrain"  # pretrain (masked video modelling) | finetune (supervised) | probe (frozen encoder)
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)


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
# Probing (MAE's linear probe recipe, AdamW in place of LARS): no mixup, cutmix, label
# smoothing, RandAugment or erasing, no weight decay; crop + flip are the only augmentation.
PROBE_DEFAULTS = {
    "optim": {"betas": [0.9, 0.999], "min_lr": 0.0, "warmup_lr": 0.0, "warmup_epochs": 1, "weight_decay": 0.0,
              "clip_grad": 0.0},
    "data": {"num_sample": 1},
    "model": {"drop_path": 0.0},
    "finetune": {"layer_decay": 1.0, "mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.0, "rand_aug": "", "reprob": 0.0},
}
STAGE_DEFAULTS = {"pretrain": PRETRAIN_DEFAULTS, "finetune": FINETUNE_DEFAULTS, "probe": PROBE_DEFAULTS}
SUPERVISED_STAGES = ("finetune", "probe")  # stages that train on labels, start from init_from and test at the end


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


# A DeepSpeed JSON block of ours: settings that apply only when the ranks are CPU processes
# (gloo), merged over the JSON's own; DeepSpeed never sees the key.
CPU_RANKS_KEY = "cpu_ranks"


def ds_json_for(path: str, device: str) -> dict:
    """The DeepSpeed JSON at `path` as the ranks on `device` ("gpu" or "cpu") use it: comment
    keys (leading "_") dropped and, on CPU ranks, the `cpu_ranks` block merged over the rest
    (one level deep: `cpu_ranks.zero_optimization` updates `zero_optimization`)."""
    import json

    ds = {k: v for k, v in json.loads(resolve_ds_config(path).read_text()).items() if not k.startswith("_")}
    on_cpu = ds.pop(CPU_RANKS_KEY, None) or {}
    if device != "cpu":
        return ds
    for key, value in on_cpu.items():
        ds[key] = {**ds[key], **value} if isinstance(value, dict) and isinstance(ds.get(key), dict) else value
    return ds


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


# DeepSpeed keys the run config computes (scaling/train/engine.py merges them into the JSON).
DS_OWNED_KEYS = {"train_batch_size": "train.global_batch", "train_micro_batch_size_per_gpu": "train.global_batch",
                 "gradient_accumulation_steps": "train.grad_accum", "gradient_clipping": "optim.clip_grad",
                 "bf16": "train.precision", "fp16": "train.precision", "optimizer": "optim.*",
                 "scheduler": "optim.* (warmup-cosine)"}


