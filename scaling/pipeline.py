"""Run a progressive pipeline (pre-train -> post-pre-train -> fine-tune) from one YAML.

    name: smoke
    output_dir: runs/smoke
    ranks: 2
    tracking: {experiment: smoke}
    defaults: {model: {name: debug}, ...}      # merged under every stage
    stages:                                    # run in this order
      pretrain: {stage: pretrain, ...}         # each a run config (scaling/config.py)
      postpretrain: {stage: finetune, finetune: {init_from: previous, ...}}

Each stage trains in `<output_dir>/<stage>/`, exports consolidated fp32 weights to
`<stage>/export/model_fp32.pt` and records `<stage>/DONE.json`; the next stage starts from
that export (`init_from: previous`). A re-run skips stages whose DONE.json matches their
config and resumes an interrupted stage from its last checkpoint. MLflow: one parent run per
pipeline, one nested run per stage.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from scaling.config import ConfigError, RunConfig, _build, apply_overrides, save_config, to_dict, validate

EXPORT = Path("export") / "model_fp32.pt"
PIPELINE_KEYS = {"name", "output_dir", "ranks", "tracking", "defaults", "stages"}


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


def merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_pipeline(path: str, overrides: list[str] = ()) -> Pipeline:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"pipeline file '{path}' does not exist; pass one of pipelines/*.yaml")
    raw = apply_overrides(yaml.safe_load(p.read_text()) or {}, list(overrides))
    unknown = set(raw) - PIPELINE_KEYS
    if unknown:
        raise ConfigError(f"unknown pipeline key(s) {sorted(unknown)}; valid keys are: {', '.join(sorted(PIPELINE_KEYS))}")
    if not raw.get("stages"):
        raise ConfigError(f"pipeline '{path}' has no stages; add a 'stages:' mapping of stage name -> run config")
    name = raw.get("name", p.stem)
    out = Path(raw.get("output_dir", f"runs/{name}"))
    ranks = int(raw.get("ranks", 1))
    stages = []
    for stage_name, body in raw["stages"].items():
        data = merge(raw.get("defaults", {}), body or {})
        data = merge(data, {"train": {"output_dir": str(out / stage_name), "ranks": ranks},
                            "tracking": merge(raw.get("tracking", {}), {"run_name": stage_name})})
        try:
            cfg = _build(RunConfig, data)
            validate(cfg, ranks)
        except ConfigError as e:
            raise ConfigError(f"stage '{stage_name}': {e}") from None
        if not stages and cfg.finetune.init_from == "previous":
            raise ConfigError(f"stage '{stage_name}' is the first stage, so init_from: previous has nothing to start from")
        stages.append(Stage(stage_name, cfg))
    return Pipeline(name, out, ranks, stages)


def select(stages: list[Stage], start: str | None, until: str | None) -> list[Stage]:
    names = [s.name for s in stages]
    for flag, value in (("--from", start), ("--until", until)):
        if value is not None and value not in names:
            raise ConfigError(f"{flag} {value}: no such stage; stages are {', '.join(names)}")
    lo = names.index(start) if start else 0
    hi = names.index(until) + 1 if until else len(names)
    return stages[lo:hi]


def fingerprint(cfg: RunConfig) -> dict:
    """What decides a stage's weights: its config as JSON would store it, tracking left out."""
    return json.loads(json.dumps({k: v for k, v in to_dict(cfg).items() if k != "tracking"}))


def finished(stage: Stage) -> bool:
    """Done and exported with exactly this config (a changed config runs the stage again)."""
    done = stage.dir / "DONE.json"
    return stage.export.is_file() and done.is_file() and json.loads(done.read_text())["config"] == fingerprint(stage.config)


