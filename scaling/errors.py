"""One base class for every error a user can fix by changing what they typed or pointed at.

`scaling.cli.main` turns any `UserError` into one sentence on stderr and exit code 2; the
domain errors (config, memory plan, shard input, checkpoint mismatch or trust, Slurm missing)
subclass it, each also keeping the builtin base (ValueError/RuntimeError) callers caught before.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem the user fixes; the message is one sentence naming what to change."""
