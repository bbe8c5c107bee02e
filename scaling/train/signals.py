"""Stop early on request, at the same step on every rank: preemption and wall-time limits.

Slurm warns a job before it preempts it or its time runs out (`#SBATCH --signal=B:USR1@<s>`).
That signal reaches the batch shell, not reliably every rank under srun + torchrun, so the
batch script answers it by writing `<output_dir>/STOP`. A rank also stops on SIGUSR1 sent to it
directly, on SIGINT/SIGTERM (Ctrl-C, `kill`; a second one stops at once without saving), and
on `SCALING_STOP_AT` (unix seconds, set by the launcher from the job's end time
minus a margin): the wall-time guard.

ZeRO-3 saving is collective, so no rank can save alone: after every step the ranks all-reduce
(MAX) whether any of them wants to stop, and all save that same step. Rank 0 then writes
`<output_dir>/STOPPED` (reason and step) so that whoever started the run (the batch script,
`scaling pipeline`) knows it did not finish and requeues / re-runs it; the next start removes
both files and resumes from the saved step. `scaling` itself, when it launches the ranks,
removes them before the launch instead (CLEARED_ENV), so that a Ctrl-C during start-up, which
it answers by writing STOP, is not lost.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

STOP_FILE, STOPPED_FILE = "STOP", "STOPPED"
EXIT_STOPPED = 75  # EX_TEMPFAIL: `scaling pretrain/finetune/pipeline` stopped early; run it again to resume
EXIT_INTERRUPTED = 130  # a second Ctrl-C: stopped at once, nothing saved (the shell's code for SIGINT)
CLEARED_ENV = "SCALING_STOP_FILES_CLEARED"  # set by the launching `scaling` process


class StopRequest:
    """`agreed()` after each step; `record(step)` once the ranks have saved that step and stop."""

    def __init__(self, out_dir: str | Path, rank: int):
        self.out = Path(out_dir)
        self.rank = rank
        self.reason = ""
        self.stopped_at: int | None = None  # the step a run stopped early at
        stop_at = os.environ.get("SCALING_STOP_AT", "")
        self.deadline = float(stop_at) if stop_at else None
        for sig in (signal.SIGUSR1, signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        if rank == 0 and not os.environ.get(CLEARED_ENV):  # an earlier job's requests were answered by its checkpoint
            for name in (STOP_FILE, STOPPED_FILE):
                (self.out / name).unlink(missing_ok=True)
        if dist.is_initialized():
            dist.barrier()  # no rank looks for STOP before rank 0 has removed the old one

    def _on_signal(self, signum, frame) -> None:
        self.reason = self.reason or signal.Signals(signum).name
        if signum in (signal.SIGINT, signal.SIGTERM):
            # The next one ends the process as if there were no handler: stop without saving.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def local_reason(self) -> str:
        if self.reason:
            return self.reason
        if (self.out / STOP_FILE).exists():  # one stat per step
            return "stop file"
        if self.deadline is not None and time.time() >= self.deadline:
            return "wall-time guard"
        return ""

    def agreed(self) -> bool:
        """True on every rank once any rank wants to stop (call it on every rank, every step)."""
        flag = torch.tensor([1.0 if self.local_reason() else 0.0])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def record(self, step: int) -> None:
        """Rank 0 notes why and where the run stopped early."""
        self.stopped_at = step
        if self.rank == 0:
            reason = self.local_reason() or "another rank's request"
            (self.out / STOPPED_FILE).write_text(json.dumps({"step": step, "reason": reason}))
            print(f"[scaling] stopped early at step {step} ({reason}); checkpoint saved, run again to resume", flush=True)


def stopped_early(out_dir: str | Path) -> dict | None:
    """{"step", "reason"} when the run in `out_dir` stopped early, else None."""
    f = Path(out_dir) / STOPPED_FILE
    return json.loads(f.read_text()) if f.is_file() else None
