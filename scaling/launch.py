"""Start the ranks of a run on this machine, after the config has been validated.

Under an external launcher (torchrun, deepspeed, srun with the env set) WORLD_SIZE is already
in the environment and the run starts in-process; otherwise `train.ranks` local processes are
started with torch's own elastic launcher, each re-entering `scaling <command>` with the
resolved config.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def under_launcher() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def launch_local(command: str, resolved_config: Path, ranks: int) -> int:
    """Run `scaling <command> --config <resolved>` on `ranks` local processes; returns the exit code."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}", "--nnodes=1",
        "--master-addr=127.0.0.1", f"--master-port={free_port()}",
        "-m", "scaling.cli", command, "--config", str(resolved_config),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks))))
    return subprocess.call(cmd, env=env)
