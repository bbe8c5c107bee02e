"""Progressive pipelines: spec (load/merge/select), state (fingerprints, set-aside, markers),
lineage (MLflow), the local runner and Slurm submission (`slurm`), and `show`."""
from scaling.config import merge
from scaling.pipeline.local import StageFailed, StageStoppedEarly, run_pipeline
from scaling.pipeline.spec import EXPORT, Pipeline, Stage, load_pipeline, select

__all__ = ["EXPORT", "Pipeline", "Stage", "StageFailed", "StageStoppedEarly", "load_pipeline", "merge", "run_pipeline",
           "select"]
