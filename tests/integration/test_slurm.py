"""The slurm/ templates on a real one-node Slurm started by tests/integration/slurm/cluster.sh (as root)."""
import json
import os
import subprocess
import sys
import time

import mlflow
import pytest
from helpers import REPO

TEMPLATES = sorted(p.name for p in (REPO / "slurm").glob("*.sh") if p.name != "launch.sh")
pytestmark = pytest.mark.slurm


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
    metrics = out / "pretrain" / "metrics.jsonl"  # SCALING_OUTPUT is the pipeline's output_dir
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
    assert "wall-time guard: the ranks save and stop at" in log  # from the job's end time (--time=20)
    stopped_at = int(log.split("resuming at step ")[1].split(":")[0])
    assert 3 <= stopped_at < steps, "resumed from the preemption checkpoint, not from zero"
    rows = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert rows == list(range(1, steps + 1)), "no gap and no step done twice"
    assert (out / "pretrain" / "DONE.json").is_file() and (out / "pretrain" / "export" / "model_fp32.pt").is_file()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (stage_run,) = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'pretrain'",
                                      output_format="list")
    history = mlflow.MlflowClient().get_metric_history(stage_run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, steps + 1)), "the requeued job continued the same run"


def test_launcher_outside_slurm_and_bad_config_say_what_to_do(slurm, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    outside = subprocess.run(["bash", "slurm/pretrain_vitg.sh"], env=env, cwd=REPO, capture_output=True, text=True)
    assert outside.returncode == 2 and "not inside a Slurm job; submit a template with sbatch" in outside.stderr
    bad = subprocess.run(["bash", "slurm/launch.sh"], env={**env, "SLURM_JOB_ID": "1", "SCALING_CONFIG": "nope.yaml",
                                                          "SCALING_OUTPUT": str(tmp_path)},
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "SCALING_CONFIG 'nope.yaml' does not exist" in bad.stderr


def submit(env, *args, pipeline="pipelines/smoke.yaml") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scaling.cli", "pipeline", "submit", pipeline, *args],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


def job_ids(stdout: str) -> dict:
    return {line.split()[1].rstrip(":"): line.split()[-1] for line in stdout.splitlines() if "submitted as Slurm job" in line}


def wait_until_ended(env, jobs, seconds: float) -> dict:
    deadline = time.time() + seconds
    while time.time() < deadline:
        states = {stage: job_state(env, job) for stage, job in jobs.items()}
        if all(s not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED") for s in states.values()):
            return states
        time.sleep(2)
    return states


def test_pipeline_submit_chains_the_stages_and_a_failed_stage_stops_the_rest(slurm, tmp_path):
    """`scaling pipeline submit pipelines/smoke.yaml`: three dependent jobs, run in order, job ids in
    the pipeline's MLflow run; resubmitting submits nothing; a stage that fails cancels the next."""
    for name, count in (("train", 16), ("val", 8)):
        subprocess.run([sys.executable, "-m", "scaling.cli", "synth", "--out", str(tmp_path / name), "--num-videos",
                        str(count), "--per-shard", "8", "--seed", str(count)], check=True, timeout=300)
    out = tmp_path / "smoke"
    overrides = [f"output_dir={out}", f"defaults.data.shards={tmp_path}/train/synth-{{000000..000001}}.tar",
                 "stages.pretrain.train.steps=4", *[f"stages.{s}.{k}" for s in ("postpretrain", "finetune")
                                                     for k in ("train.epochs=1", "optim.warmup_epochs=0")],
                 f"stages.finetune.finetune.val_shards={tmp_path}/val/synth-000000.tar"]
    env = {**slurm, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "SCALING_PYTHON": sys.executable}
    first = submit(env, *overrides)
    assert first.returncode == 0, first.stderr
    jobs = job_ids(first.stdout)
    assert list(jobs) == ["pretrain", "postpretrain", "finetune"], first.stdout
    shown = subprocess.run(["scontrol", "show", "job", jobs["finetune"]], env=slurm, capture_output=True, text=True).stdout
    assert f"Dependency=afterok:{jobs['postpretrain']}" in shown

    states = wait_until_ended(slurm, jobs, 900)
    logs = "\n".join(p.read_text()[-2000:] for p in sorted((out / "slurm").glob("*.out")))
    assert set(states.values()) == {"COMPLETED"}, f"{states}\n{logs}"
    done = {s: (out / s / "DONE.json").stat().st_mtime for s in jobs}
    started = {s: (out / s / "STARTED.json").stat().st_mtime for s in jobs}
    assert done["pretrain"] <= started["postpretrain"] and done["postpretrain"] <= started["finetune"], "in order"
    assert json.loads((out / "finetune" / "eval.json").read_text())["videos"] == 8

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    (parent,) = mlflow.search_runs(search_all_experiments=True, filter_string="tags.pipeline = 'smoke'", output_format="list")
    assert parent.info.status == "FINISHED"
    assert {s: parent.data.tags[f"slurm_job.{s}"] for s in jobs} == jobs
    nested = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["stage"] for r in nested) == sorted(jobs)

    again = submit(env, *overrides)
    assert again.returncode == 0 and "nothing to submit" in again.stdout and not job_ids(again.stdout), again.stdout

    # A changed post-pre-training stage whose weights cannot load (another model size) fails; the
    # fine-tuning job after it is cancelled and never starts; pre-training is not resubmitted.
    finetune_done = (out / "finetune" / "DONE.json").stat().st_mtime
    broken = submit(env, *overrides, "stages.postpretrain.model.name=vit_s")
    assert broken.returncode == 0, broken.stderr
    jobs = job_ids(broken.stdout)
    assert list(jobs) == ["postpretrain", "finetune"] and "pretrain: finished earlier" in broken.stdout
    states = wait_until_ended(slurm, jobs, 600)
    assert states["postpretrain"] == "FAILED" and states["finetune"] == "CANCELLED", states
    assert (out / "finetune" / "DONE.json").stat().st_mtime == finetune_done
    assert client.get_run(parent.info.run_id).info.status == "FAILED"


def test_pipeline_submit_says_what_is_wrong_before_submitting(slurm, tmp_path):
    env = {**slurm, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    unknown = submit(env, f"output_dir={tmp_path}", "stages.pretrain.model.name=vit_zz")
    assert unknown.returncode == 2 and "unknown model.name 'vit_zz'; choose one of" in unknown.stderr
    assert "Traceback" not in unknown.stderr and not (tmp_path / "slurm").exists()
    missing = submit(env, pipeline="nope.yaml")
    assert missing.returncode == 2 and "pipeline file 'nope.yaml' does not exist" in missing.stderr
    # A config that validates (its shards exist), on a machine without sbatch.
    subprocess.run([sys.executable, "-m", "scaling.cli", "synth", "--out", str(tmp_path / "shards"), "--num-videos", "4",
                    "--per-shard", "4"], check=True, timeout=300)
    shards = f"{tmp_path}/shards/synth-000000.tar"
    no_slurm = submit({**env, "PATH": str(tmp_path)}, f"output_dir={tmp_path}", f"defaults.data.shards={shards}",
                      f"stages.finetune.finetune.val_shards={shards}")
    assert no_slurm.returncode == 2 and "sbatch is not on PATH" in no_slurm.stderr
