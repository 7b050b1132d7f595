"""How the command line ends on an error: one paragraph naming the file, what is wrong and how to fix
it; the traceback only with ``VFMBENCH_DEBUG=1`` (for developers).

* ``UserError`` (bad input): its message, exit 2.
* A full disk (``OSError`` ENOSPC/EDQUOT anywhere in the exception's chain, or torch's serialisation
  error about a failed write): a message about free space, exit 2.
* Other operating-system errors about a file (permission, read-only filesystem, a path under a
  regular file): the file and the system's reason, exit 2.
* Anything else is a bug in vfmbench or a plugin: a one-line summary and how to see the traceback, exit 1.
"""
from __future__ import annotations

import errno
import os
import sys
import traceback

from .errors import UserError

DEBUG_ENV = "VFMBENCH_DEBUG"
DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# torch.save's C++ writer reports a failed write (a full disk) without an errno
TORCH_WRITE_FAILURES = ("PytorchStreamWriter failed writing", "file write failed", "No space left on device")
FILE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.ENOENT, errno.EEXIST, errno.ENAMETOOLONG}


def debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def disk_full(e: BaseException) -> OSError | RuntimeError | None:
    """The exception in ``e``'s chain that says the disk is full, or None."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in DISK_FULL_ERRNOS:
            return x
        if isinstance(x, RuntimeError) and any(s in str(x) for s in TORCH_WRITE_FAILURES):
            return x
    return None


def message(e: BaseException) -> tuple[str, int]:
    """(the paragraph to print, the exit code) for an exception that ended a command."""
    if isinstance(e, UserError):
        return str(e), e.exit_code
    full = disk_full(e)
    if full is not None:
        where = getattr(full, "filename", None)
        target = f" while writing {str(where)!r}" if where else ""
        return (f"the disk is full{target} ({str(full).splitlines()[0][:200]}). Free space on that filesystem (or point "
                "--out / run.cache_dir at one with room) and re-run the same command: finished stages are kept and an "
                "interrupted one resumes from its last checkpoint"), 2
    if isinstance(e, OSError) and e.errno in FILE_ERRNOS and e.filename:
        return (f"cannot use {str(e.filename)!r}: {e.strerror}. Check that the path exists, is a folder where a folder is "
                "expected (not under a regular file) and that you may write there; or choose another --out / run.cache_dir"), 2
    if isinstance(e, UnicodeDecodeError):
        return (f"a text file (config, results or listing) is not UTF-8 ({e.reason} at byte {e.start}); save it as UTF-8 "
                f"and re-run (set {DEBUG_ENV}=1 to see which file from the traceback)"), 2
    first = str(e).splitlines()[0][:300] if str(e) else ""
    return (f"internal error: {type(e).__name__}: {first}. This is a bug in vfmbench or a plugin, not in your input; "
            f"re-run with {DEBUG_ENV}=1 to see the traceback and report it"), 1


def report(e: BaseException) -> int:
    """Print ``e`` as the command's last word (with the traceback under ``VFMBENCH_DEBUG=1``); the exit code."""
    if debug():
        traceback.print_exception(e, file=sys.stderr)
    text, code = message(e)
    print(f"vfmbench: error: {text}", file=sys.stderr)
    return code
