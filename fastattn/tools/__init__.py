"""Command-line tools of ``python -m fastattn``: each module exposes ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``; nothing in the library imports them."""
