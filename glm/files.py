"""Opening files that a user hands to glm: only regular files, and small files read with a bound.

A FIFO, socket or device at a checkpoint's file name would block ``open()`` forever (a FIFO waits for
a writer) or stream without end (``/dev/zero``), so every reader checks the kind of file first, after
resolving links, and reads metadata files such as config.json only up to a size no real one reaches.
"""
from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

# config.json, tokenizer_config.json, index and cases files of real releases are a few hundred KB at most
# (an index of a 1T-parameter model lists ~10^5 names); anything past this is not such a file.
JSON_LIMIT = 64 * 1024 * 1024


class FileKindError(ValueError):
    """A path that exists but is not a regular file (FIFO, socket, device, folder), or a metadata file
    larger than any real one."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _not_regular(path: "str | os.PathLike[str]", mode: int, what: str) -> FileKindError:
    return FileKindError(f"{os.fspath(path)}: is {_kind(mode)}, not a regular file; glm reads the {what} "
                         f"only from a regular file (replace it with the real file)")


def ensure_regular(path: "str | os.PathLike[str]", what: str = "file") -> os.stat_result:
    """The stat of ``path`` (links followed) when it is a regular file; ``FileKindError`` naming what
    it is otherwise. ``FileNotFoundError`` passes through for the caller's own message."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, st.st_mode, what)
    return st


def open_regular(path: "str | os.PathLike[str]", what: str = "file") -> BinaryIO:
    """``path`` open for binary reading when it is a regular file (links followed), else ``FileKindError``.

    The open itself cannot block: it is non-blocking (a FIFO opens at once instead of waiting for a
    writer) and the kind is checked on the open descriptor, so a FIFO swapped in after a separate
    check cannot hang the reader either. ``FileNotFoundError`` passes through."""
    nonblock = getattr(os, "O_NONBLOCK", 0)
    flags = os.O_RDONLY | nonblock | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ENXIO:  # a socket (or a FIFO on some systems) cannot be opened for reading
            raise _not_regular(path, os.stat(path).st_mode, what) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, st.st_mode, what)
        if nonblock:
            import fcntl  # POSIX only, where O_NONBLOCK exists

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~nonblock)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bounded(path: "str | os.PathLike[str]", limit: int = JSON_LIMIT, what: str = "file") -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes, else ``FileKindError``. The bound is checked
    on the open file too, so a file that grows while it is read cannot exceed it."""
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise FileKindError(f"{os.fspath(path)}: {size} bytes, more than any real {what} "
                                f"({limit} bytes at most); restore the file from its release")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise FileKindError(f"{os.fspath(path)}: more than {limit} bytes, more than any real {what}; restore the "
                            f"file from its release")
    return data
