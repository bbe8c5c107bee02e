"""Experiment tracking: MLflow on rank 0, a tracker that does nothing on every other rank."""
from __future__ import annotations

import os


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class NullTracker:
    run_id: str | None = None

    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict, step: int) -> None: ...
    def log_artifact(self, path: str, artifact_path: str | None = None) -> None: ...
    def log_dict(self, data: dict, name: str) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class MLflowTracker:
    """One MLflow run; `run_id` given resumes that run (a resumed training continues its run)."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str = "", run_id: str | None = None,
                 parent_run_id: str = "", tags: dict | None = None):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri_or_default(tracking_uri))
        if run_id:
            self.run = mlflow.start_run(run_id=run_id)
        else:
            mlflow.set_experiment(experiment)
            self.run = mlflow.start_run(run_name=run_name or None, parent_run_id=parent_run_id or None,
                                        tags={**slurm_tags(), **(tags or {})})
        self.run_id = self.run.info.run_id

    def log_params(self, params: dict) -> None:
        existing = self.mlflow.get_run(self.run_id).data.params
        # MLflow refuses to change a logged param; on resume only new keys are logged.
        fresh = {k: str(v) for k, v in params.items() if k not in existing}
        if fresh:
            self.mlflow.log_params(fresh)

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self.mlflow.log_artifact(path, artifact_path)

    def log_dict(self, data: dict, name: str) -> None:
        self.mlflow.log_dict(data, name)

    def close(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)


def tracking_uri_or_default(uri: str = "") -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def slurm_tags() -> dict:
    """The Slurm job a run belongs to, when there is one (lineage across requeues)."""
    return {"slurm_job_id": os.environ["SLURM_JOB_ID"]} if "SLURM_JOB_ID" in os.environ else {}


def make_tracker(rank: int, enabled: bool, tracking_uri: str, experiment: str, run_name: str = "",
                 run_id: str | None = None, parent_run_id: str = "", tags: dict | None = None):
    if rank != 0 or not enabled:
        return NullTracker()
    return MLflowTracker(tracking_uri, experiment, run_name, run_id, parent_run_id, tags)
