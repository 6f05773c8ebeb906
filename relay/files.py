"""What a path is, for messages that refuse one that is not a regular file."""

from __future__ import annotations

import stat


def file_kind(mode: int) -> str:
    """What a path that is not a regular file is, by its `st_mode` (a FIFO, a socket...): the
    config file and the file sink's path both refuse those, and say which it is."""
    kinds = (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
    )
    return next((name for test, name in kinds if test(mode)), "not a regular file")
