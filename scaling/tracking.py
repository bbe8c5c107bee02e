"""Experiment tracking: MLflow on rank 0, a tracker that does nothing on every other rank.

Tracking never stops training. Rank 0 hands every MLflow call to a sender thread: a store
that fails or is locked (SQLite waits 20 s on a lock, then raises "database is locked") costs
the training loop nothing. The first failure of an outage prints one warning; metrics wait in
a bounded buffer (metrics.jsonl beside the checkpoints stays the complete record) and go out,
in order, as soon as the store answers again. `close(status)` sends what is left (waiting up
to `flush_timeout_s`) and sets the run's final status: FINISHED, KILLED (stopped early) or
FAILED. `closes_runs_on_error` puts FAILED on a run whose training raised, KILLED on one
stopped by Ctrl-C; a run that ends without being closed at all is marked FAILED at exit.

System metrics (CPU, system memory, disk, network; NVIDIA GPUs when pynvml is installed) are
MLflow's own: its SystemMetricsMonitor logs `system/...` into the run from rank 0's process
every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (default 10). Its thread ends at the first
store error; the sender thread starts a new one once the store answers again.

`probe_store(uri)` runs in the launching process, before any rank starts, and turns an
unwritable location or a corrupt SQLite file into one sentence.
"""
from __future__ import annotations

import atexit
import collections
import functools
import logging
import os
import sqlite3
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path

MAX_BUFFERED = 100_000  # metric values kept while the store is down (oldest go first; metrics.jsonl has all)
BATCH = 1000  # MLflow's log_batch takes at most 1000 metrics
SYSTEM_METRICS_RESTART_S = 60  # at most one restart of MLflow's system-metrics thread a minute
RETRY_S = (2, 5, 10, 20, 30)  # waits between tries while the store fails, then every 30 s
FLUSH_TIMEOUT_S = 120.0  # how long close() waits for a failing store before giving up on the rest

_open_trackers: weakref.WeakSet = weakref.WeakSet()


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
    def close(self, status: str = "FINISHED") -> None: ...


def warn(message: str) -> None:
    print(f"[scaling] warning: {message}", file=sys.stderr, flush=True)


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


