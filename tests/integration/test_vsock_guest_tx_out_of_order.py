"""The bench's vsock guests (the C stand-in bench/limits/vsock_guest.c and the Python model
bench/vsock_guest.py) take TX chains back in whatever order the device uses them, as Linux
does (virtqueue_get_buf_ctx_split takes the head the used element names), and still send an
exact stream. A fake device plays the back-end over the guest's shared memory and eventfds:
it takes the posted TX chains, checks each packet (the stream pattern, a payload buffer no
chain still in the device holds, a chain slot not still outstanding), keeps a random part
of them back and uses the rest in a shuffled order (as a zero-copy transmit would, keeping
a chain until the host peer has read it), and returns credit with CREDIT_UPDATE
packets on the RX queue. The guests must keep sending, with the engines taking the rings
over from each other while chains are held, and give every buffer back exactly once; a used
ring that names no outstanding chain must still fail them.

Spec: virtio 1.2 §2.7.8 (the used ring: without VIRTIO_F_IN_ORDER the device may use
buffers in any order; the id names the head), §2.7.14 (receiving used buffers), §5.10.6.4
(stream data arrives in order, without loss).
"""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time

import pytest

from bench.guest import GuestLayout, StreamQueue
from bench.guest_proc import Guest
from bench.vsock_guest import (MAX_PKT, PATTERN_PERIOD, STREAM_REF, FastVsockGuest, TxBuffers,
                               _Conn)
from vhost_user.frontend import GuestRam
from virtio.vsock.wire import HOST_CID, Op, Type, VsockHeader

CID, GUEST_PORT, HOST_PORT = 3, 1234, 5000
BUF_ALLOC = 256 * 1024
#: 16 descriptors: 8 TX chains of 2, so each slot and buffer is reused many times
QUEUE_SIZE = 16
_ONE = (1).to_bytes(8, "little")


class ShuffledTxDevice:
    """A vsock device over the guest's rings that uses TX chains out of order (see the
    module docstring). ``step()`` does one round; ``errors`` collects what the guest did
    wrong; ``lock`` is held during a round."""

    def __init__(self, layout: GuestLayout, rxq: StreamQueue, txq: StreamQueue,
                 seed: int) -> None:
        self.layout, self.rxq, self.txq = layout, rxq, txq
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.errors: list[str] = []
        #: (head, payload gpa of a RW packet or None, sequence number of the packet)
        self.pending: list[tuple[int, int | None, int]] = []
        self.tx_next = self.tx_used = self.rx_next = self.rx_used = 0
        self.stream_bytes = 0  # RW payload bytes taken, all checked against the pattern
        self.packets = self.completed = self.out_of_order = 0
        self.advertised = self.last_seq = 0

    def _u16(self, gpa: int) -> int:
        return int.from_bytes(self.layout.mv(gpa, 2), "little")

    def _desc(self, q: StreamQueue, i: int) -> tuple[int, int]:
        raw = self.layout.mv(q.desc_gpa + 16 * i, 12)
        return int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:12], "little")

    def _use(self, q: StreamQueue, idx: int, head: int, length: int) -> int:
        slot = self.layout.mv(q.used_gpa + 4 + 8 * (idx & (q.size - 1)), 8)
        slot[:] = head.to_bytes(4, "little") + length.to_bytes(4, "little")
        return (idx + 1) & 0xFFFF

    def _take_tx(self) -> None:
        q = self.txq
        avail = self._u16(q.avail_gpa + 2)
        while self.tx_next != avail:
            head = self._u16(q.avail_gpa + 4 + 2 * (self.tx_next & (q.size - 1)))
            self.tx_next = (self.tx_next + 1) & 0xFFFF
            if head % 2 or head >= q.size or any(h == head for h, _, _ in self.pending):
                self.errors.append(f"TX head {head} posted while outstanding or not a head")
                continue
            hdr_gpa, _ = self._desc(q, head)
            pay_gpa, pay_len = self._desc(q, head + 1)
            hdr = VsockHeader.unpack(bytes(self.layout.mv(hdr_gpa, VsockHeader.SIZE)))
            self.packets += 1
            if hdr.op == Op.RW:
                if any(g == pay_gpa for _, g, _ in self.pending):
                    self.errors.append(f"TX buffer {pay_gpa:#x} reused while in the device")
                ph = self.stream_bytes % PATTERN_PERIOD
                if hdr.len_ > min(pay_len, MAX_PKT) or \
                        bytes(self.layout.mv(pay_gpa, hdr.len_)) != STREAM_REF[ph:ph + hdr.len_]:
                    self.errors.append(f"TX payload at stream offset {self.stream_bytes} "
                                       "is not the pattern")
                self.stream_bytes += hdr.len_
                self.pending.append((head, pay_gpa, self.packets))
            elif hdr.op == Op.CREDIT_UPDATE:
                self.pending.append((head, None, self.packets))
            else:
                self.errors.append(f"unexpected TX op {hdr.op}")

    def _use_some_tx(self) -> None:
        """Use a random part of the held chains, shuffled; keep the rest for later."""
        if not self.pending:
            return
        self.rng.shuffle(self.pending)
        n = self.rng.randint(1, len(self.pending))
        done, self.pending = self.pending[:n], self.pending[n:]
        for head, _, seq in done:
            self.tx_used = self._use(self.txq, self.tx_used, head, 0)
            self.out_of_order += seq < self.last_seq  # posted before the one used last
            self.last_seq = seq
        self.completed += n
        self.layout.mv(self.txq.used_gpa + 2, 2)[:] = self.tx_used.to_bytes(2, "little")
        os.write(self.txq.call_fd, _ONE)

    def _credit_update(self) -> None:
        """The host read everything taken: tell the guest (fwd_cnt) in one RX packet."""
        q = self.rxq
        if self.advertised == self.stream_bytes or self.rx_next == self._u16(q.avail_gpa + 2):
            return
        head = self._u16(q.avail_gpa + 4 + 2 * (self.rx_next & (q.size - 1)))
        self.rx_next = (self.rx_next + 1) & 0xFFFF
        hdr_gpa, _ = self._desc(q, head)
        self.layout.mv(hdr_gpa, VsockHeader.SIZE)[:] = VsockHeader(
            int(HOST_CID), CID, HOST_PORT, GUEST_PORT, 0, int(Type.STREAM),
            int(Op.CREDIT_UPDATE), 0, BUF_ALLOC, self.stream_bytes & 0xFFFFFFFF).pack()
        self.rx_used = self._use(q, self.rx_used, head, VsockHeader.SIZE)
        self.layout.mv(q.used_gpa + 2, 2)[:] = self.rx_used.to_bytes(2, "little")
        self.advertised = self.stream_bytes
        os.write(q.call_fd, _ONE)

    def step(self) -> None:
        with self.lock:
            self._take_tx()
            self._use_some_tx()
            self._credit_update()

    def take_only(self) -> None:
        """Take the posted TX chains, use none, return no credit."""
        with self.lock:
            self._take_tx()

    def drain(self) -> None:
        """Use every held chain (the host read everything)."""
        with self.lock:
            self._take_tx()
            while self.pending:
                self._use_some_tx()

    def run_in_thread(self, stop: threading.Event) -> threading.Thread:
        def loop() -> None:
            while not stop.is_set():
                self.step()
                time.sleep(0.0003)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        return thread


