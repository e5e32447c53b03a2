"""Command line: ``python -m fastattn {demo,bench,profile,embed,train} ...``.

Each subcommand lives in its own module exposing ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``;
this file only dispatches, importing nothing heavy until a subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

COMMANDS = {
    "demo": "fastattn.demo",
    "bench": "fastattn.bench",
    "profile": "fastattn.profile",
    "embed": "fastattn.models.cli",
    "train": "fastattn.tools.train",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastattn", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, module_name in COMMANDS.items():
        try:
            present = importlib.util.find_spec(module_name) is not None
        except ImportError:
            present = False
        if not present:
            continue
        module = importlib.import_module(module_name)
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.HELP))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return modules[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
