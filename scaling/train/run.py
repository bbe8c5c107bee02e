"""What every training stage does before its first step: process group, resume, tracking."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import deepspeed
import torch.distributed as dist

from scaling.config import RunConfig, save_config, to_dict
from scaling.tracking import flatten, make_tracker
from scaling.train import checkpoint
from scaling.train.engine import build_ds_config
from scaling.train.schedule import resync_lr


def init_ranks() -> tuple[int, int]:
    # DeepSpeed still calls the collectives torch renamed; the warning repeats every step.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+. is deprecated", category=FutureWarning)
    deepspeed.init_distributed()
    return dist.get_rank(), dist.get_world_size()


def ds_config_for(cfg: RunConfig, rank: int, world: int) -> tuple[dict, str | None]:
    """The DeepSpeed config of this run and the checkpoint tag it resumes from (None: a fresh
    start). It loads a universal checkpoint when that tag was written by another number of
    ranks (a job requeued onto other nodes)."""
    out = Path(cfg.train.output_dir)
    if rank == 0:
        (out / checkpoint.FAILED_FILE).unlink(missing_ok=True)  # the error of an earlier run of this folder
    ds_config = build_ds_config(cfg, world)
    tag = checkpoint.choose_resume_tag(out / "checkpoints", rank, world)
    if checkpoint.prepare_universal(out / "checkpoints", tag, world, rank):
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    return ds_config, tag


def resume_and_track(engine, scheduler, cfg: RunConfig, rank: int, ds_config: dict, params: dict, tag: str | None):
    """Load checkpoint `tag` (if any) and open the MLflow run (the same one on resume).

    Rank 0 saves the resolved config and DeepSpeed JSON beside the checkpoints and logs them.
    Returns (client state of the checkpoint or {}, tracker)."""
    out = Path(cfg.train.output_dir)
    state = checkpoint.resume(engine, out / "checkpoints", tag) or {}
    if state.get("step"):
        resync_lr(scheduler)  # the run may have been resumed with a longer schedule
    t = cfg.tracking
    tracker = make_tracker(rank, t.enabled, t.tracking_uri, t.experiment, t.run_name, run_id=state.get("mlflow_run_id"),
                           parent_run_id=t.parent_run_id, tags={"stage_kind": cfg.stage})
    if rank == 0:
        save_config(cfg, out / "config.yaml")
        (out / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
        if tracker.run_id:
            (out / "mlflow_run_id").write_text(tracker.run_id)  # for the pipeline's lineage tags
        tracker.log_params({**flatten(to_dict(cfg)), **params})
        tracker.log_artifact(str(out / "config.yaml"))
        tracker.log_artifact(str(out / "ds_config.json"))
    return state, tracker
