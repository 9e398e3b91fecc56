"""``python -m cloudlets``: the command line."""

from cloudlets.cli import entry_point

entry_point()
