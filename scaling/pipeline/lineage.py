"""MLflow lineage of a pipeline: one parent run per pipeline output folder, one nested run per
stage, tagged with the stage it started from."""
from __future__ import annotations

import json

from scaling.pipeline.spec import Pipeline, Stage
from scaling.tracking import first_line, warn


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
