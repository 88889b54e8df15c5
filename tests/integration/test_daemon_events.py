"""Management events of the process itself, seen through QEMU's own ``qemu.qmp`` client:
a front-end connecting, the device reset when it goes, and the disconnection.

Spec: DESIGN.md "Management" (events: front-end connected/disconnected, device reset);
QEMU docs/interop/qmp-spec.rst (asynchronous events).
"""

from __future__ import annotations

import asyncio
import threading

from qemu import qmp

from vhost_user.frontend import VhostUserFrontend
from virtio.config import Config
from virtio.daemon import Daemon


def test_frontend_and_reset_events_reach_a_qmp_client(tmp_path):
    vu, mgmt = str(tmp_path / "echo.sock"), str(tmp_path / "mgmt.sock")
    daemon = Daemon(Config(echo_sockets=(vu,), mgmt_socket=mgmt))
    daemon.start()
    stop = threading.Event()
    thread = threading.Thread(target=lambda: [daemon.loop.run_once(0.01)
                                              for _ in iter(stop.is_set, True)], daemon=True)
    thread.start()

    async def session() -> list[tuple[str, dict]]:
        client = qmp.QMPClient("test")
        await client.connect(mgmt)
        try:
            devices = await client.execute("query-devices")
            assert devices == [{"type": "echo", "socket": vu, "frontend-connected": False}]
            fe = await asyncio.to_thread(VhostUserFrontend.connect, vu)
            await asyncio.to_thread(fe.init)
            seen = [await asyncio.wait_for(client.events.get(), 5)]
            assert (await client.execute("query-devices"))[0]["frontend-connected"] is True
            fe.close()
            seen += [await asyncio.wait_for(client.events.get(), 5) for _ in range(2)]
            return [(e["event"], e["data"]) for e in seen]
        finally:
            await client.disconnect()

    try:
        events = asyncio.run(session())
    finally:
        stop.set()
        thread.join(5)
        daemon.close()
        daemon.loop.close()
    data = {"socket": vu, "device": "echo"}
    assert events == [("FRONTEND_CONNECTED", data), ("DEVICE_RESET", data),
                      ("FRONTEND_DISCONNECTED", data)]
