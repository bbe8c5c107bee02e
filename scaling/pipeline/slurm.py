"""A pipeline on Slurm: one batch job per stage, chained with `--dependency=afterok`.

    slurm:                       # optional; `slurm.nodes=2`-style overrides work too
      nodes: 8                   # per job, unless a stage says otherwise
      gpus_per_node: 8
      cpus_per_task: 80
      time: "120:00:00"
      partition: gpu
      signal_s: 900              # the preemption / time-limit warning (--signal=B:USR1@900)
      sbatch: ["--account=vid"]  # passed to every sbatch as they are
      stages: {finetune: {nodes: 4, time: "24:00:00"}}

`submit` validates every stage for its own rank count, skips stages that finished earlier, and
submits the rest; the first job to submit depends on nothing, every later one on the job
before it (`afterok`, with `--kill-on-invalid-dep=yes`, so a failed stage cancels the ones
after it). Each job runs `slurm/launch.sh`, which calls `prepare` before the ranks start
(resolve the stage, set it aside if changed, write its run config) and `complete` after them
(export, DONE.json, MLflow lineage). The jobs read a frozen copy of the pipeline YAML, with
the submit command's overrides applied, so editing the YAML while they wait changes nothing.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from scaling.config import REPO_ROOT, ConfigError, RunConfig, data_sources, resolve_ds_config, validate
from scaling.data.sources import expand_shards
from scaling.errors import UserError
from scaling.pipeline.lineage import Lineage
from scaling.pipeline.spec import Pipeline, Stage, load_pipeline
from scaling.pipeline.state import complete_stage, finished, resolve, start_stage
from scaling.tracking import probe_store

LAUNCHER = REPO_ROOT / "slurm" / "launch.sh"  # the checkout's own launcher, beside scaling/


@dataclass
class JobShape:
    nodes: int = 1
    gpus_per_node: int = 8
    cpus_per_task: int = 0  # 0: the cluster's default
    time: str = ""  # "" : the partition's default
    partition: str = ""
    signal_s: int = 600
    sbatch: list = field(default_factory=list)


class SlurmMissing(UserError, RuntimeError):
    """No Slurm client on this machine."""


class SbatchRefused(UserError, RuntimeError):
    """sbatch refused a job (bad partition, account, limits): its own words."""


def job_shapes(pipe: Pipeline) -> dict[str, JobShape]:
    """Each stage's job shape: the `slurm:` defaults, then the stage's own entries."""
    spec = dict(pipe.raw.get("slurm") or {})
    per_stage = spec.pop("stages", {}) or {}
    known = {f.name for f in fields(JobShape)}
    for where, entries in [("slurm", spec)] + [(f"slurm.stages.{n}", e or {}) for n, e in per_stage.items()]:
        unknown = set(entries) - known
        if unknown:
            raise ConfigError(f"unknown key(s) {sorted(unknown)} in {where}; valid keys are: {', '.join(sorted(known))}")
    stray = set(per_stage) - {s.name for s in pipe.stages}
    if stray:
        raise ConfigError(f"slurm.stages names {sorted(stray)}, which are not stages of '{pipe.name}'")
    shapes = {s.name: JobShape(**{**spec, **(per_stage.get(s.name) or {})}) for s in pipe.stages}
    for name, shape in shapes.items():
        if shape.nodes < 1 or shape.gpus_per_node < 1:
            raise ConfigError(f"stage '{name}': slurm nodes and gpus_per_node must be at least 1")
    return shapes


def sbatch_args(pipe: Pipeline, stage: Stage, shape: JobShape, after: str | None) -> list[str]:
    logs = pipe.output_dir / "slurm"
    args = [f"--job-name={job_name(pipe, stage)}", f"--nodes={shape.nodes}", "--ntasks-per-node=1",
            f"--gres=gpu:{shape.gpus_per_node}", f"--signal=B:USR1@{shape.signal_s}", "--requeue",
            "--open-mode=append", f"--output={logs.resolve()}/{stage.name}-%j.out"]
    args += [f"--cpus-per-task={shape.cpus_per_task}"] if shape.cpus_per_task else []
    args += [f"--time={shape.time}"] if shape.time else []
    args += [f"--partition={shape.partition}"] if shape.partition else []
    args += [f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"] if after else []
    return args + [str(a) for a in shape.sbatch]


def job_name(pipe: Pipeline, stage: Stage) -> str:
    return f"{pipe.name}.{stage.name}"


def queued_jobs(name: str) -> list[str]:
    """Ids of this user's pending or running jobs with that name."""
    out = subprocess.run(["squeue", "-h", "--me", "-n", name, "-o", "%i"], capture_output=True, text=True, timeout=60)
    return out.stdout.split() if out.returncode == 0 else []


