"""One training per workdir: an exclusive writer lock on ``{workdir}/train.lock``.

Two trainings writing checkpoints into one folder interleave their steps, rotate each
other's checkpoints out and leave a run that neither of them made. :func:`hold` takes an
exclusive ``fcntl.flock`` on ``{workdir}/train.lock`` for the whole training (process 0 of a
multi-process run; the others learn the outcome from it) and writes its holder into the
file as JSON (host, pid, start time, last heartbeat), so a second training refuses at once
with one line naming who holds the lock. Evaluation and sampling take no lock: they only
read checkpoints, and may run while a training writes.

A holder that dies (``kill -9``, a crashed node) never blocks the next resume: the kernel
drops a ``flock`` when its process dies, and the next run takes the lock, logging the dead
holder it replaces. The file itself is never deleted (deleting a locked file would let two
runs lock two different files under one name); a clean exit empties it.

Which file systems it protects:

* Local disks (ext4, xfs, btrfs, tmpfs, ...): ``flock`` is exact, and a lock dies with its
  process.
* NFS: Linux (since 2.6.12) turns ``flock`` into an NFS byte-range lock, so the lock holds
  across hosts when the mount has locking (NFSv4, or NFSv3 with ``lockd``/``statd``
  running). Caveats: a mount with ``nolock`` or ``local_lock=flock|all`` keeps locks on
  each client, and a lock server without locking answers ``ENOLCK`` (both handled as for
  object stores, below); a lock of a node that is lost is freed when the server notices
  (the NFSv4 lease, about 90 s; with NFSv3, when the node reboots or an administrator
  clears it), and until then the next run refuses, naming the holder.
* Lustre without ``-o flock``, and FUSE file systems (gcsfuse, s3fs, ...): ``flock`` either
  fails or only sees the processes of one host. There the holder also refreshes a heartbeat
  in the file every :data:`HEARTBEAT_SECONDS`, and a run on another host refuses while the
  heartbeat is younger than :data:`STALE_SECONDS`, taking the lock over once it is older. This
  is advisory: two runs started on two hosts within a heartbeat of each other can both
  start. Workdirs given as URLs (``gs://...``) are not supported by the runner at all.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from vdm_jax.runner.workdir import WorkdirError

LOCK_FILE = "train.lock"
# The heartbeat of file systems whose locks are per host (or absent), and when it is stale.
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0
# File-system types (``/proc/self/mountinfo``) whose flock is not seen by other hosts.
_PER_HOST_LOCKS = ("fuse", "lustre")
# flock errors that mean "this file system gives no locks", not "someone holds it".
_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


class WorkdirLockedError(WorkdirError):
    """Another training holds the workdir's lock."""


def filesystem_type(path: str) -> str:
    """The type of the file system that holds ``path`` (``"ext4"``, ``"nfs4"``,
    ``"fuse.gcsfuse"``, ...), from ``/proc/self/mountinfo``; ``""`` if unknown."""
    path = os.path.realpath(path)
    best, fstype = "", ""
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    for line in lines:
        fields = line.split()
        if "-" not in fields:
            continue
        mount = fields[4].replace("\\040", " ")
        inside = path == mount or path.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, fstype = mount, fields[fields.index("-") + 1]
    return fstype