class MLflowTracker:
    """One MLflow run; `run_id` given resumes that run (a resumed training continues its run).

    Calls return at once; a sender thread delivers them in order (see the module doc)."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str = "", run_id: str | None = None,
                 parent_run_id: str = "", tags: dict | None = None, flush_timeout_s: float = FLUSH_TIMEOUT_S,
                 system_metrics: bool = True):
        from mlflow import MlflowClient

        self.uri = tracking_uri_or_default(tracking_uri)
        self.client = MlflowClient(self.uri)
        self.system: SystemMetrics | None = None
        self.flush_timeout_s = flush_timeout_s
        self.run_id = None
        self.closed = False
        self.failing_since: float | None = None
        self.dropped = 0
        self._ops: collections.deque = collections.deque()  # ("metrics", [Metric]) or ("call", fn, args)
        self._buffered_metrics = 0
        self._cond = threading.Condition()
        self._closing_until: float | None = None
        try:
            self.run_id = self._resume(run_id) if run_id else self._create(experiment, run_name, parent_run_id, tags)
        except Exception as e:  # noqa: BLE001 - a store that cannot start a run must not stop training
            warn(f"MLflow store {self.uri} could not {'reopen run ' + run_id if run_id else 'start a run'} "
                 f"({first_line(e)}); training continues without MLflow, metrics.jsonl keeps every step")
            self.closed = True
            return
        self.system = SystemMetrics(self.run_id, self.uri, resumed=bool(run_id)) if system_metrics else None
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-sender", daemon=True)
        self._thread.start()
        logging.getLogger("mlflow.store.db.utils").addFilter(not_from_tracking_threads)  # added once
        logging.getLogger("mlflow.system_metrics.system_metrics_monitor").addFilter(first_line_only)
        _open_trackers.add(self)

    # -- opening the run (synchronous: the run id goes into every checkpoint)

    def _resume(self, run_id: str) -> str:
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def _create(self, experiment: str, run_name: str, parent_run_id: str, tags: dict | None) -> str:
        from mlflow.tracking.context.registry import resolve_tags

        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        all_tags = {**slurm_tags(), **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id  # what mlflow.start_run(parent_run_id=) sets
        run = self.client.create_run(exp_id, run_name=run_name or None, tags=resolve_tags(all_tags))
        return run.info.run_id

    # -- what training calls: queued, never raises

    def log_params(self, params: dict) -> None:
        self._queue(("call", self._send_params, (dict(params),)))

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        with self._cond:
            if self.closed:
                return
            self._ops.append(("metrics", batch))
            self._buffered_metrics += len(batch)
            while self._buffered_metrics > MAX_BUFFERED and self._drop_oldest_metrics():
                pass
            self._cond.notify()

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self._queue(("call", self.client.log_artifact, (self.run_id, path, artifact_path)))

    def close(self, status: str = "FINISHED") -> None:
        """Send what is buffered (waiting up to flush_timeout_s), then set the final status."""
        with self._cond:
            if self.closed:
                return
            self.closed = True
            self._closing_until = time.monotonic() + self.flush_timeout_s
            self._cond.notify()
        self._thread.join(self.flush_timeout_s + 30)  # one stuck SQLite call waits 20 s at most
        if self.system is not None:
            self.system.finish(timeout_s=30)  # its last samples, before the run stops being RUNNING
        unsent = sum(len(op[1]) for op in self._ops if op[0] == "metrics") + self.dropped
        try:
            self._retry_until_deadline(lambda: self.client.set_terminated(self.run_id, status))
        except Exception as e:  # noqa: BLE001
            warn(f"MLflow store {self.uri} did not answer; run {self.run_id} could not be marked {status} "
                 f"({first_line(e)})")
        if unsent:
            warn(f"{unsent} metric values never reached MLflow run {self.run_id}; metrics.jsonl holds them")
        _open_trackers.discard(self)

    # -- the sender thread

    def _queue(self, op: tuple) -> None:
        with self._cond:
            if not self.closed:
                self._ops.append(op)
                self._cond.notify()

    def _drop_oldest_metrics(self) -> bool:
        for i, op in enumerate(self._ops):
            if op[0] == "metrics":
                del self._ops[i]
                self._buffered_metrics -= len(op[1])
                self.dropped += len(op[1])
                return True
        return False

    def _next_op(self) -> tuple | None:
        """The oldest op, with following metric ops merged into one batch; None when closed and empty."""
        with self._cond:
            while not self._ops and not self.closed:
                self._cond.wait()
            if not self._ops:
                return None
            op = self._ops.popleft()
            if op[0] == "metrics":
                batch = list(op[1])
                while self._ops and self._ops[0][0] == "metrics" and len(batch) + len(self._ops[0][1]) <= BATCH:
                    batch += self._ops.popleft()[1]
                op = ("metrics", batch)
            return op

    def _send_loop(self) -> None:
        tries = 0
        while (op := self._next_op()) is not None:
            tried_at = time.monotonic()
            try:
                self._send(op)
            except Exception as e:  # noqa: BLE001 - any store error: keep the op, warn once, retry later
                with self._cond:
                    self._ops.appendleft(op)
                if self.failing_since is None:
                    self.failing_since = tried_at
                    warn(f"MLflow store {self.uri} failed ({first_line(e)}); training continues, metrics are "
                         "kept (metrics.jsonl has every step) and sent when the store answers again")
                if self._closing_until is not None and time.monotonic() >= self._closing_until:
                    return  # closing, and the store stayed down: close() reports what was not sent
                self._wait(RETRY_S[min(tries, len(RETRY_S) - 1)])
                tries += 1
                continue
            if op[0] == "metrics":
                with self._cond:
                    self._buffered_metrics -= len(op[1])
            if self.failing_since is not None:
                print(f"[scaling] MLflow store {self.uri} answers again after "
                      f"{time.monotonic() - self.failing_since:.0f} s; sending the buffered metrics", flush=True)
                self.failing_since, tries = None, 0
            if self.system is not None and not self.closed:
                self.system.restart_if_ended()  # the store answers: system metrics can go on

    def _wait(self, seconds: float) -> None:
        """Sleep between tries; new metrics do not cut it short (each step notifies), closing does
        not either, but its deadline bounds it."""
        deadline = time.monotonic() + seconds
        with self._cond:
            while True:
                if self._closing_until is not None:
                    deadline = min(deadline, self._closing_until)
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    def _send(self, op: tuple) -> None:
        if op[0] == "metrics":
            self.client.log_batch(self.run_id, metrics=op[1])
        else:
            op[1](*op[2])

    def _send_params(self, params: dict) -> None:
        existing = self.client.get_run(self.run_id).data.params
        # MLflow refuses to change a logged param; on resume only new keys are logged.
        from mlflow.entities import Param

        fresh = [Param(k, str(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(fresh), 100):  # log_batch takes at most 100 params
            self.client.log_batch(self.run_id, params=fresh[i:i + 100])

    def _retry_until_deadline(self, call) -> None:
        deadline = (self._closing_until or time.monotonic()) + 1
        while True:
            try:
                return call()
            except Exception:  # noqa: BLE001
                if time.monotonic() >= deadline:
                    raise
                time.sleep(2)


def first_line_only(record: logging.LogRecord) -> bool:
    """MLflow's system-metrics warnings quote the failed SQL statement over many lines; its first says it all."""
    record.msg, record.args = first_line(Exception(record.getMessage())), None
    return True


