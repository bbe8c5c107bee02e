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
config and starting weights, and resumes an interrupted stage from its last checkpoint. A
stage whose config or starting weights changed since it was started (a re-run upstream stage
counts) is moved aside to `<stage>.replaced-<time>/` and starts afresh: resuming would mix
two runs. MLflow: one parent run per
pipeline, one nested run per stage; the parent ends FINISHED, KILLED or FAILED as the pipeline
did. A stage that fails ends the pipeline with one sentence naming the stage, the error its
ranks raised and its log (`<stage>/logs/`, where torchrun keeps every rank's output).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path


from scaling.config import ConfigError, RunConfig, apply_overrides, build_run_config, read_yaml, save_config, to_dict, validate
from scaling.tracking import first_line, flatten, warn

EXPORT = Path("export") / "model_fp32.pt"
STARTED, DONE = "STARTED.json", "DONE.json"  # the fingerprint a stage was launched / finished with
PIPELINE_KEYS = {"name", "output_dir", "ranks", "tracking", "defaults", "stages", "slurm"}


class StageStoppedEarly(RuntimeError):
    """A stage saved a checkpoint and stopped before its end (preemption notice, wall-time guard)."""


class StageFailed(RuntimeError):
    """A stage's ranks exited with an error; the message names the stage, the cause and its log."""


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


def merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


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


def fingerprint(cfg: RunConfig, weights_in: str) -> dict:
    """What decides a stage's weights: its config and the identity of the weights it starts
    from, as JSON would store them. Left out: tracking (it names runs, not weights) and the rank
    count (the global batch is fixed, and a stage resumes on another rank count through a
    universal checkpoint, e.g. when a requeued Slurm job lands on fewer nodes)."""
    config = {k: v for k, v in to_dict(cfg).items() if k != "tracking"}
    config["train"] = {k: v for k, v in config["train"].items() if k != "ranks"}
    return json.loads(json.dumps({"config": config, "weights_in": weights_in}))


def digest(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def weights_in(stage: Stage, previous: Stage | None, from_previous: bool) -> str:
    """The identity of the weights a supervised stage starts from: the previous stage's digest
    (so a stage that ran again upstream makes every later stage run again), or a checkpoint
    file's path, size and modification time."""
    init = stage.config.finetune.init_from if stage.config.stage == "finetune" else ""
    if from_previous:
        return "stage:" + json.loads((previous.dir / DONE).read_text()).get("digest", "")
    if init:
        st = Path(init).stat()
        return f"file:{Path(init).resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return ""


def recorded(path: Path) -> dict | None:
    return json.loads(path.read_text()).get("fingerprint") if path.is_file() else None


def finished(stage: Stage, fp: dict) -> bool:
    """Done and exported with exactly this config and these starting weights."""
    return stage.export.is_file() and recorded(stage.dir / DONE) == fp


def set_aside_if_changed(stage: Stage, fp: dict) -> None:
    """A stage folder started under another config or from other weights is moved aside (never
    deleted), so the stage starts afresh instead of resuming checkpoints of a different run."""
    old = recorded(stage.dir / STARTED)
    if old is None or old == fp:
        return  # new, or interrupted with this very config: the stage resumes its checkpoints
    new, before = flatten(fp), flatten(old)
    changed = sorted(k.removeprefix("config.") for k in set(new) | set(before) if new.get(k) != before.get(k))
    aside = stage.dir.with_name(f"{stage.dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    while aside.exists():  # changed twice within a second
        aside = aside.with_name(aside.name + "+")
    stage.dir.rename(aside)
    what = ", ".join("the weights it starts from" if k == "weights_in" else k for k in changed[:6])
    print(f"[pipeline] {stage.name}: changed since it was started ({what}); its old folder is now {aside}, "
          "the stage starts afresh", flush=True)


def resolve(pipe: Pipeline, stage: Stage, parent_run_id: str) -> tuple[RunConfig, dict]:
    """The stage's run config as it will run (`init_from: previous` -> the previous stage's
    export) and its fingerprint. The previous stage must have finished."""
    cfg = copy.deepcopy(stage.config)
    previous = pipe.previous(stage)
    from_previous = cfg.finetune.init_from == "previous"
    if from_previous:
        if not (previous.dir / DONE).is_file() or not previous.export.is_file():
            raise ConfigError(f"stage '{stage.name}' starts from stage '{previous.name}', whose weights "
                              f"{previous.export} do not exist; run that stage first")
        cfg.finetune.init_from = str(previous.export)
    cfg.tracking.parent_run_id = parent_run_id
    return cfg, fingerprint(cfg, weights_in(stage, previous, from_previous))


def start_stage(stage: Stage, cfg: RunConfig, fp: dict) -> Path:
    """Make the stage folder ready to (re)start: set aside if changed, record the fingerprint it
    started with, write the run config every rank reads. Returns that config's path."""
    set_aside_if_changed(stage, fp)
    stage.dir.mkdir(parents=True, exist_ok=True)
    (stage.dir / STARTED).write_text(json.dumps({"fingerprint": fp}))
    resolved = stage.dir / "config.launch.yaml"
    save_config(cfg, resolved)
    return resolved


def complete_stage(stage: Stage, cfg: RunConfig, fp: dict) -> None:
    """After the ranks finished: consolidated fp32 weights for the next stage, then DONE.json."""
    from scaling.train.checkpoint import export_fp32

    export_fp32(stage.dir / "checkpoints", stage.export, extra={"config": to_dict(cfg), "stage": stage.name})
    (stage.dir / DONE).write_text(json.dumps({"fingerprint": fp, "digest": digest(fp), "weights": str(stage.export)}))


def run_pipeline(path: str, overrides: list[str] = (), start: str | None = None, until: str | None = None) -> dict:
    """Run the stages; the parent MLflow run ends FINISHED, KILLED (a stage stopped early,
    Ctrl-C) or FAILED (a stage failed, anything raised)."""
    from scaling.tracking import probe_store

    pipe = load_pipeline(path, overrides)
    todo = select(pipe.stages, start, until)
    first = pipe.stages[0].config.tracking
    if first.enabled:
        probe_store(first.tracking_uri)
    lineage = Lineage(pipe)
    try:
        summary = run_stages(pipe, todo, lineage)
    except (StageStoppedEarly, KeyboardInterrupt):
        lineage.close("KILLED")
        raise
    except BaseException:
        lineage.close("FAILED")
        raise
    lineage.close("FINISHED")
    return summary


def run_stages(pipe: Pipeline, todo: list[Stage], lineage: Lineage) -> dict:
    from scaling.train.signals import stopped_early

    summary = {}
    for stage in todo:
        cfg, fp = resolve(pipe, stage, lineage.parent_id)
        if finished(stage, fp):
            print(f"[pipeline] {stage.name}: finished earlier, weights {stage.export}", flush=True)
        else:
            config = start_stage(stage, cfg, fp)
            print(f"[pipeline] {stage.name}: running ({cfg.stage}, {pipe.ranks} ranks) in {stage.dir}", flush=True)
            code = launch_stage(stage, config, pipe.ranks)
            if code != 0:
                lineage.fail_stage_run(stage)
                raise stage_failed(stage, code)
            early = stopped_early(stage.dir)
            if early:
                raise StageStoppedEarly(f"stage '{stage.name}' stopped early at step {early['step']} ({early['reason']}) "
                                        "with its checkpoint saved; re-run the same command to resume it")
            complete_stage(stage, cfg, fp)
        summary[stage.name] = lineage.record(stage, pipe.previous(stage))
    return summary


LOGS = "logs"
TORCHRUN_LOG_ENV = {"PET_LOG_DIR": None, "PET_TEE": "3"}  # torchrun's --log-dir and --tee, read from its environment


def launch_stage(stage: Stage, config: Path, ranks: int) -> int:
    """The stage's ranks on this machine; torchrun also writes every rank's output under
    <stage>/logs/<run>/attempt_<n>/<local rank>/{stdout,stderr}.log, which a failure names."""
    from scaling.launch import launch_local

    logs = stage.dir / LOGS
    logs.mkdir(parents=True, exist_ok=True)
    saved = {k: os.environ.get(k) for k in TORCHRUN_LOG_ENV}
    os.environ.update({k: v or str(logs) for k, v in TORCHRUN_LOG_ENV.items()})
    try:
        return launch_local("train", config, ranks)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


ERROR_LINE = re.compile(r"^(?:\[[^\]]*\]:?\s*)?([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)\b.*)$")


def stage_failed(stage: Stage, code: int) -> StageFailed:
    """One sentence: the stage, its exit code, the error its ranks raised and the log holding it."""
    log, cause = failure_log(stage.dir / LOGS)
    where = f"; its log is {log}" if log else f"; its ranks' output is above (no log under {stage.dir / LOGS})"
    because = f" with {cause}" if cause else ""
    return StageFailed(f"stage '{stage.name}' failed (exit {code}){because}{where}; fix the cause and re-run the same "
                       "command: finished stages are skipped and this one resumes from its last checkpoint")


def failure_log(logs: Path) -> tuple[Path | None, str]:
    """The newest launch's rank log that holds an error, and that error's last line."""
    launches = sorted((d for d in logs.glob("*") if d.is_dir()), key=lambda d: d.stat().st_mtime)
    if not launches:
        return None, ""
    files = sorted(launches[-1].glob("attempt_*/*/stderr.log"))
    for f in files:
        errors = [m.group(1) for line in f.read_text(errors="replace").splitlines() if (m := ERROR_LINE.match(line.strip()))]
        if errors:
            return f, errors[-1][:300]
    return (files[0] if files else launches[-1]), ""


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
        try:
            self.tag_runs(stage, previous, info)
        except Exception as e:  # noqa: BLE001 - the stage's weights are done; lineage tags must not fail the pipeline
            warn(f"could not record stage '{stage.name}' in MLflow ({first_line(e)}); its weights are {stage.export}")
        return info

    def tag_runs(self, stage: Stage, previous: Stage | None, info: dict) -> None:
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

    def close(self, status: str) -> None:
        """The parent run's final status; a store that does not answer gets a warning, not a crash."""
        if self.enabled and self.parent_id:
            try:
                self.client.set_terminated(self.parent_id, status=status)
            except Exception as e:  # noqa: BLE001
                warn(f"could not mark pipeline run {self.parent_id} {status} in MLflow ({first_line(e)})")

    def fail_stage_run(self, stage: Stage) -> None:
        """A stage whose ranks died without closing their run (killed, out of memory) leaves it
        RUNNING; it failed."""
        from scaling.tracking import end_if_still_running

        if self.enabled:
            end_if_still_running(stage.config.tracking.tracking_uri, stage.dir)
