"""Command line: ``python -m fastattn {demo,bench,profile,embed,generate,train,tune} ...``.

Each subcommand lives in its own module exposing ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``;
this file only dispatches, importing nothing heavy until a subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

COMMANDS = {
    "demo": "fastattn.tools.demo",
    "bench": "fastattn.tools.bench",
    "profile": "fastattn.tools.profile",
    "embed": "fastattn.tools.embed",
    "generate": "fastattn.tools.generate",
    "tune": "fastattn.tools.tune",
    "train": "fastattn.tools.train",
}


def _take_the_real_package() -> None:
    """Run from the parent folder of an editable checkout that is itself named ``fastattn``, Python finds that folder
    first (it has no ``__init__.py``: a namespace package) and never runs the real ``fastattn/__init__.py``; the
    editable install's finder only comes after. Drop that folder's parent from ``sys.path`` and import again."""
    package = sys.modules.get("fastattn")
    if package is None or getattr(package, "__file__", None) is not None:
        return
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shadowing = os.path.dirname(checkout)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != shadowing]
    for name in [n for n in sys.modules if n == "fastattn" or n.startswith("fastattn.")]:
        del sys.modules[name]
    importlib.import_module("fastattn")


def main(argv=None) -> int:
    _take_the_real_package()
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