class SystemMetrics:
    """MLflow's SystemMetricsMonitor on one run, started at once; `restart_if_ended` starts a new
    one (continuing its step count) when MLflow's thread has ended on a store error."""

    def __init__(self, run_id: str, uri: str, resumed: bool):
        self.run_id, self.uri = run_id, uri
        self.monitor = None
        self.unavailable = False  # MLflow could not start it here at all (e.g. psutil missing)
        self.started_at = 0.0
        self._start(resume=resumed)

    def _start(self, resume: bool) -> None:
        self.started_at = time.monotonic()
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(self.run_id, resume_logging=resume, tracking_uri=self.uri)
            self.monitor.start()
        except Exception as e:  # noqa: BLE001 - system metrics are a nicety; training goes on without them
            self.monitor, self.unavailable = None, True
            warn(f"MLflow system metrics are off for run {self.run_id} ({first_line(e)})")

    def running(self) -> bool:
        thread = getattr(self.monitor, "_process", None)  # MLflow's monitor thread; None once finished
        return thread is not None and thread.is_alive()

    def restart_if_ended(self) -> None:
        if self.unavailable or self.running() or time.monotonic() - self.started_at < SYSTEM_METRICS_RESTART_S:
            return
        self._start(resume=True)

    def finish(self, timeout_s: float) -> None:
        """Stop sampling and send what MLflow's monitor holds, waiting at most `timeout_s` for the store."""
        if self.monitor is None:
            return
        done = threading.Thread(target=self.monitor.finish, name="mlflow-system-metrics-finish", daemon=True)
        done.start()
        done.join(timeout_s)


TRACKING_THREADS = ("mlflow-sender", "SystemMetricsMonitor")


def not_from_tracking_threads(record: logging.LogRecord) -> bool:
    """MLflow's SQL store logs a full traceback for every failed call; the sender thread reports
    an outage once itself, MLflow's system-metrics thread with one warning line."""
    return record.threadName not in TRACKING_THREADS


def closes_runs_on_error(run):
    """Decorate a training entry point: trackers it opened and left open when it raised are
    closed as KILLED (Ctrl-C, SystemExit) or FAILED (any other exception), then it re-raises."""

    @functools.wraps(run)
    def wrapper(*args, **kwargs):
        before = set(map(id, _open_trackers))
        try:
            return run(*args, **kwargs)
        except BaseException as e:
            status = "KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED"
            for tracker in [t for t in list(_open_trackers) if id(t) not in before]:
                tracker.close(status)
            raise

    return wrapper


