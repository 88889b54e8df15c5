"""Management commands of the vsock backend (QMP framing, `virtio.qmp.CommandRegistry`).

* ``query-vsock-connections`` ``{"cid"?: int}`` → one object per connection (host and
  sibling): ``cid``, ``local-port`` (the host-side port), ``peer-port`` (the guest port),
  ``type`` (stream | seqpacket), ``state``, ``initiator`` (host | guest | sibling ...),
  ``bytes-to-host``, ``bytes-to-guest``, ``buffered-bytes``.
* ``query-vsock-stats`` ``{"cid"?: int}`` → one object per VM: ``cid``, ``uds-path``,
  ``groups``, ``queues`` (the live virtqueues), ``connections``, ``transport-resets-sent``,
  ``stream-loop-runs`` / ``stream-loop-bytes`` (calls into the C stream loop and the bytes
  it moved to the guest: virtio/vsock/stream_loop.py), and every packet / drop counter of
  the muxer and the host adapter (names with ``-``).

An unknown ``cid`` answers ``DeviceNotFound``.

Spec: DESIGN.md "Management" (list vsock connections, statistics).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from virtio.qmp import ErrorClass, QmpCommandError

if TYPE_CHECKING:  # pragma: no cover
    from .device import VsockBackend


def _dashed(obj: Any) -> dict[str, Any]:
    return {f.name.replace("_", "-"): getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _cids(backend: "VsockBackend", arguments: dict) -> list[int]:
    devices = backend.devices
    if "cid" in arguments:
        cid = arguments["cid"]
        if cid not in devices:
            raise QmpCommandError(ErrorClass.DeviceNotFound, f"no vsock VM with guest CID {cid}")
        return [cid]
    return sorted(devices)


def query_vsock_connections(backend: "VsockBackend", arguments: dict) -> list[dict]:
    rows: list[dict] = []
    seen = set()
    for cid in _cids(backend, arguments):
        for info in backend.muxer.connections(cid):
            ident = (info.cid, info.local_port, info.peer_port, info.initiator)
            if ident in seen:  # a sibling connection is listed under both of its VMs
                continue
            seen.add(ident)
            rows.append(_dashed(info))
    return rows


def query_vsock_stats(backend: "VsockBackend", arguments: dict) -> list[dict]:
    out = []
    for cid in _cids(backend, arguments):
        device = backend.device(cid)
        row: dict[str, Any] = {
            "cid": cid,
            "uds-path": device.config.uds_path,
            "groups": list(getattr(device.config, "groups", ())),
            "queues": device.live_queues,
            "connections": len(backend.muxer.connections(cid)),
            "transport-resets-sent": device.events_sent,
            "stream-loop-runs": device.stream_loop_runs,
            "stream-loop-bytes": device.stream_loop_bytes,
        }
        row.update(_dashed(backend.muxer.stats(cid)))
        host_stats = backend.host.stats.get(cid)
        if host_stats is not None:
            row.update(_dashed(host_stats))
        out.append(row)
    return out


def register_vsock_commands(registry: Any, backend: "VsockBackend") -> None:
    """Register the vsock commands with the daemon's registry."""
    registry.register("query-vsock-connections",
                      lambda args: query_vsock_connections(backend, args),
                      args_schema={"*cid": "int"})
    registry.register("query-vsock-stats", lambda args: query_vsock_stats(backend, args),
                      args_schema={"*cid": "int"})
