"""The slurm/ templates on a real one-node Slurm started by tests/slurm/cluster.sh (as root)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
TEMPLATES = sorted(p.name for p in (REPO / "slurm").glob("*.sh") if p.name != "launch.sh")
pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SCALING_SLURM_ROOT": str(root)}
    started = subprocess.run(["bash", str(CLUSTER), "start"], env=env, capture_output=True, text=True, timeout=600)
    assert started.returncode == 0, started.stdout + started.stderr
    env["SLURM_CONF"] = str(root / "slurm.conf")
    yield env
    subprocess.run(["bash", str(CLUSTER), "stop"], env=env, timeout=60)


@pytest.mark.parametrize("template", TEMPLATES)
def test_every_template_is_accepted_with_its_default_directives(slurm, template):
    out = subprocess.run(["sbatch", "--test-only", "--partition=sizing", f"slurm/{template}"], env=slurm, cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "to start at" in out.stderr, out.stderr


def job_state(env, job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return out.split("JobState=")[1].split()[0] if "JobState=" in out else "GONE"


def test_pretrain_vitg_runs_is_preempted_requeues_and_resumes(slurm, tmp_path):
    """`sbatch slurm/pretrain_vitg.sh` with the debug model on synthetic shards, 2 ranks, ZeRO-3;
    mid-run the batch step gets Slurm's warning signal: checkpoint, requeue, resume, finish."""
    subprocess.run([sys.executable, "-m", "scaling.cli", "synth", "--out", str(tmp_path / "shards"), "--num-videos", "16",
                    "--per-shard", "8"], check=True, timeout=300)
    out = tmp_path / "run"
    steps = 12
    overrides = " ".join(f"stages.pretrain.{kv}" for kv in [
        "model.name=debug", "model.input_size=64", "data.sources=[]", "data.num_workers=1",
        f"data.shards={tmp_path}/shards/synth-{{000000..000001}}.tar", "train.global_batch=4",
        f"train.steps={steps}", "train.save_every=100", "optim.warmup_steps=1"])
    env = {**slurm, "SCALING_OUTPUT": str(out), "GPUS_PER_NODE": "2", "SCALING_OVERRIDES": overrides,
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "SCALING_PYTHON": sys.executable}
    submitted = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--cpus-per-task=2", "--time=20",
                                f"--output={tmp_path / 'job.out'}", "slurm/pretrain_vitg.sh"],
                               env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 400
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert job_state(slurm, job) in ("PENDING", "RUNNING", "CONFIGURING"), (tmp_path / "job.out").read_text()
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True, timeout=30)
    while time.time() < deadline and job_state(slurm, job) not in ("COMPLETED", "FAILED", "CANCELLED", "GONE"):
        time.sleep(1)
    log = (tmp_path / "job.out").read_text()
    assert job_state(slurm, job) == "COMPLETED", log[-4000:]
    assert "requeueing job" in log and "(restart 1)" in log, log[-4000:]
    stopped_at = int(log.split("resuming at step ")[1].split(":")[0])
    assert 3 <= stopped_at < steps, "resumed from the preemption checkpoint, not from zero"
    rows = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert rows == list(range(1, steps + 1)), "no gap and no step done twice"
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (only,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    history = mlflow.MlflowClient().get_metric_history(only.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, steps + 1)), "the requeued job continued the same run"


def test_launcher_outside_slurm_and_bad_config_say_what_to_do(slurm, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    outside = subprocess.run(["bash", "slurm/pretrain_vitg.sh"], env=env, cwd=REPO, capture_output=True, text=True)
    assert outside.returncode == 2 and "not inside a Slurm job; submit a template with sbatch" in outside.stderr
    bad = subprocess.run(["bash", "slurm/launch.sh"], env={**env, "SLURM_JOB_ID": "1", "SCALING_CONFIG": "nope.yaml",
                                                          "SCALING_OUTPUT": str(tmp_path)},
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "SCALING_CONFIG 'nope.yaml' does not exist" in bad.stderr
