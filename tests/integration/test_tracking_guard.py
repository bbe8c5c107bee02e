"""Tracking never stops training: a locked or broken MLflow store, and the run's true final status.

Real MLflow on SQLite throughout; the lock is a real `BEGIN EXCLUSIVE` transaction held by the
test on the store's file while 2 DeepSpeed ranks train.
"""
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, SCALING, SMOKE, env_for
from mlflow import MlflowClient

from scaling.cli import main
from scaling.config import ConfigError
from scaling.tracking import MLflowTracker, closes_runs_on_error, end_if_still_running, probe_store

NOISE = ["data.source=noise", "data.num_sample=1", "train.global_batch=4", "optim.warmup_steps=1"]


def jsonl_steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


def test_store_locked_40_s_mid_run_costs_no_step_and_loses_no_metric(tmp_path):
    """2 ranks train while the test holds an exclusive lock on the SQLite store for 40 s:
    training goes on (steps keep coming during the lock), one warning, exit 0, and afterwards
    every step's metrics are in MLflow and the run is FINISHED. `scaling export` then accepts
    the run's own DeepSpeed checkpoint (the safe-loading check passes on what DeepSpeed writes)."""
    db, out, steps = tmp_path / "mlflow.db", tmp_path / "run", 300
    cmd = [*SCALING, "pretrain", "--config", str(SMOKE), f"train.output_dir={out}", *NOISE, "train.ranks=2",
           f"train.steps={steps}", "train.save_every=1000"]
    with open(tmp_path / "stdout", "w") as so, open(tmp_path / "stderr", "w") as se:
        proc = subprocess.Popen(cmd, env=env_for(f"sqlite:///{db}"), cwd=tmp_path, stdout=so, stderr=se, text=True)
        deadline = time.time() + 400
        while len(jsonl_steps(out / "metrics.jsonl")) < 3 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
        lock = sqlite3.connect(db, isolation_level=None, timeout=60)
        lock.execute("BEGIN EXCLUSIVE")  # no reader or writer gets in until ROLLBACK
        locked_at, t0 = len(jsonl_steps(out / "metrics.jsonl")), time.time()
        time.sleep(40)
        during_lock = len(jsonl_steps(out / "metrics.jsonl")) - locked_at
        lock.execute("ROLLBACK")
        lock.close()
        rc = proc.wait(timeout=600)
    stderr = (tmp_path / "stderr").read_text()
    assert rc == 0, stderr[-3000:]
    print(f"steps during the 40 s lock: {during_lock} (lock held {time.time() - t0:.0f} s before the run ended)")
    assert during_lock >= 10  # training did not wait for the store
    assert stderr.count("[scaling] warning: MLflow store") == 1, stderr[-3000:]  # one warning for the whole outage
    assert jsonl_steps(out / "metrics.jsonl") == list(range(1, steps + 1))

    client = MlflowClient(f"sqlite:///{db}")
    run_id = (out / "mlflow_run_id").read_text().strip()
    assert client.get_run(run_id).info.status == "FINISHED"
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, steps + 1))
    logged = {json.loads(line)["step"]: json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()}
    assert all(m.value == pytest.approx(logged[m.step]) for m in history)

    export = subprocess.run([*SCALING, "export", str(out)], env=env_for(f"sqlite:///{db}"), cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    assert (out / "export" / "model_fp32.pt").is_file()


def tracker_in(tmp_path: Path, **kwargs) -> tuple[MLflowTracker, MlflowClient]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return MLflowTracker(uri, "guard", **kwargs), MlflowClient(uri)


def test_run_that_raises_ends_failed_and_ctrl_c_ends_killed(tmp_path):
    opened = {}

    @closes_runs_on_error
    def training(error):
        tracker, _ = tracker_in(tmp_path)
        opened[error.__name__] = tracker.run_id
        tracker.log_metrics({"loss": 1.0}, step=1)
        raise error("boom")

    for error in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(error):
            training(error)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(opened["RuntimeError"]).info.status == "FAILED"
    assert client.get_run(opened["KeyboardInterrupt"]).info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(opened["RuntimeError"], "loss")] == [1]


