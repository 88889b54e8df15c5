"""The guest side of the vsock scenarios.

Two drivers:

* :class:`FastVsockGuest` (workloads ``vsock-tx``, ``vsock-rx``): split rings with pre-built
  chains (``bench.guest.StreamQueue``), as ``bench/guest.py`` does for the console, so the
  figure measures the back-end and not a Python guest model. RX chains are a 44-byte header
  descriptor + one 4 KiB payload descriptor (Linux posts ``VIRTIO_VSOCK_DEFAULT_RX_BUF_SIZE``
  buffers); TX chains are a header descriptor + one 64 KiB payload descriptor
  (``VIRTIO_VSOCK_MAX_PKT_BUF_SIZE``) pointed, as the chain is posted, at a buffer taken for
  that packet from a free stack and given back when the chain is used (:class:`TxBuffers`:
  Linux kmallocs each packet's buffer and frees it then, so a few buffers stay hot). Per
  batch of used buffers the guest reads all headers with one numpy gather and handles the
  data packets of its connection as a vector (byte counts, credit fields); only control
  packets (REQUEST, CREDIT_UPDATE, ...) take Python per packet. Credit follows Linux ``virtio_transport_common.c``: every packet
  carries ``buf_alloc``/``fwd_cnt``, the application consumes everything at once, a
  CREDIT_UPDATE is sent when the peer's view of our free space falls below 64 KiB, RW
  packets never exceed the peer's credit.
* :class:`ModelVsockGuest` (``vsock-conns``): the general guest model
  (``tests/support/vsock_guest.py``), for the many-connections scenario where per-packet
  Python does not matter.

Spec: virtio 1.2 §5.10.6 (Device Operation), §5.10.6.3 (Buffer Space Management), §2.7.10
(used_event / avail_event).
"""

from __future__ import annotations

import json
import os
import select
import struct
import subprocess
import time

import numpy as np

from bench.guest import GuestLayout, StreamQueue
from bench.guest_proc import Guest
from virtio.vsock.wire import HOST_CID, Op, Type, VsockHeader

HDR = VsockHeader.SIZE
MAX_PKT = 64 * 1024
RX_BUF = 4096
U32 = 0xFFFFFFFF
_RW, _REQUEST, _RESPONSE, _RST = int(Op.RW), int(Op.REQUEST), int(Op.RESPONSE), int(Op.RST)
_SHUTDOWN, _CREDIT_UPDATE, _CREDIT_REQUEST = (int(Op.SHUTDOWN), int(Op.CREDIT_UPDATE),
                                              int(Op.CREDIT_REQUEST))
#: ``struct virtio_vsock_hdr`` as a numpy record (44 bytes, little-endian, packed).
HDR_DTYPE = np.dtype([("src_cid", "<u8"), ("dst_cid", "<u8"), ("src_port", "<u4"),
                      ("dst_port", "<u4"), ("len", "<u4"), ("type", "<u2"), ("op", "<u2"),
                      ("flags", "<u4"), ("buf_alloc", "<u4"), ("fwd_cnt", "<u4")])
assert HDR_DTYPE.itemsize == HDR
_HDR_UNPACK = VsockHeader.FMT.unpack_from
#: field positions in a ``VsockHeader.FMT`` tuple
_DST_PORT, _SRC_PORT, _LEN, _OP, _BUF_ALLOC, _FWD_CNT = 3, 2, 4, 6, 8, 9
#: at most this many used RX buffers are handled without numpy
FEW = 8


#: The guest->host stream pattern (the C stand-in bench/limits/vsock_guest.c writes the
#: same, and the host sink bench/limits/peer.c checks every byte): byte o of a stream is
#: byte o % PATTERN_PERIOD of an xorshift32 sequence (top bytes, from 0x9e3779b9).
PATTERN_PERIOD = 4093


