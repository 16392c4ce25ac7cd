"""One writer per run directory: an OS lock held for the run's whole life.

    with run_lock("runs/x"):        # RunDirBusy if another process is writing runs/x
        train(...)                  # ... here this process is the only writer

Two runs writing one directory would interleave their metrics and overwrite
each other's checkpoints, and the "already holds a run" check cannot stop
the second if it starts before the first has saved anything. So a run
takes `fcntl.flock(LOCK_EX | LOCK_NB)` on RUN_DIR/.tinygen.lock and holds it
until it ends, and writes its process id into the file for the message the
next writer gets:

    runs/x is being written by another tinygen process (pid 4711, lock file runs/x/.tinygen.lock) ...

Why flock and not a pid file that exists or not: the kernel drops the lock
when the process dies however it dies (SIGKILL, a crash, the machine
rebooting), so there is never a stale lock to delete by hand and a
`--resume` right after a SIGKILL just works. The file itself stays (a
leftover pid in it means nothing: only a held flock blocks); deleting it
would let two processes lock two different files of the same name.

Readers (sampling, `explain`, loading a checkpoint) never take the lock and
are never blocked: they rely on the atomic writes (tinygen.plumbing.fileio)
to always see whole files.

In the process that holds a directory's lock, `run_lock` on it again passes
through (the pid in the file is this process's): the command takes the lock
before it prepares the directory, and the training loop it calls takes it
again. Where `fcntl` does not exist (Windows), or the filesystem refuses
locks (some network filesystems), `run_lock` still writes the pid but
cannot exclude a second writer; docs/failures.md says so.
"""
import contextlib
import os

try:
    import fcntl
except ImportError:  # Windows: no flock; see the module docstring
    fcntl = None

from ..errors import RunDirBusy, WriteError
from .fileio import make_dirs
from .rundir import LOCK_FILE


def lock_holder(run_dir):
    """The pid written in RUN_DIR's lock file, or None (no file, empty, or not a number).

    Only a hint for messages: whether the directory is locked is the kernel's answer, not this.
    """
    try:
        with open(os.path.join(os.fspath(run_dir), LOCK_FILE), "rb") as f:
            text = f.read(64).split()
        return int(text[0]) if text else None
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def run_lock(run_dir):
    """Hold RUN_DIR's writer lock (creating the directory) for the duration of the `with`.

    Raises RunDirBusy naming the holder's pid if another process holds it,
    WriteError if the directory or the lock file cannot be created. The lock
    is released when the `with` ends, and by the kernel if the process dies.
    """
    run_dir = os.fspath(run_dir)
    make_dirs(run_dir)
    path = os.path.join(run_dir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as e:
        raise WriteError(path, e) from e
    try:
        if not _try_lock(fd):
            holder = lock_holder(run_dir)
            if holder != os.getpid():
                raise RunDirBusy(
                    f"{run_dir} is being written by another tinygen process "
                    f"({'pid ' + str(holder) if holder else 'pid not yet written'}, lock file {path}); "
                    "wait for it to finish or stop it, or use another directory")
            yield  # this process holds it already: an inner run_lock passes through
            return
        _write_pid(fd, path)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # no pid in the file once nobody holds the lock
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _try_lock(fd) -> bool:
    """flock(fd, exclusive, non-blocking): False if another process holds it, else True.

    Without fcntl, or on a filesystem that refuses locks (ENOLCK on some
    network filesystems), there is nothing to hold: True, and the run goes on unguarded.
    """
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True


def _write_pid(fd, path) -> None:
    """Replace the lock file's contents with "PID\\n"."""
    try:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as e:
        raise WriteError(path, e) from e
