"""Start the ranks of a run on this machine, after the config has been validated.

Under an external launcher (torchrun, deepspeed, srun with the env set) WORLD_SIZE is already
in the environment and the run starts in-process; otherwise `train.ranks` local processes are
started with torch's own elastic launcher, each re-entering `scaling <command>` with the
resolved config.

Stopping: torchrun and the ranks run in a session of their own, so a Ctrl-C in the terminal
reaches only this process, which answers SIGINT/SIGTERM by writing `<output_dir>/STOP`: every
rank sees it after its current step, all save that same step and exit (scaling/train/signals.py),
and `scaling` exits with EXIT_STOPPED. (Signalling torchrun instead would make it terminate
the ranks mid-step, without a save.) A second signal kills the whole process tree at once,
without saving. Should this process die without a chance to answer (SIGKILL), the kernel sends
torchrun SIGTERM (PR_SET_PDEATHSIG) and torchrun ends the ranks (they save first): nothing keeps
running, and the output folder's lock, which torchrun shares, lasts until they are gone.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from scaling.train.run_lock import (
    descriptor_for_launch,
    env_for_ranks,
    lock_run_folder,
    note_launched,
    unlock_run_folder,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(ranks: int) -> list[str]:
    """torch's launcher for `ranks` processes on this machine, run under scaling.torchrun (which
    ends it at once when it returns: after a SIGTERM it otherwise waits forever at exit for its
    output threads); the program and its arguments follow."""
    return [sys.executable, "-m", "scaling.torchrun", "torch.distributed.run", f"--nproc-per-node={ranks}", "--nnodes=1",
            "--master-addr=127.0.0.1", f"--master-port={free_port()}"]


def under_launcher() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def launch_local(command: str, resolved_config: Path, ranks: int, out_dir: Path | None = None) -> int:
    """Run `scaling <command> --config <resolved>` on `ranks` local processes; returns the exit
    code. `out_dir` (default: the resolved config's folder) is locked for this run."""

    out = Path(out_dir or Path(resolved_config).parent)
    took = lock_run_folder(out)
    try:
        return _launch(command, resolved_config, ranks, out)
    finally:
        if took:  # a caller that locked it before (`scaling pipeline run`) keeps it
            unlock_run_folder(out)


def clear_run_reports(out: Path) -> None:
    """Remove STOP, STOPPED and FAILED from `out`: answered or reported by the previous run."""
    from scaling.train.checkpoint import FAILED_FILE
    from scaling.train.signals import STOP_FILE, STOPPED_FILE

    for name in (STOP_FILE, STOPPED_FILE, FAILED_FILE):
        (out / name).unlink(missing_ok=True)


def start_torchrun(ranks: int, program: list[str], env: dict, fds: tuple[int, ...]) -> subprocess.Popen:
    """torchrun with `ranks` local ranks running `program` (after `python`), in a session of its
    own (a Ctrl-C reaches only this process), ended by the kernel should this process die, and
    holding the run-folder lock descriptors `fds` (the lock lasts until its ranks have exited)."""
    from scaling.train.signals import CLEARED_ENV

    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
    env = dict(os.environ, OMP_NUM_THREADS=threads, **env, **{CLEARED_ENV: "1"})  # STOP files are cleared here
    return subprocess.Popen([*torchrun_command(ranks), *program], env=env, start_new_session=True,
                            preexec_fn=_end_with_parent, pass_fds=fds)


def _launch(command: str, resolved_config: Path, ranks: int, out: Path) -> int:
    from scaling.train.signals import EXIT_INTERRUPTED, STOP_FILE

    clear_run_reports(out)
    # torchrun shares the folder's lock (pass_fds): should this process be killed, the lock lasts
    # until torchrun and its ranks have saved and exited, and no re-run starts beside them.
    proc = start_torchrun(ranks, ["-m", "scaling.cli", command, "--config", str(resolved_config)], env_for_ranks(out),
                          descriptor_for_launch(out))
    note_launched(out, proc.pid)
    signals = []

    def on_signal(signum, frame):
        signals.append(signum)
        if len(signals) == 1:
            (out / STOP_FILE).touch()
            print(f"\n[scaling] {signal.Signals(signum).name}: the ranks save at the end of this step and stop "
                  "(send it again to stop at once, without saving)", file=sys.stderr, flush=True)
        else:
            print(f"\n[scaling] {signal.Signals(signum).name} again: stopping every process now, without saving",
                  file=sys.stderr, flush=True)
            kill_tree(proc.pid)

    before = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        if signals:  # this process is stopping too: a signal that comes while it winds up changes nothing
            for s in before:
                signal.signal(s, _after_the_ranks_stopped)
        else:  # a pipeline's next stage, or the caller, answers signals its own way again
            for s, handler in before.items():
                signal.signal(s, handler)
    return EXIT_INTERRUPTED if len(signals) > 1 else code


def _after_the_ranks_stopped(signum, frame) -> None:
    print(f"\n[scaling] {signal.Signals(signum).name}: the ranks have already stopped; finishing up",
          file=sys.stderr, flush=True)


def _end_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (Linux; elsewhere a no-op)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc (the ranks run in sessions of their own, so
    no process group holds them all)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and everything below it, children first seen before any dies."""
    tree = descendants(pid)
    for p in [pid, *tree]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() and not _zombie(p) for p in tree):
        time.sleep(0.1)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
