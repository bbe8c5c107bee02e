"""Constants and helpers the test files share (on sys.path through pytest's `pythonpath`)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "pipelines" / "pretrain_smoke.yaml"
SCALING = [sys.executable, "-m", "scaling.cli"]
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")


def env_for(where: Path | str, **extra) -> dict:
    """The environment for `scaling` subprocesses that start ranks: none of this process's rank
    variables, this checkout's package first, MLflow in `where` (a folder: <where>/mlflow.db; a
    string: that tracking URI)."""
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
    env["MLFLOW_TRACKING_URI"] = where if isinstance(where, str) else f"sqlite:///{where / 'mlflow.db'}"
    # The checkout first; tests/ too, for a test file that runs itself as a script and imports helpers.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests")])
    return {**env, **extra}
