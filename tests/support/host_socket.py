"""The host side of a stream pump test: a non-blocking AF_UNIX socketpair (the device's end,
the host peer's end) and a read of what the peer can get now.

Spec: virtio 1.2 §5.3.6 (a console port is a byte stream to a host peer).
"""

from __future__ import annotations

import socket


def host_socket_pair(sndbuf: int | None = None) -> tuple[socket.socket, socket.socket]:
    """``(dev, host)``: both non-blocking; ``sndbuf`` sets the device end's SO_SNDBUF (the
    only queue between the two ends of a UNIX stream socket)."""
    dev, host = socket.socketpair()
    dev.setblocking(False)
    host.setblocking(False)
    if sndbuf:
        dev.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    return dev, host


def read_available(sock: socket.socket, limit: int = 1 << 62) -> bytes:
    """Up to ``limit`` bytes: what ``sock`` has now, stopping at EAGAIN or end of file."""
    data = bytearray()
    while len(data) < limit:
        try:
            chunk = sock.recv(min(1 << 20, limit - len(data)))
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)
