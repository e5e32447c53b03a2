"""The command-line tools of ``python -m fastattn``: each module has ``HELP``, ``add_arguments``, ``run``."""