def submit_pipeline(path: str, overrides: list[str] = (), extra_sbatch: list[str] = (), dry_run: bool = False) -> list[dict]:
    """Submit the unfinished stages; returns [{"stage", "job_id" | "finished" | "sbatch"}] in order.
    A dry run checks the values only and lists each stage's missing inputs under "missing"
    (shards and weights not made yet), so the jobs can be previewed before the data exists."""
    pipe = load_pipeline(path, overrides, only="")  # typed here; each stage is validated below
    shapes = job_shapes(pipe)
    missing = {}
    for stage in pipe.stages:  # for the rank count its own job will have
        ranks = shapes[stage.name].nodes * shapes[stage.name].gpus_per_node
        if dry_run:
            missing[stage.name] = check_values(path, overrides, stage.name, ranks)
        else:  # everything, files included, before any sbatch
            load_pipeline(path, [*overrides, f"ranks={ranks}"], only=stage.name)
    if shutil.which("sbatch") is None and not dry_run:
        raise SlurmMissing("sbatch is not on PATH, so this machine cannot submit Slurm jobs; run the pipeline "
                           f"here with 'scaling pipeline run {path}', or submit from a Slurm login node")
    finished_first = []
    for stage in pipe.stages:  # the leading stages that need no job
        if not done_already(pipe, stage):
            break
        finished_first.append({"stage": stage.name, "finished": str(stage.export)})
    todo = pipe.stages[len(finished_first):]
    for stage in todo if shutil.which("squeue") else ():  # a dry run may preview from a machine without Slurm
        busy = queued_jobs(job_name(pipe, stage))
        if busy:
            raise ConfigError(f"stage '{stage.name}' already has Slurm job(s) {', '.join(busy)} queued or running; "
                              f"wait for them or 'scancel {' '.join(busy)}', then submit again")
    if dry_run or not todo:
        after = [None] + ["<job of the stage before>"] * len(todo)
        return finished_first + [{"stage": s.name, "missing": missing.get(s.name, []),
                                  "sbatch": ["sbatch", *sbatch_args(pipe, s, shapes[s.name], a), *extra_sbatch, str(LAUNCHER)]}
                                 for s, a in zip(todo, after)]
    if pipe.stages[0].config.tracking.enabled:  # the jobs would fail on a store they cannot write
        probe_store(pipe.stages[0].config.tracking.tracking_uri)
    frozen = pipe.output_dir / "slurm" / "pipeline.yaml"
    frozen.parent.mkdir(parents=True, exist_ok=True)
    frozen.write_text(yaml.safe_dump(pipe.raw, sort_keys=False))
    lineage = Lineage(pipe)  # the parent MLflow run exists before any job could start and look for it
    submitted, after = [], None
    for stage in todo:
        env = {**os.environ, "SCALING_PIPELINE": str(frozen.resolve()), "SCALING_STAGE": stage.name,
               "SCALING_OVERRIDES": "", "GPUS_PER_NODE": str(shapes[stage.name].gpus_per_node)}
        for knob in ("SCALING_CONFIG", "SCALING_OUTPUT"):  # these would make launch.sh run something else
            env.pop(knob, None)
        args = sbatch_args(pipe, stage, shapes[stage.name], after) + [*extra_sbatch]
        done = subprocess.run(["sbatch", "--parsable", *args, str(LAUNCHER)], env=env, capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            record_jobs(pipe, lineage, submitted)
            raise SbatchRefused(f"sbatch refused stage '{stage.name}': {done.stderr.strip()}"
                               + (f"; the jobs submitted before it ({after}) stay queued" if after else ""))
        after = done.stdout.strip().split(";")[0]
        submitted.append({"stage": stage.name, "job_id": after})
    record_jobs(pipe, lineage, submitted)
    return finished_first + submitted


def check_values(path: str, overrides: list[str], stage_name: str, ranks: int) -> list[str]:
    """Validate a stage's values for its job's rank count, leaving out the files it reads; return
    one sentence per input that does not exist yet (shards, starting weights)."""
    pipe = load_pipeline(path, [*overrides, f"ranks={ranks}"], only="")
    cfg = pipe.stage(stage_name).config
    try:
        validate(cfg, ranks, check_files=False)
        resolve_ds_config(cfg.train.ds_config)  # a file of the checkout, not data: it must exist now
    except ConfigError as e:
        raise ConfigError(f"stage '{stage_name}': {e}") from None
    return missing_inputs(cfg)


def missing_inputs(cfg: RunConfig) -> list[str]:
    """The stage's input files that do not exist (yet), one sentence each."""
    patterns = [(f"data source '{s.name}'", s.shards) for s in data_sources(cfg)] if cfg.data.source == "shards" else []
    if cfg.stage == "finetune" and cfg.finetune.val_shards:
        patterns.append(("finetune.val_shards", cfg.finetune.val_shards))
    out = []
    for what, shards in patterns:
        try:
            expand_shards(shards)
        except (ValueError, FileNotFoundError) as e:
            out.append(f"{what} has no files yet ({str(e).split('; check')[0]})")
    init = cfg.finetune.init_from if cfg.stage == "finetune" else ""
    if init not in ("", "previous") and not Path(init).is_file():
        out.append(f"finetune.init_from {init} does not exist yet")
    return out


def done_already(pipe: Pipeline, stage: Stage) -> bool:
    """Finished with its current config and starting weights (only asked while every stage
    before it is finished too)."""
    try:
        cfg, fp = resolve(pipe, stage, "")
    except ConfigError:
        return False  # its previous stage's weights are missing: it has to run
    return finished(stage, fp)


def record_jobs(pipe: Pipeline, lineage: Lineage, submitted: list[dict]) -> None:
    """Job ids into the pipeline's MLflow run (tags slurm_job.<stage>) and, one line per
    submission, into <output_dir>/slurm/jobs.jsonl."""
    with open(pipe.output_dir / "slurm" / "jobs.jsonl", "a") as f:
        f.write(json.dumps(submitted) + "\n")
    if lineage.enabled:
        for job in submitted:
            lineage.client.set_tag(lineage.parent_id, f"slurm_job.{job['stage']}", job["job_id"])


def prepare_for_job(path: str, stage_name: str, overrides: list[str] = ()) -> tuple[str, Path]:
    """Inside a stage's job, before the ranks start: ("done", dir) if nothing is left to do,
    else ("run", dir) with <dir>/config.launch.yaml written for the ranks."""
    pipe = load_pipeline(path, overrides, only=stage_name)
    stage = pipe.stage(stage_name)
    lineage = Lineage(pipe)
    cfg, fp = resolve(pipe, stage, lineage.parent_id)
    if finished(stage, fp):
        return "done", stage.dir
    start_stage(stage, cfg, fp)
    return "run", stage.dir


def complete_for_job(path: str, stage_name: str, exit_code: int, overrides: list[str] = ()) -> dict:
    """Inside a stage's job, after the ranks ended (not stopped early): export and record the
    stage if they succeeded; mark the pipeline run FAILED if they did not."""
    pipe = load_pipeline(path, overrides, only=stage_name)
    stage = pipe.stage(stage_name)
    lineage = Lineage(pipe)
    if exit_code != 0:
        lineage.fail_stage_run(stage)
        lineage.close("FAILED")
        return {}
    cfg, fp = resolve(pipe, stage, lineage.parent_id)
    if not finished(stage, fp):
        complete_stage(stage, cfg, fp)
    info = lineage.record(stage, pipe.previous(stage))
    if stage is pipe.stages[-1]:
        lineage.close("FINISHED")
    return info
