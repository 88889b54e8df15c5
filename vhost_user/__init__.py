"""vhost-user: wire formats, the back-end session, the socket adapter and a minimal front-end.

Serving a device (the event loop is ``virtio.loop.EventLoop``)::

    from vhost_user import Listener, Connector
    listener = Listener(loop, "/run/vm1-console.sock", device)   # QEMU connects to us
    connector = Connector(loop, "/run/qemu-vsock.sock", device)  # QEMU server=on
    ...
    listener.close()

``device`` implements :class:`vhost_user.device.VhostUserDevice`; it receives
:class:`vhost_user.device.QueueHandle` objects for live queues. A device asks for a
config-change notification with ``listener.connection.session.notify_config()``.

Spec: vhost-user (QEMU revision in docs/spec-refs.md).
"""

from vhost_user.connection import Connection, Connector, Listener, signal_eventfd
from vhost_user.device import QueueHandle, VhostUserDevice
from vhost_user.errors import (BackendError, FrontendProtocolError, HostIOError,
                               ProtocolError, StateError)
from vhost_user.session import BackendSession, Reply

__all__ = [
    "BackendError", "BackendSession", "Connection", "Connector", "FrontendProtocolError",
    "HostIOError", "Listener", "ProtocolError", "QueueHandle", "Reply", "StateError",
    "VhostUserDevice", "signal_eventfd",
]
