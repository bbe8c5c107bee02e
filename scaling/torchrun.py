"""`python -m scaling.torchrun torch.distributed.run ARGS`: torch's launcher, run as its own
`python -m` would run it, then ended with os._exit as soon as it has returned or raised.

After a SIGTERM (the launching `scaling` process was killed: PR_SET_PDEATHSIG), torchrun ends its
ranks and raises, but its interpreter then waits at exit for the threads that tee the ranks'
output into <output_dir>/logs, which nobody stops on that path: one was found alive, its ranks
long gone, 25 minutes later, holding the run folder's lock (scaling/train/run_lock.py). Once
torchrun's main has returned or raised, its ranks have exited (it ends them, SIGKILL after
30 s), so nothing is left to wait for; on a normal end this also skips seconds of teardown.
The module's name stays on the command line, so `ps` (and the tests) still see torchrun.
"""
import os
import runpy
import sys
import traceback

if __name__ == "__main__":
    module = sys.argv.pop(1)  # torch.distributed.run
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:  # argparse, or the launcher's own sys.exit
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - a failed rank (ChildFailedError), a signal: printed as Python would
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