@atexit.register
def _fail_unclosed_runs() -> None:
    """A process that exits with a run still open did not finish it (MLflow's own exit hook
    would mark it FINISHED)."""
    for tracker in list(_open_trackers):
        tracker.flush_timeout_s = min(tracker.flush_timeout_s, 30.0)
        tracker.close("FAILED")


def end_if_still_running(tracking_uri: str, run_dir: str | os.PathLike, status: str = "FAILED") -> None:
    """After the ranks of `run_dir` ended abruptly (killed, a failed save, a second Ctrl-C, or
    waiting on a dead rank until the launcher ended them): a run its rank 0 could not close is
    closed with how it really ended. The folder's run lock means no other live run owns it."""
    run_file = Path(run_dir) / "mlflow_run_id"
    if not run_file.is_file():
        return
    run_id = run_file.read_text().strip()
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri_or_default(tracking_uri))
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status=status)
    except Exception as e:  # noqa: BLE001 - the run failed either way; the store's trouble is a footnote
        warn(f"could not mark MLflow run {run_id} {status} ({first_line(e)})")


def tracking_uri_or_default(uri: str = "") -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def slurm_tags() -> dict:
    """The Slurm job a run belongs to, when there is one (lineage across requeues)."""
    return {"slurm_job_id": os.environ["SLURM_JOB_ID"]} if "SLURM_JOB_ID" in os.environ else {}


def make_tracker(rank: int, enabled: bool, tracking_uri: str, experiment: str, run_name: str = "",
                 run_id: str | None = None, parent_run_id: str = "", tags: dict | None = None,
                 system_metrics: bool = True):
    if rank != 0 or not enabled:
        return NullTracker()
    return MLflowTracker(tracking_uri, experiment, run_name, run_id, parent_run_id, tags, system_metrics=system_metrics)


# ---------------------------------------------------------------- before launch


def probe_store(tracking_uri: str = "") -> None:
    """Raise ConfigError (one sentence with the fix) when the MLflow store cannot be written:
    checked in the launching process, so no rank starts against it. It also creates a new
    SQLite store here once, instead of every rank racing to."""
    from scaling.config import ConfigError

    uri = tracking_uri_or_default(tracking_uri)
    problem = sqlite_problem(sqlite_path(uri)) if uri.startswith("sqlite:") else None
    if problem is None:
        try:
            from mlflow import MlflowClient

            MlflowClient(uri).search_experiments(max_results=1)
        except Exception as e:  # noqa: BLE001 - whatever the store raises is the problem to report
            # Busy (another run writing) is not broken: the run's calls are buffered until it answers.
            problem = None if "database is locked" in str(e) else first_line(e)
    if problem is not None:
        raise ConfigError(f"the MLflow store {uri} cannot be used ({problem}); point tracking.tracking_uri "
                          f"(or MLFLOW_TRACKING_URI) at a writable place, e.g. sqlite:///{Path.cwd() / 'mlflow.db'}, "
                          "or set tracking.enabled=false")


def sqlite_path(uri: str) -> str:
    """sqlite:///relative.db, sqlite:////absolute.db -> the file path (":memory:" stays)."""
    path = uri.split(":", 1)[1].lstrip("/") if uri.count("/") < 3 else uri[len("sqlite:///"):]
    return path.split("?", 1)[0] or ":memory:"


def sqlite_problem(path: str) -> str | None:
    """What stops writing the SQLite file at `path`, or None."""
    if path == ":memory:":
        return None
    db = Path(path)
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        if not db.exists():
            with tempfile.NamedTemporaryFile(dir=db.parent):  # the folder takes new files (db and journal)
                return None
        with sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=5) as conn:
            conn.execute("PRAGMA schema_version").fetchone()  # "file is not a database" when corrupt
            conn.execute("BEGIN IMMEDIATE")  # a write lock: refused on a read-only file
            conn.rollback()
    except sqlite3.OperationalError as e:
        if "locked" in str(e):
            return None  # busy, not broken: the run's writes wait or are buffered
        return f"{db}: {e}"
    except (sqlite3.DatabaseError, OSError) as e:
        return f"{db}: {e}"
    return None