class _NoFrontend:
    """The fake device stands for the back-end: there is nothing to negotiate."""

    def get_config(self, offset: int, size: int) -> bytes:
        return CID.to_bytes(8, "little")[offset:offset + size]

    def close(self) -> None:
        pass


class _ShellGuest(Guest):
    """``bench.guest_proc.Guest`` without a front-end: RAM and queues only."""

    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.fe = _NoFrontend()
        self.ram = GuestRam([(0, spec["ram_bytes"])])
        region = self.ram.memory.regions[0]
        self.layout = GuestLayout(region.view, region.gpa)
        self.queues: dict[int, StreamQueue] = {}
        self.rescues = 0

    def start(self, queues, extra=(), device_features=0) -> None:
        self.queues.update({q.index: q for q in queues})


class _FakeDeviceGuest(FastVsockGuest, _ShellGuest):
    """The bench's Python vsock guest (and its C hand-over), facing the fake device."""


def _connected_guest() -> tuple[_FakeDeviceGuest, ShuffledTxDevice, _Conn]:
    guest = _FakeDeviceGuest({"workload": "vsock-tx", "queue_size": QUEUE_SIZE,
                              "buf_alloc": BUF_ALLOC, "port": GUEST_PORT,
                              "ram_bytes": 8 << 20})
    conn = _Conn(GUEST_PORT, HOST_PORT, BUF_ALLOC)
    conn.peer_buf_alloc = BUF_ALLOC
    guest.conns[(GUEST_PORT, HOST_PORT)] = conn
    guest.accepted.append(conn)
    device = ShuffledTxDevice(guest.layout, guest.rxq, guest.txq, seed=31)
    return guest, device, conn


