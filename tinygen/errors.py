"""What tinygen raises when things go wrong, and the exit code the command line gives each.

`TinygenError` subclasses `ValueError`, so callers that already catch
`ValueError` keep working. The command line turns every one of these into
one line on stderr and its own exit code (docs/failures.md):

    exit   raised as                   meaning
    0                                  done
    1      train.TrainingDiverged      the loss or gradients became NaN/inf (gradcheck: a check failed)
    2      TinygenError, a missing     bad input: a flag, a file's contents, a path
           or unreadable file
    70     anything else               a bug in tinygen (EX_SOFTWARE); out of memory
    74     WriteError                  a file could not be written (EX_IOERR): full disk, no permission, ...
    75     RunDirBusy                  another process is writing the run directory (EX_TEMPFAIL)
    130    KeyboardInterrupt           Ctrl-C (training saves a checkpoint first)
"""
import errno
import os

EXIT_DIVERGED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 70  # sysexits.h EX_SOFTWARE
EXIT_WRITE_FAILED = 74  # sysexits.h EX_IOERR
EXIT_BUSY = 75  # sysexits.h EX_TEMPFAIL: try again later
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


class TinygenError(ValueError):
    """Bad input to tinygen: the message names the thing and what was expected."""


class RunDirBusy(TinygenError):
    """Another process holds the run directory's lock (tinygen.plumbing.lock); the message names its pid."""


class WriteError(OSError):
    """A file tinygen writes could not be written: full disk, no permission, a read-only
    filesystem, a path that is a file. An OSError with the original errno.

    `path` is the file or directory that was being written, `reason` the OS's
    words ("No space left on device (ENOSPC)"), and `kept` what is still
    there for the user: the atomic writes leave the previous file untouched,
    and the training loop adds its last good checkpoint.

    >>> print(WriteError("run/m.bin", OSError(errno.ENOSPC, "No space left on device")))
    cannot write run/m.bin: No space left on device (ENOSPC); nothing was half-written; a file it would replace is untouched
    """

    def __init__(self, path, cause: BaseException, kept: str = None):
        code = getattr(cause, "errno", None)
        super().__init__(code, getattr(cause, "strerror", None) or str(cause) or type(cause).__name__)
        self.path = os.fspath(path)
        self.kept = kept
        name = errno.errorcode.get(code) if code else None
        self.reason = f"{self.strerror} ({name})" if name else self.strerror

    def __str__(self):
        told = f"kept: {self.kept}" if self.kept else "nothing was half-written; a file it would replace is untouched"
        return f"cannot write {self.path}: {self.reason}; {told}"

    def __reduce__(self):  # OSError pickles by its args; keep ours (used by multiprocessing, copy)
        return (_rebuild_write_error, (self.path, self.errno, self.strerror, self.kept))


def _rebuild_write_error(path, code, strerror, kept):
    return WriteError(path, OSError(code, strerror), kept)
