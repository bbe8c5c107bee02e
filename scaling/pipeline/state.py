"""A stage's state on disk: the fingerprint (config + starting weights) it was started and
finished with (STARTED.json, DONE.json), setting aside a folder whose fingerprint changed, and
the fp32 export the next stage starts from."""
from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path

from scaling.config import ConfigError, RunConfig, save_config, to_dict
from scaling.config.schema import SUPERVISED_STAGES
from scaling.pipeline.spec import Pipeline, Stage
from scaling.tracking import flatten

STARTED, DONE = "STARTED.json", "DONE.json"  # the fingerprint a stage was launched / finished with


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
    init = stage.config.finetune.init_from if stage.config.stage in SUPERVISED_STAGES else ""
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


