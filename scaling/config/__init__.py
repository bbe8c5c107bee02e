"""One typed config per run: dataclasses, YAML loading, dotted overrides (schema.py), and the
checks `validate()` runs against the world (ranks, files) before any rank is launched (checks.py).

`load_config("pipelines/pretrain_smoke.yaml", ["train.steps=40"])` returns a `RunConfig`; unknown
keys and values of the wrong type are refused with the dotted key and the fix.
"""
from scaling.config.checks import validate, validate_counts, validate_ds_json, validate_finetune, validate_mar
from scaling.config.schema import (
    DS_OWNED_KEYS,
    REPO_ROOT,
    ConfigError,
    DataConfig,
    FinetuneConfig,
    MaskConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrackingConfig,
    TrainConfig,
    apply_overrides,
    build_run_config,
    data_sources,
    ds_json_for,
    from_dict,
    load_config,
    merge,
    micro_batch,
    parse_yaml,
    read_yaml,
    resolve_ds_config,
    save_config,
    to_dict,
    with_stage_defaults,
)

__all__ = [
    "DS_OWNED_KEYS", "REPO_ROOT", "ConfigError", "DataConfig", "FinetuneConfig", "MaskConfig", "ModelConfig",
    "OptimConfig", "RunConfig", "TrackingConfig", "TrainConfig", "apply_overrides", "build_run_config", "data_sources",
    "ds_json_for", "from_dict", "load_config", "merge", "micro_batch", "parse_yaml", "read_yaml", "resolve_ds_config", "save_config",
    "to_dict", "validate", "validate_counts", "validate_ds_json", "validate_finetune", "validate_mar",
    "with_stage_defaults",
]
