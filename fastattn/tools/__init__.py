"""The command-line tools (``python -m fastattn COMMAND``): demo, bench, profile, embed, and the timing helpers they
share. Each command is a module with ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``. They use the
public API and the call layer; nothing in the library imports them."""
