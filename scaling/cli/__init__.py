"""`scaling` command line: parse, load config, call one function.

One module per command family (train/export, data, pipeline, memory, use); `main` is the one place
that turns a `UserError` (or a missing file) into one sentence on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import sys

from scaling.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from scaling.cli.data import add_labels_parser, add_shard_parser, add_synth_parser
    from scaling.cli.memory import add_memory_parser
    from scaling.cli.pipeline import add_pipeline_parser
    from scaling.cli.train import add_train_parsers
    from scaling.cli.use import add_use_parsers

    p = argparse.ArgumentParser(prog="scaling", description="Video foundation models the VideoMAE V2 way, on DeepSpeed.")
    sub = p.add_subparsers(dest="command", required=True)
    add_synth_parser(sub)
    add_train_parsers(sub)
    add_labels_parser(sub)
    add_pipeline_parser(sub)
    add_memory_parser(sub)
    add_shard_parser(sub)
    add_use_parsers(sub)
    _name_commands(p)
    return p


def _name_commands(parser: argparse.ArgumentParser) -> None:
    """Each (sub)command parser records its own prog ("scaling memory plan") as the default of
    `where`; the innermost one parsed wins, so an error names the command that was run."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sp in action.choices.values():
                sp.set_defaults(where=sp.prog)
                _name_commands(sp)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """As argparse, except that `key=value` overrides may come anywhere on the line: argparse
    fills a `nargs="*"` positional once, so in `pipeline run p.yaml --from x a.b=1` the
    override after the option comes back unparsed. Those words join the command's overrides
    (later ones win); anything else unparsed is refused as argparse would."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(w.startswith("-") or "=" not in w for w in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.func(args)
    except (UserError, FileNotFoundError) as e:
        print(f"{args.where}: error: {e}", file=sys.stderr)
        return 2


__all__ = ["build_parser", "main"]