def _stream_ref(length: int) -> bytes:
    """The pattern from stream offset 0, ``length`` bytes (past the period it repeats)."""
    x, out = 0x9E3779B9, bytearray(PATTERN_PERIOD)
    for j in range(PATTERN_PERIOD):
        x ^= (x << 13) & U32
        x ^= x >> 17
        x ^= (x << 5) & U32
        out[j] = x >> 24
    return (bytes(out) * (length // PATTERN_PERIOD + 1))[:length]


STREAM_REF = _stream_ref(PATTERN_PERIOD + MAX_PKT)


class TxBuffers:
    """The TX chains and payload buffers of the vsock guest.

    Buffers: Linux 6.1 ``virtio_transport_alloc_pkt`` kmallocs each packet's payload buffer
    (len > 0 only) and ``virtio_transport_tx_work`` frees it once the device has used the
    chain; 64 KiB blocks come from the buddy allocator, most recently freed first. So: a
    pool of ``txq.chains`` 64 KiB buffers in guest RAM (64 KiB-aligned, as an order-4
    block) and a free stack; a RW packet pops the top buffer and its chain's payload
    descriptor is pointed at it; a control packet's at the idle buffer after the pool
    (nothing writes it; the device reads 0 bytes).

    Chains: the device may use them in any order (no VIRTIO_F_IN_ORDER; the used element's
    id names the head; a zero-copy transmit would keep a chain until the host peer read its
    pages: the back-end's was tried and reverted, bench/results/ANALYSIS.md "Sixth
    session"). Linux takes whatever head each used element names
    (``virtqueue_get_buf_ctx_split``) and ``detach_buf_split`` puts the chain's descriptors
    at the head of the free descriptor list, so the chain freed last is reused first. The
    chains stay pre-built (``bench.guest.StreamQueue``: chain ``k`` is descriptors
    ``k*segs ..``), so the free list is a stack of chain slots (:attr:`free_chains`, top
    last, slot 0 on top at start as Linux's list starts at descriptor 0); a packet pops the
    top slot and writes its head into the avail ring (:meth:`post`). Used elements that
    name no outstanding chain's head, or more used than outstanding, raise.

    The C stand-in (bench/limits/vsock_guest.c) keeps the same rules, and either takes the
    rings over from the other with :meth:`resume`: which slots are free is handed over
    (``tx_free_chains``: it cannot be read from the rings once chains complete out of
    order); the outstanding chains' payload descriptors say which buffers are held.

    Spec: virtio 1.2 §2.7.5 (the descriptor table), §2.7.8 (the used ring), §2.7.13
    (supplying buffers), §2.7.14 (receiving used buffers).
    """

    def __init__(self, layout: GuestLayout, txq: StreamQueue) -> None:
        if txq.segs != 2:
            raise ValueError("vsock TX chains are a header and a payload descriptor")
        self.txq = txq
        self.count = txq.chains
        self.gpa = layout.alloc((self.count + 1) * MAX_PKT, MAX_PKT)
        self.idle_gpa = self.gpa + self.count * MAX_PKT
        self.layout = layout
        #: the payload descriptors' ``addr`` fields (u64 each), one per chain
        self._desc = layout.mv(txq.desc_gpa, 16 * txq.size).cast("Q")
        #: the avail ring's entries (u16 each)
        self._avail_ring = layout.mv(txq.avail_gpa + 4, 2 * txq.size).cast("H")
        #: the used ring as u32 words: id, len, id, len, ...
        self._used_words = layout.mv(txq.used_gpa + 4, 8 * txq.size).cast("I")
        self.held: list[int | None] = [None] * txq.chains
        self.free: list[int] = []
        self.free_chains: list[int] = []
        self.posted: list[bool] = [False] * txq.chains
        self.resume()

    def resume(self, free_chains: list[int] | None = None) -> None:
        """Take the TX ring over as it is (at start, or after the C stand-in ran):
        ``free_chains`` are the free slots, bottom to top (``None``: nothing is outstanding,
        every slot is free, slot 0 on top)."""
        q = self.txq
        if free_chains is None:
            if q.outstanding:
                raise RuntimeError("TX chains are outstanding: say which slots are free")
            free_chains = list(reversed(range(q.chains)))
        posted = [True] * q.chains
        for k in free_chains:
            if not 0 <= k < q.chains or not posted[k]:
                raise RuntimeError(f"free TX chain slots {free_chains} are not distinct slots")
            posted[k] = False
        if q.chains - len(free_chains) != q.outstanding:
            raise RuntimeError(f"{len(free_chains)} free TX chains but {q.outstanding} of "
                               f"{q.chains} outstanding")
        held: list[int | None] = [None] * q.chains
        for k in range(q.chains):
            addr = self._desc[2 * (k * q.segs + 1)]
            if not posted[k] or addr == self.idle_gpa:
                continue
            i, rest = divmod(addr - self.gpa, MAX_PKT)
            if rest or not 0 <= i < self.count or i in held:
                raise RuntimeError(f"TX chain {k} holds {addr:#x}, not a pool buffer of its "
                                   "own")
            held[k] = i
        taken = set(held)
        self.held, self.posted, self.free_chains = held, posted, list(free_chains)
        self.free = [i for i in reversed(range(self.count)) if i not in taken]

    def post(self, pos: int) -> int:
        """Take the free chain slot on top and put its head at avail ring position ``pos``
        (published later, by ``txq.publish``); returns the slot."""
        k = self.free_chains.pop()
        self.posted[k] = True
        self._avail_ring[pos & (self.txq.size - 1)] = k * self.txq.segs
        return k

    def take(self, k: int, length: int) -> memoryview:
        """Point chain ``k``'s payload descriptor at the top free buffer; its first
        ``length`` bytes, for the payload."""
        if self.held[k] is not None:
            raise RuntimeError(f"TX chain {k} posted while it holds a buffer")
        i = self.held[k] = self.free.pop()
        gpa = self.gpa + i * MAX_PKT
        self._desc[2 * (k * self.txq.segs + 1)] = gpa
        return self.layout.mv(gpa, length)

    def no_payload(self, k: int) -> None:
        """Point chain ``k``'s payload descriptor at the idle buffer (a control packet)."""
        self._desc[2 * (k * self.txq.segs + 1)] = self.idle_gpa

    def reap(self) -> int:
        """Take every used chain, in the order the device used them: each used element must
        name an outstanding chain's head; its slot goes back on top of the free slots and
        its buffer on top of the free stack. Returns the number of chains taken."""
        q = self.txq
        used = q._used_idx[0]
        n = (used - q.last_used) & 0xFFFF
        if n == 0:
            return 0
        if n > q.outstanding:
            raise RuntimeError(f"TX used ring inconsistent: {n} used, {q.outstanding} "
                               "outstanding")
        words, mask, segs, first = self._used_words, q.size - 1, q.segs, q.last_used
        posted, held, free, free_chains = self.posted, self.held, self.free, self.free_chains
        for j in range(n):
            head = words[2 * ((first + j) & mask)]
            k = head // segs
            if head % segs or k >= q.chains or not posted[k]:
                q.last_used = (first + j) & 0xFFFF
                q.completed += j
                raise RuntimeError(f"TX used ring inconsistent: used id {head} is not an "
                                   "outstanding chain's head")
            posted[k] = False
            free_chains.append(k)
            i = held[k]
            if i is not None:
                free.append(i)
                held[k] = None
        q.last_used = used
        q.completed += n
        return n


class _Conn:
    """The guest end of one stream connection (Linux ``struct virtio_vsock_sock``)."""

    __slots__ = ("local_port", "peer_port", "buf_alloc", "fwd_cnt", "rx_cnt", "last_fwd_cnt",
                 "peer_buf_alloc", "peer_fwd_cnt", "tx_cnt", "closed", "rx_bytes", "tx_bytes",
                 "tx_phase")

    def __init__(self, local_port: int, peer_port: int, buf_alloc: int) -> None:
        self.local_port, self.peer_port, self.buf_alloc = local_port, peer_port, buf_alloc
        self.fwd_cnt = self.rx_cnt = self.last_fwd_cnt = self.tx_cnt = 0
        #: payload bytes received / sent, not wrapped (the u32 counters above wrap every
        #: 4 GiB, i.e. within one second at the speeds the bench aims for)
        self.rx_bytes = self.tx_bytes = 0
        #: stream offset of the next TX payload byte, mod PATTERN_PERIOD
        self.tx_phase = 0
        self.peer_buf_alloc = self.peer_fwd_cnt = 0
        self.closed = False

    @property
    def peer_credit(self) -> int:
        return max(0, self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & U32))


class FastVsockGuest(Guest):
    """Pre-built-chain vsock driver (see module docstring)."""

    def __init__(self, spec: dict) -> None:
        super().__init__(spec)
        size = spec.get("queue_size", 256)
        self.buf_alloc = int(spec.get("buf_alloc", 256 * 1024))
        self.port = int(spec.get("port", 1234))
        self.rxq = StreamQueue(self.layout, 0, size, [HDR, RX_BUF], writable=True)
        self.txq = StreamQueue(self.layout, 1, size, [HDR, MAX_PKT])
        self.start([self.rxq, self.txq])
        self.cid = int.from_bytes(self.fe.get_config(0, 8), "little")
        base = self.layout.base
        self.ram_np = np.frombuffer(self.layout.view, dtype=np.uint8)
        # (chains, 44) byte offsets of every RX chain's header buffer
        self.rx_hdr_idx = (np.array([b[0] - base for b in self.rxq.buffers])[:, None]
                           + np.arange(HDR))
        self.tx_hdr = [self.txq.chain_buffer(k, 0)[:HDR] for k in range(self.txq.chains)]
        self.tx_buffers = TxBuffers(self.layout, self.txq)
        #: every RX chain's header buffer, for the few-packets path of `_receive`
        self.rx_hdr = [self.layout.mv(b[0], HDR) for b in self.rxq.buffers]
        self.conns: dict[tuple[int, int], _Conn] = {}
        self.accepted: list[_Conn] = []
        self.rxq.publish()
        self.rxq.want_interrupt_after(1)

    # -- transmit -------------------------------------------------------------------------
    def _tx_free(self) -> int:
        self.tx_buffers.reap()
        return self.txq.chains - self.txq.outstanding

    def _send(self, packets: list[tuple[_Conn, int, int, int]]) -> None:
        """Publish ``(conn, op, len, flags)`` packets as TX chains (waits for room)."""
        i = 0
        while i < len(packets):
            free = self._tx_free()
            if free == 0:
                self.txq.want_interrupt_after(1)
                if self._tx_free() == 0:
                    self.wait_calls([self.txq], 0.05)
                continue
            batch = packets[i:i + free]
            pos = self.txq.avail_idx
            bufs = self.tx_buffers
            for conn, op, len_, flags in batch:
                k = bufs.post(pos)
                conn.last_fwd_cnt = conn.fwd_cnt
                VsockHeader.FMT.pack_into(
                    self.tx_hdr[k], 0, self.cid, int(HOST_CID),
                    conn.local_port, conn.peer_port, len_, int(Type.STREAM), op, flags,
                    conn.buf_alloc, conn.fwd_cnt)
                if op == _RW and len_:  # the application's bytes: the stream pattern
                    ph = conn.tx_phase
                    bufs.take(k, len_)[:] = STREAM_REF[ph:ph + len_]
                    conn.tx_phase = (ph + len_) % PATTERN_PERIOD
                else:
                    bufs.no_payload(k)
                pos += 1
            self.txq.publish(len(batch))
            i += len(batch)

    # -- receive ----------------------------------------------------------------------------
    def _receive(self) -> int:
        """Take every used RX buffer, handle its packet, repost; returns payload bytes."""
        q = self.rxq
        used = q._used_idx[0]
        n = (used - q.last_used) & 0xFFFF
        if n == 0:
            return 0
        if n <= FEW:
            return self._receive_few(n)
        pos = (q.last_used + np.arange(n)) & (q.size - 1)
        heads = q.used_ring[pos, 0]
        hdrs = self.ram_np[self.rx_hdr_idx[heads // q.segs]].view(HDR_DTYPE).reshape(n)
        q.last_used = used
        q.completed += n
        total = 0
        conn = self.accepted[0] if len(self.accepted) == 1 else None
        ops = hdrs["op"]
        if conn is not None:
            mine = ((ops == _RW) & (hdrs["dst_port"] == conn.local_port)
                    & (hdrs["src_port"] == conn.peer_port))
            total = int(hdrs["len"][mine].sum())
            if total:
                conn.rx_cnt = (conn.rx_cnt + total) & U32
                conn.rx_bytes += total
                conn.fwd_cnt = (conn.fwd_cnt + total) & U32  # the application reads at once
            last = hdrs[-1]
            if mine.all():
                self._credit(conn, int(last["buf_alloc"]), int(last["fwd_cnt"]))
                rest = []
            else:
                rest = np.nonzero(~mine)[0]
                if mine.any():
                    j = int(np.nonzero(mine)[0][-1])
                    self._credit(conn, int(hdrs[j]["buf_alloc"]), int(hdrs[j]["fwd_cnt"]))
        else:
            rest = range(n)
        replies = []
        for j in rest:
            replies += self._control(hdrs[j])
        return self._consumed(conn, total, replies)

    def _receive_few(self, n: int) -> int:
        """`_receive` for a few used buffers (the CREDIT_UPDATEs of the guest->host stream):
        one ``struct`` unpack per header, since numpy's per-call cost (~µs) exceeds the work.
        Same handling, packet by packet in used-ring order."""
        q = self.rxq
        words, mask, first, segs = q._used_words, q.size - 1, q.last_used, q.segs
        hdrs, unpack = self.rx_hdr, _HDR_UNPACK
        conn = self.accepted[0] if len(self.accepted) == 1 else None
        total = 0
        replies = []
        for k in range(n):
            h = unpack(hdrs[words[2 * ((first + k) & mask)] // segs])
            if (conn is not None and h[_OP] == _RW and h[_DST_PORT] == conn.local_port
                    and h[_SRC_PORT] == conn.peer_port):
                total += h[_LEN]
                self._credit(conn, h[_BUF_ALLOC], h[_FWD_CNT])
            else:
                replies += self._control(dict(zip(HDR_DTYPE.names, h)))
        q.last_used = (first + n) & 0xFFFF
        q.completed += n
        if conn is not None and total:
            conn.rx_cnt = (conn.rx_cnt + total) & U32
            conn.rx_bytes += total
            conn.fwd_cnt = (conn.fwd_cnt + total) & U32  # the application reads at once
        return self._consumed(conn, total, replies)

    def _consumed(self, conn: _Conn | None, total: int, replies: list) -> int:
        """After a receive: CREDIT_UPDATE when the peer's view of our free space fell
        below 64 KiB (Linux ``virtio_transport_stream_do_dequeue``), re-post the RX
        buffers, send the replies. Returns ``total``."""
        if conn is not None and total:
            free_in_peer_view = conn.buf_alloc - ((conn.rx_cnt - conn.last_fwd_cnt) & U32)
            if free_in_peer_view < MAX_PKT:
                replies.append((conn, _CREDIT_UPDATE, 0, 0))
        self.rxq.publish()
        if replies:
            self._send(replies)
        return total

    def _credit(self, conn: _Conn, buf_alloc: int, fwd_cnt: int) -> None:
        conn.peer_buf_alloc, conn.peer_fwd_cnt = buf_alloc, fwd_cnt

    def _control(self, h) -> list:
        op, src_port, dst_port = int(h["op"]), int(h["src_port"]), int(h["dst_port"])
        conn = self.conns.get((dst_port, src_port))
        if conn is None:
            if op == _REQUEST and dst_port == self.port:
                conn = _Conn(dst_port, src_port, self.buf_alloc)
                self._credit(conn, int(h["buf_alloc"]), int(h["fwd_cnt"]))
                self.conns[(dst_port, src_port)] = conn
                self.accepted.append(conn)
                return [(conn, _RESPONSE, 0, 0)]
            if op != _RST:
                return [(_Conn(dst_port, src_port, 0), _RST, 0, 0)]
            return []
        self._credit(conn, int(h["buf_alloc"]), int(h["fwd_cnt"]))
        if op == _RW:
            n = int(h["len"])
            conn.rx_cnt = (conn.rx_cnt + n) & U32
            conn.rx_bytes += n
            conn.fwd_cnt = (conn.fwd_cnt + n) & U32
        elif op == _CREDIT_REQUEST:
            return [(conn, _CREDIT_UPDATE, 0, 0)]
        elif op in (_RST, _SHUTDOWN):
            conn.closed = True
        return []

    def _wait(self, timeout_s: float) -> None:
        self.rxq.want_interrupt_after(1)
        if ((self.rxq._used_idx[0] - self.rxq.last_used) & 0xFFFF) == 0:
            self.wait_calls([self.rxq, self.txq], timeout_s)

    # -- harness commands --------------------------------------------------------------------
    def command(self, cmd: dict) -> dict:
        if cmd["cmd"] == "accept":
            count, t0 = int(cmd["count"]), time.perf_counter()
            deadline = t0 + float(cmd.get("timeout", 60))
            while len(self.accepted) < count and time.perf_counter() < deadline:
                self._receive()
                self._wait(0.01)
            return {"accepted": len(self.accepted), "seconds": time.perf_counter() - t0}
        if cmd["cmd"] == "pump":
            end = time.perf_counter() + float(cmd["seconds"])
            while time.perf_counter() < end:
                self._receive()
                self._wait(0.05)
            return {"ok": True}
        raise ValueError(f"unknown command {cmd}")

    def run(self, seconds: float) -> dict:
        if self.spec.get("engine") == "c":
            return self.run_c(seconds)
        return self.run_py(seconds)

    def run_c(self, seconds: float) -> dict:
        """The timed stream by the C stand-in (bench/limits/vsock_guest.c): it is handed the
        guest RAM memfd, the rings, the eventfds and the connection state, runs for
        ``seconds``, and returns the state it ends in, which this model takes over (a later
        run, either engine, resumes from there). While it runs this process does nothing."""
        argv, fds = self.c_guest_command(seconds)
        proc = subprocess.run(argv, pass_fds=fds, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"C guest failed ({proc.returncode}): {proc.stderr.strip()}")
        out = json.loads(proc.stdout)
        conn, rxq, txq = self.accepted[0], self.rxq, self.txq
        rxq.avail_idx, rxq.last_used = out["rx_avail_idx"], out["rx_last_used"]
        txq.avail_idx, txq.last_used = out["tx_avail_idx"], out["tx_last_used"]
        self.tx_buffers.resume(out["tx_free_chains"])
        for name in ("fwd_cnt", "rx_cnt", "last_fwd_cnt", "tx_cnt", "peer_buf_alloc",
                     "peer_fwd_cnt", "tx_phase"):
            setattr(conn, name, out[name])
        conn.rx_bytes += out["rx_bytes"]
        conn.tx_bytes += out["tx_bytes"]
        if out["owe_credit_update"]:
            self._send([(conn, _CREDIT_UPDATE, 0, 0)])
        return {"bytes": out["bytes"], "seconds": out["seconds"], "engine": "c",
                "sleeps": out["sleeps"], "rx_kicks": out["rx_kicks"],
                "tx_kicks": out["tx_kicks"], "tx_buffers_peak": out["tx_buffers_peak"]}

    def c_guest_command(self, seconds: float) -> tuple[list[str], tuple[int, ...]]:
        """The C stand-in's command line for a run of ``seconds`` from the state this model
        is in (rings, TX chains and buffers, connection), and the fds it inherits."""
        from bench.limits.build import helper_path

        conn = self.accepted[0]
        rxq, txq = self.rxq, self.txq
        region = self.ram.regions[0]
        fds = (self.ram.fd, rxq.kick_fd, rxq.call_fd, txq.kick_fd, txq.call_fd)
        args = dict(
            tx_workload=int(self.spec["workload"] == "vsock-tx"),
            micros=int(seconds * 1e6), mem_fd=self.ram.fd, mem_offset=region.mmap_offset,
            ram_size=region.memory_size, gpa_base=region.guest_phys_addr,
            rx_desc=rxq.desc_gpa, rx_avail=rxq.avail_gpa, rx_used=rxq.used_gpa,
            rx_size=rxq.size, tx_desc=txq.desc_gpa, tx_avail=txq.avail_gpa,
            tx_used=txq.used_gpa, tx_size=txq.size, rx_avail_idx=rxq.avail_idx,
            rx_last_used=rxq.last_used, tx_avail_idx=txq.avail_idx,
            tx_last_used=txq.last_used, rx_kick=rxq.kick_fd, rx_call=rxq.call_fd,
            tx_kick=txq.kick_fd, tx_call=txq.call_fd, cid=self.cid,
            local_port=conn.local_port, peer_port=conn.peer_port, buf_alloc=conn.buf_alloc,
            fwd_cnt=conn.fwd_cnt, rx_cnt=conn.rx_cnt, last_fwd_cnt=conn.last_fwd_cnt,
            tx_cnt=conn.tx_cnt, peer_buf_alloc=conn.peer_buf_alloc,
            peer_fwd_cnt=conn.peer_fwd_cnt, owe_credit_update=0, tx_phase=conn.tx_phase,
            tx_pool=self.tx_buffers.gpa, tx_pool_bufs=self.tx_buffers.count,
            tx_free_chains=",".join(map(str, self.tx_buffers.free_chains)))
        return ([str(helper_path("vsock_guest"))] + [f"{k}={v}" for k, v in args.items()],
                fds)

    def run_py(self, seconds: float) -> dict:
        conn = self.accepted[0]
        tx = self.spec["workload"] == "vsock-tx"
        start = conn.tx_bytes if tx else conn.rx_bytes
        t0 = time.perf_counter()
        end = t0 + seconds
        self.txq.no_interrupts()
        while time.perf_counter() < end:
            got = self._receive()
            sent = 0
            if tx:
                free = self._tx_free()
                packets = []
                credit = conn.peer_credit
                while free and credit:
                    n = min(MAX_PKT, credit)
                    packets.append((conn, _RW, n, 0))
                    conn.tx_cnt = (conn.tx_cnt + n) & U32
                    conn.tx_bytes += n
                    credit -= n
                    free -= 1
                    sent += n
                if packets:
                    self._send(packets)
            if not got and not sent:
                if tx and self._tx_free() == 0:
                    self.txq.want_interrupt_after(max(1, self.txq.outstanding // 2))
                self._wait(0.01)
                self.txq.no_interrupts()
        moved = (conn.tx_bytes if tx else conn.rx_bytes) - start
        return {"bytes": moved, "seconds": time.perf_counter() - t0}


class ModelVsockGuest:
    """The general guest model (``tests/support/vsock_guest.py``) for ``vsock-conns``."""

    def __init__(self, spec: dict) -> None:
        from tests.support.vsock_guest import VsockGuest as Model
        from vhost_user.frontend import GuestRam, VhostUserFrontend

        self.spec = spec
        self.ram = GuestRam([(0, spec.get("ram_bytes", 256 << 20))])
        fe = VhostUserFrontend.connect(spec["socket"], timeout_s=20.0)
        self.model = Model(fe, self.ram, queue_size=spec.get("queue_size", 256))
        self.model.start()
        self.port = spec.get("port", 1234)
        self.model.listen(self.port)
        self.conns = []

    def command(self, cmd: dict) -> dict:
        if cmd["cmd"] == "accept":
            count, t0 = int(cmd["count"]), time.perf_counter()
            deadline = t0 + float(cmd.get("timeout", 60))
            q = self.model.accept_queue[self.port]
            while len(self.conns) < count and time.perf_counter() < deadline:
                self.model.pump(0.01)
                while q:
                    self.conns.append(q.popleft())
                self.model.packets.clear()
            return {"accepted": len(self.conns), "seconds": time.perf_counter() - t0}
        if cmd["cmd"] == "pump":
            end = time.perf_counter() + float(cmd["seconds"])
            while time.perf_counter() < end:
                self.model.pump(0.05)
                self.model.packets.clear()
            return {"ok": True}
        raise ValueError(f"unknown command {cmd}")

    def run(self, seconds: float) -> dict:
        raise ValueError("the model guest has no streaming workload here")

    def rtt(self, iterations: int) -> dict:
        raise ValueError("no vsock round-trip workload")

    def close(self) -> None:
        try:
            self.model.fe.close()
        finally:
            self.ram.close()


def VsockGuest(spec: dict):  # noqa: N802 - the name bench.guest_proc.make_guest imports
    """The guest driver for a vsock workload (see module docstring)."""
    if spec["workload"] in ("vsock-tx", "vsock-rx"):
        return FastVsockGuest(spec)
    return ModelVsockGuest(spec)


__all__ = ["VsockGuest", "FastVsockGuest", "ModelVsockGuest", "Guest", "TxBuffers"]
