"""One run per output folder: an flock on `<output_dir>/.run.lock`.

The lock belongs to the process that launches the ranks (or to rank 0 under an external
launcher) and the kernel releases it when that process ends, however it ends: a crashed or
killed run never leaves a stale lock. The file holds who has it (pid, host, start time) so a
second run can say whom it is waiting for. Ranks started by `scaling` itself find LOCK_ENV
naming their folder and do not lock again.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from scaling.config import ConfigError

LOCK_FILE = ".run.lock"
LOCK_ENV = "SCALING_RUN_LOCK_HELD"  # the folder whose lock the launching process holds
_held: dict[str, int] = {}  # folder -> open descriptor, kept open for the life of the process


class FolderInUse(ConfigError):
    """Another live process runs in this output folder."""


def lock_run_folder(out_dir: str | Path) -> None:
    """Take the folder's lock or refuse in one sentence naming the process that has it."""
    out = Path(out_dir).resolve()
    if str(out) in _held or os.environ.get(LOCK_ENV) == str(out):
        return
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace")
        os.close(fd)
        raise FolderInUse(f"{out} is in use by another run ({describe(holder)}); wait for it to end, stop it, "
                          "or give this run another train.output_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode(), 0)
    _held[str(out)] = fd


def describe(holder: str) -> str:
    try:
        h = json.loads(holder)
        return f"pid {h['pid']} on {h['host']}, started {h['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"


def env_for_ranks(out_dir: str | Path) -> dict:
    """What the launching process passes to its ranks: the lock is already held for them."""
    return {LOCK_ENV: str(Path(out_dir).resolve())}


def unlock_run_folder(out_dir: str | Path) -> None:
    fd = _held.pop(str(Path(out_dir).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the last descriptor releases the flock
