"""A pipeline YAML -> typed stages: load, merge the defaults under each stage, validate, select.

    name: smoke
    output_dir: runs/smoke
    ranks: 2
    tracking: {experiment: smoke}
    defaults: {model: {name: debug}, ...}      # merged under every stage
    stages:                                    # run in this order
      pretrain: {stage: pretrain, ...}         # each a run config (scaling/config/)
      postpretrain: {stage: finetune, finetune: {init_from: previous, ...}}
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from scaling.config import ConfigError, RunConfig, apply_overrides, build_run_config, merge, read_yaml, validate

EXPORT = Path("export") / "model_fp32.pt"
PIPELINE_KEYS = {"name", "output_dir", "ranks", "tracking", "defaults", "stages", "slurm"}


@dataclass
class Stage:
    name: str
    config: RunConfig

    @property
    def dir(self) -> Path:
        return Path(self.config.train.output_dir)

    @property
    def export(self) -> Path:
        return self.dir / EXPORT


@dataclass
class Pipeline:
    name: str
    output_dir: Path
    ranks: int
    stages: list[Stage]
    raw: dict  # the YAML with overrides applied (what `pipeline submit` hands to its jobs)

    def stage(self, name: str) -> Stage:
        names = [s.name for s in self.stages]
        if name not in names:
            raise ConfigError(f"no stage '{name}' in pipeline '{self.name}'; stages are {', '.join(names)}")
        return self.stages[names.index(name)]

    def previous(self, stage: Stage) -> Stage | None:
        i = self.stages.index(stage)
        return self.stages[i - 1] if i else None


def load_pipeline(path: str, overrides: list[str] = (), only: str | None = None) -> Pipeline:
    """Every stage is typed; every stage (or `only` that one) is validated against files and ranks."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"pipeline file '{path}' does not exist; pass one of pipelines/*.yaml")
    raw = apply_overrides(read_yaml(p), list(overrides))
    unknown = set(raw) - PIPELINE_KEYS
    if unknown:
        raise ConfigError(f"unknown pipeline key(s) {sorted(unknown)}; valid keys are: {', '.join(sorted(PIPELINE_KEYS))}")
    if not raw.get("stages"):
        raise ConfigError(f"pipeline '{path}' has no stages; add a 'stages:' mapping of stage name -> run config")
    name = raw.setdefault("name", p.stem)
    out = Path(raw.get("output_dir", f"runs/{name}"))
    ranks = raw.get("ranks", 1)
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise ConfigError(f"pipeline key 'ranks' must be a whole number of at least 1, got {ranks!r}")
    stages = []
    for stage_name, body in raw["stages"].items():
        data = merge(raw.get("defaults", {}), body or {})
        data = merge(data, {"train": {"output_dir": str(out / stage_name), "ranks": ranks},
                            "tracking": merge(raw.get("tracking", {}), {"run_name": stage_name})})
        try:
            cfg = build_run_config(data)
            if only in (None, stage_name):
                validate(cfg, ranks)
        except ConfigError as e:
            raise ConfigError(f"stage '{stage_name}': {e}") from None
        if not stages and cfg.finetune.init_from == "previous":
            raise ConfigError(f"stage '{stage_name}' is the first stage, so init_from: previous has nothing to start from")
        stages.append(Stage(stage_name, cfg))
    return Pipeline(name, out, ranks, stages, raw)


def select(stages: list[Stage], start: str | None, until: str | None) -> list[Stage]:
    names = [s.name for s in stages]
    for flag, value in (("--from", start), ("--until", until)):
        if value is not None and value not in names:
            raise ConfigError(f"{flag} {value}: no such stage; stages are {', '.join(names)}")
    lo = names.index(start) if start else 0
    hi = names.index(until) + 1 if until else len(names)
    return stages[lo:hi]


