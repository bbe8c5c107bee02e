"""One run per output folder: an flock on `<output_dir>/.run.lock`.

The lock is taken by the process that launches the ranks (or by rank 0 under an external
launcher) and handed on to what it launches (`descriptor_for_launch`: torchrun inherits the
locked descriptor), so it lives as long as any process of the run: a launcher killed with
SIGKILL leaves torchrun and its ranks saving their checkpoint for seconds, and the folder stays
theirs until the last of them has exited. The kernel releases it then, however the run ended:
a crashed or killed run never leaves a stale lock.

The file holds who has it (pid, host, start time, and the launched process's pid) so that a
second run can say whom it waits for. A second run that finds the folder held by a run whose
launcher is dead waits for that run's remaining processes, a line every few seconds, up to
ORPHAN_WAIT_S (torchrun gives its ranks 30 s to stop before it kills them); a folder held by a
live launcher, or by another host, is refused at once. Ranks started by `scaling` itself find
LOCK_ENV naming their folder and do not lock again.
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
ORPHAN_WAIT_S = 90.0  # torchrun's 30 s for its ranks to stop, plus a busy machine's slowness
SAY_EVERY_S = 5.0
_held: dict[str, int] = {}  # folder -> open descriptor, kept open for the life of the process


class FolderInUse(ConfigError):
    """Another live process runs in this output folder."""


def lock_run_folder(out_dir: str | Path, wait_s: float = ORPHAN_WAIT_S,
                    say=lambda text: print(text, flush=True)) -> bool:
    """Take the folder's lock, waiting up to `wait_s` for the processes of a run whose launcher
    died; otherwise refuse in one sentence naming the process that has it. False: this process
    (or the one that launched it) holds it already."""
    out = Path(out_dir).resolve()
    if os.environ.get(LOCK_ENV) == str(out):
        return False
    if str(out) in _held:
        if _same_file(_held[str(out)], out / LOCK_FILE):
            return False
        os.close(_held.pop(str(out)))  # the folder was moved aside with its lock: lock the new one
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    began, last_said = time.monotonic(), None
    while not _try_lock(fd):
        holder = _holder(fd)
        waited = time.monotonic() - began
        if not launcher_dead(holder) or waited >= wait_s:
            os.close(fd)
            after = f" after waiting {waited:.0f} s for it to exit" if waited >= 1 else ""
            raise FolderInUse(f"{out} is in use by another run ({describe(holder)}){after}; wait for it to end, "
                              "stop it, or give this run another train.output_dir")
        if last_said is None or time.monotonic() - last_said >= SAY_EVERY_S:
            last_said = time.monotonic()
            say(f"[scaling] {out}: waiting for pid {holder.get('child') or '?'}, left running by run pid "
                f"{holder['pid']} (killed), to save and exit ({waited:.0f} s of at most {wait_s:.0f} s)")
        time.sleep(0.2)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode(), 0)
    _held[str(out)] = fd
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode(errors="replace"))
        return holder if isinstance(holder, dict) else {}
    except ValueError:
        return {}  # not written yet


def launcher_dead(holder: dict) -> bool:
    """The holder's launcher is gone (exited, or a zombie) on this host, so what holds the lock now
    is what it launched. Unknown holders and other hosts count as alive: refuse, never wait."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        state = Path(f"/proc/{holder['pid']}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def describe(holder: dict) -> str:
    try:
        child = f", its ranks under pid {holder['child']}" if holder.get("child") else ""
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}{child}"
    except (KeyError, TypeError):
        return "a process that has not written its name yet"


def descriptor_for_launch(out_dir: str | Path) -> tuple[int, ...]:
    """The locked descriptor, for subprocess's `pass_fds`: the launched process shares the lock."""
    fd = _held.get(str(Path(out_dir).resolve()))
    return (fd,) if fd is not None else ()


def note_launched(out_dir: str | Path, pid: int) -> None:
    """Record the launched process beside the launcher, so that a run waiting for the folder
    after the launcher died can name it."""
    fd = _held.get(str(Path(out_dir).resolve()))
    if fd is None:
        return
    holder = {**_holder(fd), "child": pid}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)


def env_for_ranks(out_dir: str | Path) -> dict:
    """What the launching process passes to its ranks: the lock is already held for them."""
    return {LOCK_ENV: str(Path(out_dir).resolve())}


def unlock_run_folder(out_dir: str | Path) -> None:
    fd = _held.pop(str(Path(out_dir).resolve()), None)
    if fd is not None:
        os.close(fd)  # the flock ends when the last descriptor sharing it closes (torchrun's included)
