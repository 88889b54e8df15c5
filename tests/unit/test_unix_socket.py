"""Listening UNIX sockets: mode 0600, stale files replaced, live listeners and other files
never clobbered (two processes with one path must not steal each other's clients)."""

import os
import socket
import stat

import pytest

from vhost_user.unix_socket import SUN_PATH_MAX, file_identity, listen_unix, unlink_if_ours


def test_socket_is_0600_and_nonblocking(tmp_path):
    path = str(tmp_path / "a.sock")
    sock = listen_unix(path, 4)
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert sock.getblocking() is False
    assert os.listdir(tmp_path) == ["a.sock"]  # no temporary directory left behind
    sock.close()


def test_stale_socket_is_replaced_but_a_live_one_is_refused(tmp_path):
    path = str(tmp_path / "a.sock")
    live = listen_unix(path, 4)
    with pytest.raises(FileExistsError, match="another process is listening"):
        listen_unix(path, 4)
    live.close()  # the file stays behind: stale
    again = listen_unix(path, 4)
    again.close()


def test_live_seqpacket_listener_is_detected(tmp_path):
    path = str(tmp_path / "a.sock")
    live = listen_unix(path, 4, kind=socket.SOCK_SEQPACKET)
    with pytest.raises(FileExistsError):
        listen_unix(path, 4)
    live.close()


def test_other_files_are_never_replaced(tmp_path):
    path = tmp_path / "precious"
    path.write_text("data")
    with pytest.raises(FileExistsError, match="not a socket"):
        listen_unix(str(path), 4)
    assert path.read_text() == "data"


def test_too_long_path_is_a_clear_error(tmp_path):
    with pytest.raises(OSError, match="longer than"):
        listen_unix(str(tmp_path / ("x" * SUN_PATH_MAX)), 4)


def test_unlink_only_our_own_socket(tmp_path):
    path = str(tmp_path / "a.sock")
    ours = listen_unix(path, 4)
    identity = file_identity(path)
    ours.close()
    os.unlink(path)
    theirs = listen_unix(path, 4)  # someone else took the path meanwhile
    unlink_if_ours(path, identity)
    assert os.path.exists(path)
    unlink_if_ours(path, file_identity(path))
    assert not os.path.exists(path)
    theirs.close()
