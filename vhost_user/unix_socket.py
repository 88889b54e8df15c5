"""Listening UNIX sockets, created the same safe way by every endpoint of vmchannel.

The vhost-user endpoints, the management socket, console port sockets and the hybrid-vsock
sockets all listen on paths that users and QEMU name, so they share one set of rules:

- mode 0600 from the first moment: the socket is bound inside a fresh private directory
  (mode 0700) next to ``path``, chmod'ed, then renamed into place, so nobody can connect
  through looser permissions in between (where that temporary name would not fit
  ``sun_path``, it binds at ``path`` under umask 0177 instead);
- a leftover socket file nobody listens on is replaced; a socket another process still
  listens on, or a file that is not a socket, is refused with ``FileExistsError``, so two
  processes configured with the same path never steal each other's clients.

This lives in ``vhost_user`` because the dependency direction lets both ``vhost_user`` and
``virtio`` import it (STYLE R1); it is plain socket code.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import tempfile

log = logging.getLogger(__name__)

SUN_PATH_MAX = 107
"""sockaddr_un.sun_path is 108 bytes including the terminating NUL (unix(7))."""


def listen_unix(path: str, backlog: int, *, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A non-blocking, close-on-exec listening UNIX socket at ``path`` with mode 0600."""
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise OSError(errno.ENAMETOOLONG, f"longer than {SUN_PATH_MAX} bytes", path)
    remove_stale_socket(path)
    parent = os.path.dirname(os.path.abspath(path))
    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    try:
        tmpdir = tempfile.mkdtemp(prefix=".vmc", dir=parent)
        tmp_path = os.path.join(tmpdir, "s")
        try:
            if len(os.fsencode(tmp_path)) <= SUN_PATH_MAX:
                sock.bind(tmp_path)
                os.chmod(tmp_path, 0o600)
                os.rename(tmp_path, path)
            else:
                old_umask = os.umask(0o177)
                try:
                    sock.bind(path)
                finally:
                    os.umask(old_umask)
                os.chmod(path, 0o600)
        finally:
            try:
                os.unlink(tmp_path)
            except FileNotFoundError:
                pass
            os.rmdir(tmpdir)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def remove_stale_socket(path: str) -> None:
    """Unlink a socket file at ``path`` that nobody listens on; refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket", path)
    if _someone_listens(path):
        raise FileExistsError(errno.EADDRINUSE, "another process is listening on this socket",
                              path)
    log.info("replacing stale socket %s", path)
    os.unlink(path)


def _someone_listens(path: str) -> bool:
    """A stream probe: refused means stale; connected, busy (timeout) or EPROTOTYPE (a
    listener of another socket type, e.g. SOCK_SEQPACKET) mean alive."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)  # a full backlog would block connect()
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except TimeoutError:
        return True
    except OSError as exc:
        return exc.errno == errno.EPROTOTYPE
    finally:
        probe.close()
    return True


def file_identity(path: str) -> tuple[int, int, int]:
    """What tells our socket file from a later one at the same path: device, inode and
    change time (inode numbers are reused as soon as a file is gone)."""
    st = os.lstat(path)
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


def unlink_if_ours(path: str, identity: tuple[int, int, int]) -> None:
    """Remove the socket file at ``path`` if it is still the one we created."""
    try:
        if file_identity(path) == identity:
            os.unlink(path)
    except FileNotFoundError:
        pass
