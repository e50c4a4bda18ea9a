"""Opening files that a user hands to glm: only regular files, and small files read with a bound.

A FIFO, socket or device at a checkpoint's file name would block ``open()`` forever (a FIFO waits for
a writer) or stream without end (``/dev/zero``), so every reader checks the kind of file first, after
resolving links, and reads metadata files such as config.json only up to a size no real one reaches.
"""
from __future__ import annotations

import errno
import json
import math
import os
import stat
from typing import Any, BinaryIO, Callable

from .errors import ArgumentError, ConfigError, FileKindError

# config.json, tokenizer_config.json, index and cases files of real releases are a few hundred KB at most
# (an index of a 1T-parameter model lists ~10^5 names); anything past this is not such a file.
JSON_LIMIT = 64 * 1024 * 1024


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


def read_json(path: str, error: type = ConfigError, missing: str = "a checkpoint folder needs its config.json",
              fix: str = "restore the file from the release") -> Any:
    """A JSON file a user hands to glm (config.json and its kin): a regular file of bounded size, so a
    FIFO, a device or a link to /dev/zero is refused instead of blocking or filling memory. Every failure
    is an ``error`` (ConfigError by default) naming the file; ``missing`` says what to do when it is absent,
    ``fix`` when it is not usable JSON."""
    try:
        data = read_bounded(path, what=os.path.basename(path) or "JSON file")
        return json.loads(data.decode("utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: no such file; {missing}") from None
    except FileKindError as e:
        raise error(str(e)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e}); {fix}") from None
    except (RecursionError, ValueError) as e:
        # json raises a plain ValueError for an integer of more than 4300 digits.
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(";")[0]
        raise error(f"{path}: not usable JSON ({why}); {fix}") from None
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror})") from None


def parse_size(text: "str | int") -> int:
    """'2GB', '500MB', '1.5GiB', or a byte count, as a positive whole number of bytes; anything else
    (inf, nan, 0, negative, not a size) is an ArgumentError naming the value."""
    bad = ArgumentError(f"shard size {text!r} is not a size; write e.g. 2GB, 500MB or a byte count")
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise bad
    value, mult = text, 1
    if isinstance(text, str):
        t = text.strip().upper().replace("IB", "B")
        units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40, "B": 1}
        number = next(((t[: -len(u)], m) for u, m in units.items() if t.endswith(u)), (t, 1))
        try:
            value, mult = float(number[0]), number[1]
        except ValueError:
            raise bad from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ArgumentError(f"shard size {text!r} is not a finite size; write e.g. 2GB, 500MB or a byte count")
    size = int(value * mult)
    if size <= 0:
        raise ArgumentError(f"shard size must be positive, got {text!r}")
    return size


def write_failed(e: OSError, dest: str, what_now: str) -> OSError:
    """``e`` (disk full, I/O error, ...) as one OSError of the same kind whose message names ``dest``
    and what to do; ``str()`` keeps the system's reason ("No space left on device") first."""
    reason = e.strerror or str(e) or type(e).__name__
    msg = f"{reason}: writing {dest} failed; {what_now}"
    return OSError(e.errno, msg) if e.errno is not None else OSError(msg)


def fsync_dir(folder: str) -> None:
    """Make a rename or new file in ``folder`` durable (POSIX only; Windows cannot open folders)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask. Linux reports it in /proc (no side effect); elsewhere it is read by setting
    and restoring it, which is process-wide: a file another thread creates in that instant gets the
    stricter 077 mask."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def atomic_write(path: str, data: "bytes | Callable[[BinaryIO], None]") -> None:
    """Write ``data`` (bytes, or a function that writes to the open file) to a temp file beside
    ``path``, fsync it and rename it over ``path``: readers see the old file or the new one, never half.
    The file gets the mode of the file it replaces, or 0666 less the umask (as ``open`` would give it;
    the temp file is created 0600)."""
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mode = 0o666 & ~current_umask()
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            data(f) if callable(data) else f.write(data)
            f.flush()
            os.chmod(tmp, mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
