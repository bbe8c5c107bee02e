"""The run-folder lock outlives a killed launcher: what it launched keeps the folder until it exits."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from scaling.train.run_lock import FolderInUse, lock_run_folder, unlock_run_folder

# A launcher as scaling/launch.py is one: it locks the folder, starts a child that shares the
# locked descriptor (torchrun), records the child's pid, then lives on until it is killed.
LAUNCHER = """
import subprocess, sys, time
from scaling.train.run_lock import descriptor_for_launch, lock_run_folder, note_launched
folder = sys.argv[1]
lock_run_folder(folder)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], pass_fds=descriptor_for_launch(folder))
note_launched(folder, child.pid)
print(child.pid, flush=True)
time.sleep(120)
"""


def test_a_killed_launchers_child_keeps_the_folder_and_a_rerun_waits_for_it(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    child = int(launcher.stdout.readline())
    try:
        # The launcher alive: refused at once, naming it and its child.
        began = time.monotonic()
        with pytest.raises(FolderInUse, match=rf"pid {launcher.pid} on .*its ranks under pid {child}\)"):
            lock_run_folder(tmp_path, wait_s=30)
        assert time.monotonic() - began < 5

        launcher.kill()  # SIGKILL: no chance to release anything; the child lives on
        launcher.wait()
        lines = []
        with pytest.raises(FolderInUse, match=r"after waiting [12] s for it to exit"):
            lock_run_folder(tmp_path, wait_s=1, say=lines.append)  # bounded: the child never exits
        assert lines and f"waiting for pid {child}, left running by run pid {launcher.pid} (killed)" in lines[0]

        threading.Timer(1.5, os.kill, (child, signal.SIGKILL)).start()  # the child ends: the lock is free
        began = time.monotonic()
        assert lock_run_folder(tmp_path, wait_s=30, say=lines.append) is True
        assert time.monotonic() - began >= 1.0
    finally:
        for pid in (launcher.pid, child):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        unlock_run_folder(tmp_path)


def test_a_folder_moved_aside_is_locked_anew(tmp_path):
    """A stage set aside while its lock was held (its config changed) gets a lock of its own."""
    folder = tmp_path / "stage"
    assert lock_run_folder(folder) is True
    assert lock_run_folder(folder) is False  # already this process's
    folder.rename(tmp_path / "stage.replaced")
    assert lock_run_folder(folder) is True  # the new folder
    unlock_run_folder(folder)