def test_process_that_exits_without_closing_its_run_leaves_it_failed_not_finished(tmp_path):
    """MLflow's own exit hook would mark an open fluent run FINISHED; ours marks it FAILED."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = ("import sys; from scaling.tracking import MLflowTracker; "
              f"t = MLflowTracker({uri!r}, 'guard'); t.log_metrics({{'loss': 2.0}}, step=7); print(t.run_id); sys.exit(3)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 3, done.stderr[-2000:]
    run_id = done.stdout.strip().splitlines()[-1]
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "FAILED"
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [2.0]


def test_finished_run_reports_finished_and_resume_reopens_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is ./mlruns
    parent, client = tracker_in(tmp_path)
    tracker, _ = tracker_in(tmp_path, run_name="stage", parent_run_id=parent.run_id, tags={"stage_kind": "pretrain"})
    tracker.log_params({"a": 1})
    tracker.log_metrics({"loss": 1.5}, step=1)
    (tmp_path / "config.yaml").write_text("a: 1\n")
    tracker.log_artifact(str(tmp_path / "config.yaml"))
    tracker.close("FINISHED")
    tracker.close("FAILED")  # a second close changes nothing
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "stage"
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id and run.data.tags["stage_kind"] == "pretrain"
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["config.yaml"]
    parent.close("FINISHED")
    again, _ = tracker_in(tmp_path, run_id=tracker.run_id)
    assert client.get_run(tracker.run_id).info.status == "RUNNING"
    again.log_params({"a": 1, "b": 2})  # a resumed run adds new params only
    again.close("KILLED")
    run = client.get_run(tracker.run_id)
    assert run.info.status == "KILLED" and run.data.params == {"a": "1", "b": "2"}


def test_system_metrics_go_on_after_a_store_outage(tmp_path, monkeypatch, capfd):
    """MLflow's own system-metrics monitor logs CPU and memory into the run; a locked store ends
    its thread (MLflow's design), and the tracker starts a new one, continuing the step count,
    once the store answers again. The tracker itself keeps taking metrics throughout."""
    from scaling import tracking

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    monkeypatch.setattr(tracking, "SYSTEM_METRICS_RESTART_S", 0)
    tracker, client = tracker_in(tmp_path)
    wait_until(lambda: len(client.get_metric_history(tracker.run_id, "system/cpu_utilization_percentage")) >= 2, 180,
               "two system-metric samples")
    lock = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None, timeout=60)
    lock.execute("BEGIN EXCLUSIVE")
    tracker.log_metrics({"loss": 1.0}, step=1)  # queued while the store is locked
    # MLflow's thread gives up (SQLite's 20 s busy wait)
    wait_until(lambda: not tracker.system.running(), 180, "MLflow's monitor stopping on the locked store")
    lock.execute("ROLLBACK")
    lock.close()
    before = len(client.get_metric_history(tracker.run_id, "system/cpu_utilization_percentage"))
    tracker.log_metrics({"loss": 0.5}, step=2)
    wait_until(lambda: tracker.system.running(), 180, "the monitor restarting once the store answers")
    time.sleep(1.5)
    tracker.close("FINISHED")
    history = client.get_metric_history(tracker.run_id, "system/cpu_utilization_percentage")
    steps = sorted(m.step for m in history)
    assert len(steps) > before and steps == list(range(len(steps))), steps  # continued, not restarted at 0
    assert {"system/system_memory_usage_megabytes", "loss"} <= set(client.get_run(tracker.run_id).data.metrics)
    assert [m.step for m in client.get_metric_history(tracker.run_id, "loss")] == [1, 2]
    err = capfd.readouterr().err
    assert "Failed to get mlflow run: (sqlite3.OperationalError) database is locked" in err
    assert "SELECT" not in err, "the failed SQL statement is not printed"


def wait_until(condition, seconds: float, what: str) -> None:
    """Poll for an event (not a speed target): the limit only keeps a broken build from hanging
    the suite, so it is generous for a busy CI machine, and a miss names the event."""
    deadline = time.time() + seconds
    while not condition():
        if time.time() > deadline:
            pytest.fail(f"{what} did not happen within {seconds:.0f} s")
        time.sleep(0.2)


def test_unwritable_or_corrupt_store_is_refused_before_launch(tmp_path, capsys):
    not_a_folder = tmp_path / "a_file"
    not_a_folder.write_text("")
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not an sqlite database" * 100)
    for uri in (f"sqlite:///{not_a_folder}/mlflow.db", f"sqlite:///{corrupt}"):
        with pytest.raises(ConfigError, match="tracking.enabled=false"):
            probe_store(uri)
        out = tmp_path / "never"
        rc = main(["pretrain", "--config", str(SMOKE), f"train.output_dir={out}", *NOISE, "train.ranks=2",
                   f"tracking.tracking_uri={uri}"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.count("\n") == 0 and "Traceback" not in err, err
        assert "cannot be used" in err and "tracking.enabled=false" in err
        assert not out.exists()  # refused before any rank started (they would create it)
    assert corrupt.read_bytes().startswith(b"this is not")  # left as it was
    probe_store(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}")  # a new store is fine (and created here)
    assert (tmp_path / "new" / "mlflow.db").is_file()


def test_launcher_marks_a_run_its_killed_rank_left_running_failed(tmp_path):
    """What `scaling pretrain` and `scaling pipeline run` do after ranks exited with an error."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    left_running = client.create_run(client.create_experiment("guard")).info.run_id
    (tmp_path / "mlflow_run_id").write_text(left_running)
    end_if_still_running(uri, tmp_path)
    assert client.get_run(left_running).info.status == "FAILED"
    client.set_terminated(left_running, status="KILLED")  # closed by its rank: left as it is
    end_if_still_running(uri, tmp_path)
    assert client.get_run(left_running).info.status == "KILLED"
