"""Warm ranks: `scaling pipeline run` starts torchrun and its ranks once and hands them the
stages one after another, instead of one launch per stage.

A launch costs seconds of every rank's start that train nothing: the interpreter, importing
torch, DeepSpeed, timm and MLflow, the process group, torchrun's own start, and the ranks'
teardown at the end (about 8 s a stage on 2 cores, more on a busy machine; bench/demo_time.py).
Started once, the ranks pay them once; and they import while the driver checks the MLflow
store and opens the pipeline's run. Each stage still runs exactly as `scaling train --config
<stage>/config.launch.yaml` would under a launcher (scaling/cli/train.py), in the same process.

The hand-shake is files in a folder of the pipeline's output (`.warm/ranks-*`): the driver
writes `stage-<n>.json` (the stage's resolved config, its folder and its progress label)
once the stage's folder is ready; every rank polls for it, runs the stage, and rank 0 writes
`stage-<n>.done` when all ranks are through; `exit` ends them. The driver keeps its per-stage
work: lock, resolve and validate, export, DONE.json, MLflow lineage.

What a launch per stage did and this keeps:
- the run lock: every folder the ranks may write into is locked before they start and shared
  with torchrun (scaling/train/run_lock.py), so a killed driver leaves the folders locked until
  the ranks have saved and exited. (A folder set aside because its config changed is replaced
  by a new one that only the driver locks.)
- stop signals: the first SIGINT/SIGTERM writes the running stage's STOP (the ranks save and stop
  after this step; exit 75), a second kills every process at once (exit 130). A stage that
  stopped early ends the ranks. Between stages a signal stops the pipeline before the next one.
- failures: a rank that raises or dies ends torchrun, which ends the others; the stage fails
  with its log, torchrun's, linked into `<stage>/logs/` (it holds the ranks' output of every
  stage of this launch, the failing one last).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POLL_S = 0.05  # how often both sides look for the other's file: 20 stat calls a second
EXIT = "exit"


def order_file(hand: Path, n: int) -> Path:
    return hand / f"stage-{n}.json"


def done_file(hand: Path, n: int) -> Path:
    return hand / f"stage-{n}.done"


def write_atomic(path: Path, text: str) -> None:
    """Readers poll for `path`: it appears whole or not at all."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.rename(path)


class WarmRanks:
    """The driver's side: torchrun and its ranks for the stages of one `pipeline run`.

    `with WarmRanks(pipe, dirs) as ranks:` locks `dirs` (the folders of the stages that may run)
    and starts the ranks; `ranks.run(...)` per stage; leaving the block ends them and unlocks."""

    def __init__(self, ranks: int, output_dir: Path, dirs: list[Path]):
        self.ranks, self.output_dir, self.dirs = ranks, Path(output_dir), list(dirs)
        self.proc: subprocess.Popen | None = None
        self.signals: list[int] = []
        self.current: Path | None = None  # the folder of the stage the ranks run now
        self.count = 0  # stages handed over

    def __enter__(self) -> WarmRanks:
        if self.dirs:
            self._start()
        return self

    def __exit__(self, *exc) -> None:
        from scaling.train.run_lock import unlock_run_folder

        try:
            self._stop()
        finally:
            for d in self.dirs:
                unlock_run_folder(d)

    def _start(self) -> None:
        from scaling.launch import start_torchrun
        from scaling.train.run_lock import descriptor_for_launch, lock_run_folder, note_launched

        for d in self.dirs:  # before anything is written into them (a killed run's ranks may still save there)
            lock_run_folder(d)
        warm = self.output_dir / ".warm"
        warm.mkdir(parents=True, exist_ok=True)
        self.hand = Path(tempfile.mkdtemp(prefix="ranks-", dir=warm))
        self.logs = self.output_dir / "logs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        self.logs.mkdir(parents=True, exist_ok=True)
        # torchrun's --log-dir and --tee from its environment; STOP files are cleared in `run`, per stage.
        fds = tuple(fd for d in self.dirs for fd in descriptor_for_launch(d))
        self.proc = start_torchrun(self.ranks, ["-m", "scaling.pipeline.warm", str(self.hand)],
                                   {"PET_LOG_DIR": str(self.logs), "PET_TEE": "3"}, fds)
        for d in self.dirs:
            note_launched(d, self.proc.pid)
        self.before = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def run(self, out: Path, config: Path, label: str) -> int:
        """Hand the ranks one stage (its resolved config in `out`); returns when every rank is
        through it: 0, or the exit code of torchrun when a rank failed (130: a second signal)."""
        from scaling.launch import clear_run_reports
        from scaling.train.run_lock import lock_run_folder
        from scaling.train.signals import EXIT_INTERRUPTED

        if self.signals:  # a signal between stages: start no other
            raise KeyboardInterrupt
        lock_run_folder(out)  # held already, unless the folder was just set aside and made anew
        clear_run_reports(out)
        self._link_logs(out)
        n, self.count = self.count, self.count + 1
        self.current = out
        try:
            write_atomic(order_file(self.hand, n), json.dumps({"config": str(config), "output_dir": str(out),
                                                               "label": label}))
            while True:
                code = self.proc.poll()
                if done_file(self.hand, n).exists():
                    return 0
                if code is not None:  # torchrun ended before the stage did: a rank failed, or was killed
                    return EXIT_INTERRUPTED if len(self.signals) > 1 else (code or 1)
                time.sleep(POLL_S)
        finally:
            self.current = None

    def _link_logs(self, out: Path) -> None:
        """<stage>/logs/<launch> -> this launch's torchrun logs, where a failure's sentence points."""
        logs = out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        link = logs / self.logs.name
        if not link.exists():
            link.symlink_to(self.logs.resolve(), target_is_directory=True)

    def _on_signal(self, signum, frame) -> None:
        from scaling.launch import kill_tree
        from scaling.train.signals import STOP_FILE

        self.signals.append(signum)
        name = signal.Signals(signum).name
        if len(self.signals) > 1:
            print(f"\n[scaling] {name} again: stopping every process now, without saving", file=sys.stderr, flush=True)
            kill_tree(self.proc.pid)
        elif self.current is not None:
            (self.current / STOP_FILE).touch()
            print(f"\n[scaling] {name}: the ranks save at the end of this step and stop "
                  "(send it again to stop at once, without saving)", file=sys.stderr, flush=True)
        else:
            print(f"\n[scaling] {name}: stopping before the next stage", file=sys.stderr, flush=True)

    def _stop(self) -> None:
        """Tell the ranks to exit and wait for torchrun (a minute at most, then kill it)."""
        from scaling.launch import _after_the_ranks_stopped, kill_tree

        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                write_atomic(self.hand / EXIT, "")
                try:
                    self.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    kill_tree(self.proc.pid)
                    self.proc.wait()
        finally:
            for s, handler in self.before.items():  # after a signal, one more changes nothing
                signal.signal(s, _after_the_ranks_stopped if self.signals else handler)
            shutil.rmtree(self.hand, ignore_errors=True)


