"""Shared fixtures and markers.

Tiers: tests/unit (no ranks, no Slurm, tiny synthetic videos; `make test-fast`) and
tests/integration (ranks, pipelines, Slurm; marked `integration` here). `make test` runs both.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers import REPO, SCALING

INTEGRATION = REPO / "tests" / "integration"


def pytest_collection_modifyitems(items):
    for item in items:
        if INTEGRATION in Path(item.fspath).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory):
    """`scaling synth` shards, built once per test run for each (videos, per shard, seed):
    synth_shards(24, 6) -> the folder holding synth-000000.tar ... synth-000003.tar."""
    built: dict[tuple, Path] = {}

    def make(num_videos: int, per_shard: int, seed: int = 0) -> Path:
        key = (num_videos, per_shard, seed)
        if key not in built:
            out = tmp_path_factory.mktemp(f"synth_{num_videos}_{per_shard}_{seed}")
            subprocess.run([*SCALING, "synth", "--out", str(out), "--num-videos", str(num_videos),
                            "--per-shard", str(per_shard), "--seed", str(seed)], check=True, timeout=300)
            built[key] = out
        return built[key]

    return make


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node Slurm started by tests/integration/slurm/cluster.sh (needs root or Slurm
    installed); yields the environment its commands need."""
    cluster = INTEGRATION / "slurm" / "cluster.sh"
    root = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SCALING_SLURM_ROOT": str(root)}
    started = subprocess.run(["bash", str(cluster), "start"], env=env, capture_output=True, text=True, timeout=600)
    assert started.returncode == 0, started.stdout + started.stderr
    env["SLURM_CONF"] = str(root / "slurm.conf")
    yield env
    subprocess.run(["bash", str(cluster), "stop"], env=env, timeout=60)
