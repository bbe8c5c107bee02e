"""The run skeleton both training loops share: ranks and DeepSpeed config, resume and
tracking, seeds per step, the end of each step (divergence, save, agreed stop), logging, close."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from scaling.config import RunConfig, save_config, to_dict
from scaling.precision import agree_on_precision
from scaling.tracking import flatten, make_tracker
from scaling.train import checkpoint
from scaling.train.engine import build_ds_config
from scaling.train.guard import Diverged, DivergenceGuard
from scaling.train.schedule import resync_lr
from scaling.train.signals import StopRequest


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
    agree_on_precision(cfg)  # rank 0's train.precision on every rank, before the DeepSpeed config uses it
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
                           parent_run_id=t.parent_run_id, tags={"stage_kind": cfg.stage}, system_metrics=t.system_metrics)
    if rank == 0:
        save_config(cfg, out / "config.yaml")
        (out / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
        if tracker.run_id:
            (out / "mlflow_run_id").write_text(tracker.run_id)  # for the pipeline's lineage tags
        tracker.log_params({**flatten(to_dict(cfg)), **params})
        tracker.log_artifact(str(out / "config.yaml"))
        tracker.log_artifact(str(out / "ds_config.json"))
    return state, tracker


def step_seed(seed: int, step: int, micro: int = 0, rank: int = 0) -> int:
    return hash((seed, step, micro, rank)) & 0x7FFF_FFFF

def client_state(step: int, tracker, seed: int, **extra) -> dict:
    """What a checkpoint records beside the weights: the step, the MLflow run a resume reopens, the seed."""
    return {"step": step, "mlflow_run_id": tracker.run_id, "seed": seed, **extra}


def end_of_step(engine, cfg: RunConfig, guard: DivergenceGuard, stop: StopRequest, tracker, rank: int, done: int,
                end: int, finite: bool, loss: float, state: dict) -> bool:
    """After step `done`: end a diverged run; save at save_every (a finite step), at the end, or at
    an agreed stop (preemption notice, wall-time guard on any rank). True: stop here."""
    out = Path(cfg.train.output_dir)
    stop_if_diverged(guard, tracker, out, rank)
    stopping = stop.agreed()
    if (done % cfg.train.save_every == 0 and finite) or done == end or stopping:
        checkpoint.save(engine, out / "checkpoints", done, state, cfg.train.keep_checkpoints, loss)
    if stopping and done < end:
        stop.record(done)
        return True
    return False


def close_run(tracker, stop: StopRequest, rank: int) -> None:
    """A run that returns ends FINISHED (KILLED when it stopped early; a resume reopens it); one
    that raises is closed FAILED by `closes_runs_on_error` around the loop."""
    if rank == 0:
        tracker.close("KILLED" if stop.stopped_at else "FINISHED")
    dist.barrier()


def stop_if_diverged(guard: DivergenceGuard, tracker, out: Path, rank: int) -> None:
    """End a diverged run, marked FAILED (MLflow, <output_dir>/FAILED), before it saves again."""
    try:
        guard.raise_if_diverged()
    except Diverged as e:
        if rank == 0:
            print(f"[scaling] error: {e}", flush=True)
            checkpoint.record_failure(out, str(e))
            tracker.close("FAILED")
        dist.barrier()  # no rank ends before rank 0 has recorded it (the launcher stops the rest when one ends)
        raise


def log_step(tracker, out: Path, step: int, total: int, metrics: dict, line: str = "") -> None:
    """MLflow, a metrics.jsonl beside the checkpoints (what tests and scripts read), one console
    line (`line`, e.g. StepMetrics.line, or a short default)."""
    tracker.log_metrics(metrics, step=step)
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")
    print(line or f"[scaling] step {step}/{total} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
          f"{metrics['step_time_s']:.2f}s/step {metrics['clips_per_s']:.1f} clips/s", flush=True)


def summed(counters: dict) -> dict:
    """Sum a dict of counters over ranks (every rank must call it, with the same keys)."""
    keys = sorted(counters)
    if not keys:
        return {}
    values = torch.tensor([float(counters[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    return dict(zip(keys, values.tolist()))


def local_env_for_single_process() -> None:
    """A 1-rank run started without a launcher still needs a process group."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        from scaling.launch import free_port

        os.environ["MASTER_PORT"] = str(free_port())
