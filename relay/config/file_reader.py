"""Reading the config file: a small regular file of UTF-8 text, else one line saying why not."""

from __future__ import annotations

import os
import stat

from outbox_relay.config.errors import ConfigError
from outbox_relay.files import file_kind

#: A config is small: this bounds the time and memory of reading one, whatever the file holds.
MAX_FILE_BYTES = 1024 * 1024


def read_text(file: str) -> str:
    """The file's text: at most MAX_FILE_BYTES of UTF-8 without NUL bytes, else one line why."""
    if not file:
        raise ConfigError(["no config file given (pass its path with -c)"])
    try:
        # Without blocking: opening a FIFO for reading waits for a writer, forever.
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except IsADirectoryError:
        raise ConfigError([f"{file}: is a directory, not a config file"]) from None
    except OSError as exc:
        try:  # (a socket cannot be opened at all: say what it is)
            mode = os.stat(file).st_mode
        except OSError:
            mode = stat.S_IFREG
        if not stat.S_ISREG(mode):
            raise ConfigError([_not_regular(file, mode)]) from None
        raise ConfigError([f"{file}: cannot read the file: {exc.strerror or exc}"]) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise ConfigError([f"{file}: is a directory, not a config file"])
        raise ConfigError([_not_regular(file, mode)])
    with open(fd, "rb", closefd=True) as stream:
        try:
            raw = stream.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise ConfigError([f"{file}: cannot read the file: {exc.strerror or exc}"]) from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(
            [f"{file}: the file is larger than {MAX_FILE_BYTES // 1024} KiB; a config file is small"]
        )
    if b"\x00" in raw:
        raise ConfigError([f"{file}: the file is binary (it contains NUL bytes), not YAML text"])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        problem = f"the file is not UTF-8 text (byte {exc.start + 1} is not UTF-8)"
        raise ConfigError([f"{file}: {problem}"]) from None


def _not_regular(file: str, mode: int) -> str:
    return f"{file}: is {file_kind(mode)}, not a regular file; a config is a file"