def _now() -> str:
    """The local time with its offset, to the second: ``2025-01-31T14:02:07+01:00``."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


class _Lock:
    """The open, locked file of one holder, with its body and (where needed) heartbeat."""

    def __init__(self, path: str, fd: int, heartbeat: bool):
        self.path, self.fd = path, fd
        self.body = {"host": socket.gethostname(), "pid": os.getpid(), "since": _now()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self._write()
        except OSError as e:  # A full disk, say: the flock holds all the same.
            logging.warning("Cannot write the lock holder into %s: %s", path, e)
        if heartbeat:
            self._thread = threading.Thread(
                target=self._beat, daemon=True, name="vdm_jax-lock-heartbeat"
            )
            self._thread.start()

    def _write(self) -> None:
        """Rewrites the body through the locked descriptor (never a second one: on NFS,
        closing any descriptor of the file drops the process's lock)."""
        data = json.dumps({**self.body, "heartbeat": time.time()}).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        os.fsync(self.fd)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(OSError):  # A missed beat is retried at the next one.
                self._write()

    def release(self) -> None:
        """Empties the body (free, for every file system) and unlocks."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
            os.fsync(self.fd)
        os.close(self.fd)  # Drops the flock.


def _read_body(fd: int) -> dict[str, Any]:
    """The holder's body as written (``{}`` if empty or unreadable: written at this moment)."""
    try:
        raw = os.pread(fd, 4096, 0)
        body = json.loads(raw.decode()) if raw.strip() else {}
    except (OSError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def _describe(body: dict[str, Any]) -> str:
    """``host h, pid 12, since 2025-...``, or what is known of it."""
    if not body:
        return "a process that has not written its name yet"
    return (
        f"host {body.get('host', '?')}, pid {body.get('pid', '?')}, since {body.get('since', '?')}"
    )


def _refusal(workdir: str, path: str, body: dict[str, Any], why: str = "") -> WorkdirLockedError:
    """The one-line error of a second training: who holds the lock, and what to do."""
    pid, host = body.get("pid", "<pid>"), body.get("host", "<host>")
    return WorkdirLockedError(
        f"workdir {workdir} is being trained by another run ({_describe(body)}{why}; lock "
        f"file {path}): wait for it to finish, or stop it (kill {pid} on {host}) and run "
        "this command again to resume; --mode=eval and --mode=sample need no lock"
    )


def _heartbeat_age(body: dict[str, Any]) -> float:
    """Seconds since the holder's last heartbeat (infinite if it never wrote one)."""
    beat = body.get("heartbeat")
    return time.time() - beat if isinstance(beat, int | float) else float("inf")


def _may_be_alive(body: dict[str, Any], flocked: bool) -> bool:
    """Whether the holder named by ``body`` may still run: on another host, always; on this
    host, only if this process holds no flock (which it would share with a live holder) and
    the pid exists."""
    if body.get("host") != socket.gethostname():
        return True
    if flocked:
        return False
    pid = body.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _acquire(workdir: str) -> _Lock:
    """Takes the lock of ``workdir`` (which exists) for this process.

    Raises:
      WorkdirLockedError: another live training holds it.
    """
    path = os.path.join(workdir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise WorkdirError(f"cannot open the lock file {path}: {e}") from e
    per_host = filesystem_type(workdir).startswith(_PER_HOST_LOCKS)
    flocked = True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            body = _read_body(fd)
            os.close(fd)
            raise _refusal(workdir, path, body) from None
        if e.errno not in _NO_LOCKS:
            os.close(fd)
            raise WorkdirError(f"cannot lock {path}: {e}") from e
        logging.warning(
            "The file system of %s gives no locks (%s); falling back to a heartbeat in %s, "
            "which cannot stop two runs started within %d s of each other.",
            workdir,
            os.strerror(e.errno),
            path,
            HEARTBEAT_SECONDS,
        )
        per_host, flocked = True, False
    previous = _read_body(fd)
    if previous:
        age = _heartbeat_age(previous)
        if per_host and age < STALE_SECONDS and _may_be_alive(previous, flocked):
            os.close(fd)
            raise _refusal(
                workdir,
                path,
                previous,
                f", last heartbeat {age:.0f} s ago, on a file system whose locks other hosts "
                "cannot see",
            )
        logging.warning(
            "Taking over the lock %s from a training that ended without releasing it (%s).",
            path,
            _describe(previous),
        )
    return _Lock(path, fd, heartbeat=per_host)


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
    """Holds the training lock of ``workdir`` (an existing directory) inside the context.

    Process 0 takes it; with several processes every process learns the outcome, so all of
    them refuse together.

    Raises:
      WorkdirLockedError: another training holds it (on other processes: naming process 0's
        log for the holder).
    """
    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = _acquire(workdir)
        except WorkdirError as e:
            error = e
    if jax.process_count() > 1:
        ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
        if not ok and error is None:
            error = WorkdirLockedError(
                f"process 0 could not lock workdir {workdir} for training; its log names why"
            )
    if error is not None:
        raise error
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