# --- the ranks' side: `python -m scaling.pipeline.warm <hand-shake folder>` under torchrun ---

def next_order(hand: Path, n: int) -> dict | None:
    """Wait for the driver's order for stage n; None: exit."""
    while True:
        if order_file(hand, n).exists():
            return json.loads(order_file(hand, n).read_text())
        if (hand / EXIT).exists():
            return None
        time.sleep(POLL_S)


def release_engines() -> None:
    """Free the finished stage's DeepSpeed engine (model, optimizer state, ZeRO buffers) before
    the next stage builds its own. The stage dropped its references, but ZeRO-3 keeps two
    module-level ones (DeepSpeed 0.19): its top module stays on `FWD_MODULE_STACK`, and an
    lru_cache on a method of the parameter coordinator keys on its submodules. Measured here:
    without this, every stage's engine stayed alive, one more per stage (on a GPU, the previous
    stage's weights and optimizer state would take memory from the next)."""
    from deepspeed import DeepSpeedEngine
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    gc.collect()
    for engine in [o for o in gc.get_objects() if isinstance(o, DeepSpeedEngine)]:
        engine.destroy()  # its hooks, optimizer buffers, the parameter-name registry
    parameter_offload.FWD_MODULE_STACK.clear()  # no forward runs between stages
    method = PartitionedParameterCoordinator.__dict__.get("_PartitionedParameterCoordinator__params_to_release")
    for cell in getattr(method, "__closure__", None) or ():  # the lru_cache under DeepSpeed's nvtx wrapper
        if hasattr(cell.cell_contents, "cache_clear"):
            cell.cell_contents.cache_clear()
    gc.collect()


def serve(hand: Path) -> int:
    """Run every stage the driver hands over, in order, as `scaling train --config` would under
    a launcher; returns the exit code (non-zero: this stage failed, torchrun ends the rest)."""
    from scaling.cli.train import cmd_train
    from scaling.train.run_lock import LOCK_ENV
    from scaling.train.signals import stopped_early
    from scaling.train.step_metrics import STAGE_ENV

    rank = int(os.environ["RANK"])
    n = 0
    while (order := next_order(hand, n)) is not None:
        out = Path(order["output_dir"])
        os.environ[STAGE_ENV] = order["label"]  # "2/3 postpretrain" in the step lines
        os.environ[LOCK_ENV] = str(out.resolve())  # the driver holds the folder's lock for this run
        args = argparse.Namespace(command="train", config=order["config"], overrides=[], trust_checkpoint=False,
                                  fresh=False, allow_changed=False)
        code = cmd_train(args)
        if code:
            return code
        # The stage's stop-signal handlers are done: while waiting, a signal ends the rank as usual.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if rank == 0:  # every rank is through (the stage ends with a barrier): the driver exports meanwhile
            write_atomic(done_file(hand, n), "")
        if stopped_early(out):  # the driver stops the pipeline here; a resume starts anew
            return 0
        release_engines()
        n += 1
    return 0


def main() -> int:
    from scaling.errors import UserError

    try:
        return serve(Path(sys.argv[1]))
    except (UserError, FileNotFoundError) as e:  # as `scaling` itself says it: one sentence, exit 2
        print(f"scaling pipeline run: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    code = main()
    # Everything is saved, logged and closed; the interpreter's teardown would only unload
    # libraries and join loader workers while torchrun and the driver wait (scaling/cli/__main__.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
