"""`scaling --help` and every subcommand keep their flags: the parser tree against the
snapshot taken before the command line moved into scaling/cli/ (tests/unit/cli_flags.json)."""
from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from helpers import SCALING

from scaling.cli import build_parser

SNAPSHOT = Path(__file__).with_name("cli_flags.json")


def flags(parser: argparse.ArgumentParser, path: str = "scaling", out: dict | None = None) -> dict:
    """Command path -> its options (with choices and defaults) and positionals."""
    out = {} if out is None else out
    rows = []
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            rows.append(["<command>", sorted(a.choices)])
            for name, sub in a.choices.items():
                flags(sub, f"{path} {name}", out)
        else:
            rows.append([" ".join(a.option_strings) or a.dest, repr(a.default), sorted(map(str, a.choices or ()))])
    out[path] = rows
    return out


def test_every_subcommand_keeps_its_flags():
    assert flags(build_parser()) == json.loads(SNAPSHOT.read_text())


def test_python_m_scaling_cli_runs_the_same_command_line():
    out = subprocess.run([*SCALING, "pipeline", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "run" in out.stdout and "submit" in out.stdout and "show" in out.stdout
