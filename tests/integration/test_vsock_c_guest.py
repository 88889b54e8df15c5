"""The C stand-in for the guest's vsock driver (bench/limits/vsock_guest.c) checks what it
receives, so a broken back-end path cannot look fast: here a fake device puts one RX
packet into its ring by hand (right, with a corrupted payload, with a used length that
does not match the header) and the helper must accept exactly the right one.

Spec: virtio 1.2 §5.10.6 (one packet per RX buffer: header, then ``len`` payload bytes),
§2.7.8 (the used ring: id and written length).
"""

from __future__ import annotations

import json
import subprocess

import pytest

from bench.guest import GuestLayout, StreamQueue
from bench.limits.build import helper_path
from bench.vsock_guest import TxBuffers
from vhost_user.frontend import GuestRam
from virtio.vsock.wire import Op, Type, VsockHeader

CID, GUEST_PORT, HOST_PORT = 3, 1234, 5000


def _run(payload: bytes, used_len_delta: int = 0, len_field: int | None = None,
         tx: dict | None = None):
    """Run the helper over a hand-made ring. ``tx``: a guest->host run instead (tx_workload
    with that much peer credit and that ``tx_phase``); returns ``(proc, the payload bytes of
    the TX chains it published, in order)``."""
    ram = GuestRam([(0, 4 << 20)])
    try:
        region = ram.regions[0]
        layout = GuestLayout(ram.memory.regions[0].view, 0)
        rxq = StreamQueue(layout, 0, 16, [44, 4096], writable=True)
        txq = StreamQueue(layout, 1, 16, [44, 65536])
        pool = TxBuffers(layout, txq)
        rxq.publish()
        n = len(payload) if len_field is None else len_field
        hdr = VsockHeader(src_cid=2, dst_cid=CID, src_port=HOST_PORT, dst_port=GUEST_PORT,
                          len_=n, type_=int(Type.STREAM), op=int(Op.RW), flags=0,
                          buf_alloc=262144 if tx is None else tx["credit"],
                          fwd_cnt=0).pack()
        rxq.chain_buffer(0, 0)[:44] = hdr
        rxq.chain_buffer(0, 1)[:len(payload)] = payload
        rxq.used_ring[0] = (0, 44 + len(payload) + used_len_delta)
        rxq._used_idx[0] = 1
        fds = (ram.fd, rxq.kick_fd, rxq.call_fd, txq.kick_fd, txq.call_fd)
        args = dict(tx_workload=0, micros=20000, mem_fd=ram.fd, mem_offset=0,
                    ram_size=region.memory_size, gpa_base=0, rx_desc=rxq.desc_gpa,
                    rx_avail=rxq.avail_gpa, rx_used=rxq.used_gpa, rx_size=16,
                    tx_desc=txq.desc_gpa, tx_avail=txq.avail_gpa, tx_used=txq.used_gpa,
                    tx_size=16, rx_avail_idx=rxq.avail_idx, rx_last_used=0, tx_avail_idx=0,
                    tx_last_used=0, rx_kick=rxq.kick_fd, rx_call=rxq.call_fd,
                    tx_kick=txq.kick_fd, tx_call=txq.call_fd, cid=CID,
                    local_port=GUEST_PORT, peer_port=HOST_PORT, buf_alloc=262144,
                    fwd_cnt=0, rx_cnt=0, last_fwd_cnt=0, tx_cnt=0, peer_buf_alloc=262144,
                    peer_fwd_cnt=0, owe_credit_update=0, tx_phase=0, tx_pool=pool.gpa,
                    tx_pool_bufs=pool.count)
        if tx is not None:
            args.update(tx_workload=1, tx_phase=tx["phase"])  # credit: the RX header's
        proc = subprocess.run([str(helper_path("vsock_guest"))]
                              + [f"{k}={v}" for k, v in args.items()], pass_fds=fds,
                              capture_output=True, text=True, timeout=30)
        sent = b""
        if tx is not None and proc.returncode == 0:
            out = json.loads(proc.stdout)
            desc = layout.mv(txq.desc_gpa, 16 * txq.size).cast("Q")
            for k in range(out["tx_avail_idx"]):
                hdr = VsockHeader.unpack(bytes(txq.chain_buffer(k % txq.chains, 0)[:44]))
                payload = desc[2 * (2 * (k % txq.chains) + 1)]  # chain k's descriptor 1
                sent += bytes(layout.mv(payload, hdr.len_))
        rxq.close()
        txq.close()
        return proc if tx is None else (proc, sent)
    finally:
        ram.close()


def test_accepts_the_host_bytes_and_counts_them():
    proc = _run(b"\x5a" * 3000)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (out["rx_bytes"], out["fwd_cnt"], out["rx_last_used"]) == (3000, 3000, 1)


@pytest.mark.parametrize("payload, delta, len_field, message", [
    (b"\x5a" * 1000 + b"\x00" + b"\x5a" * 99, 0, None, "payload differs"),
    (b"\x5a" * 100, 8, None, "does not match"),
    (b"\x5a" * 100, 0, 5000, "does not match"),
])
def test_spec_5_10_6_rejects_a_wrong_packet(payload, delta, len_field, message):
    proc = _run(payload, delta, len_field)
    assert proc.returncode == 3 and message in proc.stderr


@pytest.mark.parametrize("phase", [0, 4092, 1000])
def test_sends_the_guest_to_host_stream_pattern(phase):
    """Guest->host payload is the stream pattern from the given phase on, the bytes the
    host sink checks (bench/limits/peer.c; the Python model writes the same); the phase it
    ends at is reported, and so is its peak use of TX pool buffers: one per RW packet in
    flight (4 here: the device uses none). Spec: virtio 1.2 §5.10.6 (header, then ``len``
    bytes)."""
    from bench.vsock_guest import PATTERN_PERIOD, _stream_ref

    credit = 3 * 65536 + 1234
    proc, sent = _run(b"", tx={"credit": credit, "phase": phase})
    assert proc.returncode == 0, proc.stderr
    ref = _stream_ref(phase + credit)
    assert sent == ref[phase:]
    out = json.loads(proc.stdout)
    assert out["tx_phase"] == (phase + credit) % PATTERN_PERIOD
    assert out["tx_buffers_peak"] == 4  # one pool buffer per RW packet in flight
