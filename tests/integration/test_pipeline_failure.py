"""A stage that fails inside `scaling pipeline run` ends the pipeline with one sentence naming
the stage and its log (no traceback from the pipeline), and MLflow shows what happened: the
parent run FAILED, the stage's run FAILED even when its rank was killed before it could say so."""
import json
import os
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import yaml
from helpers import REPO, SCALING
from mlflow import MlflowClient


def one_stage_pipeline(tmp: Path) -> Path:
    """The smoke pre-training on noise clips as a 1-rank, one-stage pipeline that runs long enough to be killed."""
    smoke = yaml.safe_load((REPO / "pipelines" / "pretrain_smoke.yaml").read_text())
    smoke["data"] = {"source": "noise", "num_sample": 1}
    smoke["train"].update(steps=5000, global_batch=2, save_every=1000)
    smoke.pop("tracking")
    pipe = {"name": "fails", "output_dir": str(tmp / "pipe"), "ranks": 1, "tracking": {"experiment": "fails"},
            "defaults": smoke, "stages": {"pretrain": {"stage": "pretrain"}}}
    path = tmp / "pipe.yaml"
    path.write_text(yaml.safe_dump(pipe))
    return path


def rank_pids(stage_dir: Path) -> list[int]:
    """The rank processes (not torchrun) of the pipeline running this stage (its warm ranks,
    started once for all its stages, hand-shake under <output_dir>/.warm)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        text = b" ".join(cmd).decode(errors="replace")
        if proc.name.isdigit() and "scaling.pipeline.warm" in text and str(stage_dir.parent / ".warm") in text \
                and "torch.distributed.run" not in text:
            pids.append(int(proc.name))
    return pids


@contextmanager
def running_first_step(pipe: Path, stage: Path, env: dict, tmp_path: Path, tag: str):
    """`scaling pipeline run` started, once the stage has logged its first step (output in
    out<tag> and err<tag>)."""
    with open(tmp_path / f"out{tag}", "w") as so, open(tmp_path / f"err{tag}", "w") as se:
        proc = subprocess.Popen([*SCALING, "pipeline", "run", str(pipe)], env=env, cwd=tmp_path, stdout=so, stderr=se)
        deadline = time.time() + 300
        while not (stage / "metrics.jsonl").is_file() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / f"err{tag}").read_text()[-3000:]
        yield proc


def test_failing_stage_ends_in_one_sentence_with_its_log_and_failed_runs(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["MLFLOW_TRACKING_URI"] = uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    pipe = one_stage_pipeline(tmp_path)
    stage = tmp_path / "pipe" / "pretrain"

    # 1. The rank dies hard mid-run (kill -9: out of memory, a node lost): it cannot close its run.
    with running_first_step(pipe, stage, env, tmp_path, "1") as proc:
        for pid in rank_pids(stage):
            os.kill(pid, signal.SIGKILL)
        rc = proc.wait(timeout=120)
    err = (tmp_path / "err1").read_text().strip().splitlines()
    assert rc == 1, err[-20:]
    last = err[-1]
    assert last.startswith("scaling pipeline run: error: stage 'pretrain' failed (exit 1); its log is "), last
    log = Path(last.split("its log is ")[1].split(";")[0])
    assert log.is_file() and log.is_relative_to(stage / "logs")
    assert "[scaling] starting" in (log.parent / "stdout.log").read_text()  # the rank's own output, kept
    assert not any(line.startswith("Traceback") for line in (tmp_path / "out1").read_text().splitlines())
    client = MlflowClient(uri)
    parent = json.loads((tmp_path / "pipe" / "pipeline_run.json").read_text())["run_id"]
    stage_run = (stage / "mlflow_run_id").read_text().strip()
    assert client.get_run(parent).info.status == "FAILED"
    assert client.get_run(stage_run).info.status == "FAILED"  # was left RUNNING by the killed rank

    # 2. The stage raises inside its rank (DeepSpeed refuses a value in the JSON): the sentence
    #    names the error and the log that holds its traceback.
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": "lots"}}))
    done = subprocess.run([*SCALING, "pipeline", "run", str(pipe), f"defaults.train.ds_config={ds}"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1, done.stderr[-3000:]
    assert last.startswith("scaling pipeline run: error: stage 'pretrain' failed (exit 1) with ") and "Error" in last, last
    log = Path(last.split("its log is ")[1].split(";")[0])
    assert "Traceback" in log.read_text() and "reduce_bucket_size" in log.read_text()
    assert client.get_run(parent).info.status == "FAILED"

    # 3. Ctrl-C while the stage runs (the ranks were started once for the whole pipeline): the
    #    ranks save at the end of their step and stop, the pipeline exits 75 and says how to resume.
    with running_first_step(pipe, stage, env, tmp_path, "3") as proc:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
    out = (tmp_path / "out3").read_text()
    assert rc == 75, (tmp_path / "err3").read_text()[-3000:]
    stopped = json.loads((stage / "STOPPED").read_text())
    assert f"stage 'pretrain' stopped early at step {stopped['step']} (stop file)" in out
    assert (stage / "checkpoints" / "latest").is_file() and not rank_pids(stage)
    assert client.get_run(json.loads((tmp_path / "pipe" / "pipeline_run.json").read_text())["run_id"]).info.status == "KILLED"