def run_pipeline(path: str, overrides: list[str] = (), start: str | None = None, until: str | None = None) -> dict:
    from scaling.launch import launch_local
    from scaling.train.checkpoint import export_fp32

    pipe = load_pipeline(path, overrides)
    todo = select(pipe.stages, start, until)
    lineage = Lineage(pipe)
    previous: Stage | None = None
    names = [s.name for s in pipe.stages]
    if todo and names.index(todo[0].name) > 0:
        previous = pipe.stages[names.index(todo[0].name) - 1]
    summary = {}
    for stage in todo:
        cfg = stage.config
        if cfg.finetune.init_from == "previous":
            if previous is None or not previous.export.is_file():
                raise ConfigError(f"stage '{stage.name}' starts from stage '{previous.name if previous else '?'}', "
                                  f"whose weights {previous.export if previous else ''} do not exist; run that stage first")
            cfg.finetune.init_from = str(previous.export)
        cfg.tracking.parent_run_id = lineage.parent_id
        if finished(stage):
            print(f"[pipeline] {stage.name}: finished earlier, weights {stage.export}", flush=True)
        else:
            print(f"[pipeline] {stage.name}: running ({cfg.stage}, {pipe.ranks} ranks) in {stage.dir}", flush=True)
            resolved = stage.dir / "config.launch.yaml"
            save_config(cfg, resolved)
            code = launch_local("train", resolved, pipe.ranks)
            if code != 0:
                lineage.close("FAILED")
                raise RuntimeError(f"stage '{stage.name}' failed (exit {code}); fix the cause and re-run the same "
                                   "command: finished stages are skipped and this one resumes from its last checkpoint")
            export_fp32(stage.dir / "checkpoints", stage.export, extra={"config": to_dict(cfg), "stage": stage.name})
            (stage.dir / "DONE.json").write_text(json.dumps({"config": fingerprint(cfg), "weights": str(stage.export)}))
        summary[stage.name] = lineage.record(stage, previous)
        previous = stage
    lineage.close("FINISHED")
    return summary


class Lineage:
    """The pipeline's parent MLflow run (reused by every re-run of the same output_dir)."""

    def __init__(self, pipe: Pipeline):
        from mlflow import MlflowClient

        from scaling.tracking import slurm_tags, tracking_uri_or_default

        first = pipe.stages[0].config.tracking
        self.client = MlflowClient(tracking_uri_or_default(first.tracking_uri))
        self.enabled = first.enabled
        self.parent_id = ""
        if not self.enabled:
            return
        record = pipe.output_dir / "pipeline_run.json"
        if record.is_file():
            self.parent_id = json.loads(record.read_text())["run_id"]
            self.client.update_run(self.parent_id, status="RUNNING")
        else:
            exp = self.client.get_experiment_by_name(first.experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(first.experiment)
            run = self.client.create_run(exp_id, run_name=f"pipeline:{pipe.name}", tags={"pipeline": pipe.name, **slurm_tags()})
            self.parent_id = run.info.run_id
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps({"run_id": self.parent_id}))

    def record(self, stage: Stage, previous: Stage | None) -> dict:
        """Tag the stage's run with where its weights came from and went; copy its results up."""
        info = {"weights": str(stage.export)}
        eval_file = stage.dir / "eval.json"
        if eval_file.is_file():
            info.update({k: v for k, v in json.loads(eval_file.read_text()).items() if k in ("top1", "top5", "videos")})
        if not self.enabled:
            return info
        run_file = stage.dir / "mlflow_run_id"
        if run_file.is_file():
            run_id = run_file.read_text().strip()
            info["run_id"] = run_id
            self.client.set_tag(run_id, "stage", stage.name)
            self.client.set_tag(run_id, "weights_path", str(stage.export))
            if previous is not None and (previous.dir / "mlflow_run_id").is_file():
                self.client.set_tag(run_id, "weights_from_run", (previous.dir / "mlflow_run_id").read_text().strip())
        self.client.set_tag(self.parent_id, f"{stage.name}.weights", str(stage.export))
        for key in ("top1", "top5"):
            if key in info:
                self.client.log_metric(self.parent_id, f"{stage.name}.{key}", info[key])
        return info

    def close(self, status: str) -> None:
        if self.enabled and self.parent_id:
            self.client.set_terminated(self.parent_id, status=status)