def _check_tx_state(guest: _FakeDeviceGuest, device: ShuffledTxDevice) -> None:
    """With the device paused (after it took what the guest posted last): the chains and
    buffers the guest counts as outstanding are those the device holds."""
    with device.lock:
        device._take_tx()
        guest._tx_free()
        bufs = guest.tx_buffers
        held_slots = {k for k in range(bufs.txq.chains) if bufs.posted[k]}
        assert held_slots == {h // 2 for h, _, _ in device.pending}
        assert sorted(bufs.free_chains + sorted(held_slots)) == list(range(bufs.txq.chains))
        held = {bufs.gpa + i * MAX_PKT for i in bufs.held if i is not None}
        assert held == {g for _, g, _ in device.pending if g is not None}
        assert len(bufs.free) + len(held) == bufs.count
        assert set(bufs.free).isdisjoint((g - bufs.gpa) // MAX_PKT for g in held)


@pytest.mark.parametrize("engines", ["c", "py", "c py c py"])
def test_spec_2_7_8_c_and_python_guests_take_tx_chains_used_in_any_order(engines):
    """Runs of the C stand-in, of the Python model, and of both in turn against a device
    that uses TX chains out of order; each engine takes over the chains and buffers the
    other left in the device."""
    guest, device, conn = _connected_guest()
    stop = threading.Event()
    thread = device.run_in_thread(stop)
    try:
        runs = []
        for engine in engines.split():
            runs.append(guest.run_c(0.15) if engine == "c" else guest.run_py(0.15))
            assert device.errors == []
            _check_tx_state(guest, device)
    finally:
        stop.set()
        thread.join(5)
    assert device.errors == []
    assert sum(r["bytes"] for r in runs) == conn.tx_bytes
    assert all(r["bytes"] > 0 for r in runs), runs
    device.drain()
    guest._tx_free()
    bufs = guest.tx_buffers
    assert device.stream_bytes == conn.tx_bytes
    assert conn.tx_phase == conn.tx_bytes % PATTERN_PERIOD
    assert sorted(bufs.free) == list(range(bufs.count))
    assert sorted(bufs.free_chains) == list(range(guest.txq.chains))
    assert device.packets > 10 * guest.txq.chains  # every slot reused
    assert device.out_of_order > device.completed // 4  # the order really was shuffled
    guest.rxq.close()
    guest.txq.close()
    guest.close()


def _broken_used_ring(device: ShuffledTxDevice, kind: str) -> None:
    """Publish a used ring a correct device never writes, over the chains it took."""
    heads = [h for h, _, _ in device.pending]
    free_head = next(2 * k for k in range(device.txq.chains) if 2 * k not in heads)
    elems = {"not a head": [heads[0] + 1], "a free chain": [free_head],
             "used twice": [heads[0], heads[0]],
             "more used than outstanding": heads + [heads[0]]}[kind]
    for head in elems:
        device.tx_used = device._use(device.txq, device.tx_used, head, 0)
    device.layout.mv(device.txq.used_gpa + 2, 2)[:] = device.tx_used.to_bytes(2, "little")


BROKEN = ["not a head", "a free chain", "used twice", "more used than outstanding"]


@pytest.mark.parametrize("kind", BROKEN)
def test_spec_2_7_8_c_guest_fails_on_a_used_id_that_is_no_outstanding_head(kind):
    """The C stand-in, with 4 RW chains of 8 outstanding (256 KiB of credit), sees a used
    element that names no outstanding chain, or too many used: it fails the run."""
    guest, device, _ = _connected_guest()
    try:
        argv, fds = guest.c_guest_command(0.3)
        proc = subprocess.Popen(argv, pass_fds=fds, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 10
        while len(device.pending) < 4 and time.monotonic() < deadline:
            device.take_only()
            time.sleep(0.001)
        assert len(device.pending) == 4
        _broken_used_ring(device, kind)
        os.write(guest.txq.call_fd, _ONE)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 3, (out, err)
        assert "TX used ring inconsistent" in err
    finally:
        guest.rxq.close()
        guest.txq.close()
        guest.close()


@pytest.mark.parametrize("kind", BROKEN)
def test_spec_2_7_8_python_guest_fails_on_a_used_id_that_is_no_outstanding_head(kind):
    """The Python model, in the same state, raises on the same used rings."""
    guest, device, _ = _connected_guest()
    try:
        guest.run_py(0.02)  # 4 RW chains of 8 outstanding: the device uses none
        device.take_only()
        assert len(device.pending) == 4
        _broken_used_ring(device, kind)
        with pytest.raises(RuntimeError, match="TX used ring inconsistent"):
            guest._tx_free()
    finally:
        guest.rxq.close()
        guest.txq.close()
        guest.close()


def test_tx_buffers_resume_rejects_free_slots_that_do_not_match_the_ring():
    """The hand-over state must agree with the ring: as many free slots as chains not
    outstanding, each slot once."""
    ram = GuestRam([(0, 4 << 20)])
    try:
        layout = GuestLayout(ram.memory.regions[0].view, 0)
        txq = StreamQueue(layout, 1, QUEUE_SIZE, [44, MAX_PKT])
        bufs = TxBuffers(layout, txq)
        for pos in range(3):
            bufs.take(bufs.post(pos), 100)
        txq.publish(3)
        with pytest.raises(RuntimeError):
            bufs.resume()  # chains are outstanding
        with pytest.raises(RuntimeError):
            bufs.resume([7, 6, 5, 4, 3, 3])
        with pytest.raises(RuntimeError):
            bufs.resume([7, 6, 5, 4])
        bufs.resume([7, 6, 5, 4, 3])
        assert bufs.held[:3] == [0, 1, 2]  # slots 0, 1, 2 took buffers 0, 1, 2
        assert bufs.free == [7, 6, 5, 4, 3]
        txq.close()
    finally:
        ram.close()
