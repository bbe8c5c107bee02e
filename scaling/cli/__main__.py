"""`python -m scaling.cli <command>`: how the launcher starts every rank (and tests call it)."""
import os
import sys

from scaling.cli import main

code = main()
if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
    # A rank that has returned has saved, logged and closed its run; the interpreter's teardown
    # after it only unloads libraries and joins the data loader's workers (up to 5 s each, on
    # collection), while torchrun and the pipeline wait for this process to be gone (6 s here).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
