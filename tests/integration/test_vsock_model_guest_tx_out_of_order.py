"""The general vsock guest model (tests/support/vsock_guest.py over the driver model
tests/support/driver.py) takes TX chains back in whatever order the device uses them, as
Linux does: the used element's id names the chain (split: its head; packed: its buffer id),
and that chain's descriptors and data buffers are freed, each exactly once (the driver
model's allocator refuses a second free). A device built on the real ring (``Virtqueue``,
both implementations) pops the guest's TX packets, checks each is what was sent, in order,
and uses a random part of what it holds in a shuffled order, round after round, so chains
and buffers are reused while others stay in the device.

Spec: virtio 1.2 §2.7.8 (split: the used ring's id is the head of the chain; any order
without VIRTIO_F_IN_ORDER), §2.8.21 (packed: the used descriptor's buffer id).
"""

from __future__ import annotations

import random

import pytest

from tests.support import RING_IMPLS, ring_impl_class
from tests.support.driver import Allocator, PackedDriver, SplitDriver
from tests.support.vsock_guest import VsockGuest
from vhost_user.frontend import GuestRam

QUEUE_SIZE = 16


def _guest(ram: GuestRam, packed: bool) -> VsockGuest:
    """The model's rings as ``VsockGuest.start`` builds them, without a back-end."""
    guest = VsockGuest(None, ram, queue_size=QUEUE_SIZE, packed=packed)
    alloc = Allocator(ram.memory)
    cls = PackedDriver if packed else SplitDriver
    guest.drivers = [cls(ram.memory, QUEUE_SIZE, event_idx=True, index=i, allocator=alloc)
                     for i in range(2)]
    guest.rx, guest.tx = guest.drivers
    return guest


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("impl", RING_IMPLS)
def test_spec_2_7_8_model_frees_each_tx_chain_the_device_names(packed, impl):
    ram = GuestRam([(0, 1 << 20)])
    try:
        guest = _guest(ram, packed)
        vq = guest.tx.attach(ring_impl_class(impl))
        free_at_start = guest.tx.alloc.free_bytes
        rng = random.Random(7)
        sent: list[bytes] = []  # every packet, in the order it was put on the queue
        taken = 0  # packets the device popped (and checked) so far
        held: list = []  # (id, ring slots, chain, bytes sent) of the chains in the device
        out_of_order = 0
        for _ in range(60):
            while guest.tx.num_free >= 2:  # header + payload descriptors
                n = len(sent)
                hdr, payload = n.to_bytes(4, "little") * 11, bytes([n % 251]) * (n % 97 + 1)
                guest.send_packet(hdr, payload, kick=False)
                sent.append(hdr + payload)
            for chain in vq.pop_batch(QUEUE_SIZE):
                assert chain.read_all() == sent[taken]
                held.append((chain.head, chain.ring_slots, chain, sent[taken]))
                taken += 1
            rng.shuffle(held)
            n = rng.randint(1, len(held))
            done, held = held[:n], held[n:]
            out_of_order += sum(1 for a, b in zip(done, done[1:]) if a[0] > b[0])
            vq.push_batch([(head, 0, slots) for head, slots, _, _ in done])
            guest.reap_tx()
            assert guest.tx_outstanding == guest.tx.outstanding == len(held)
            # what the device still holds is untouched: no buffer of it was freed and reused
            assert all(chain.read_all() == data for _, _, chain, data in held)
        vq.push_batch([(head, 0, slots) for head, slots, _, _ in held])
        guest.reap_tx()
        assert guest.tx_outstanding == guest.tx.outstanding == 0
        assert guest.tx.alloc.free_bytes == free_at_start  # every buffer came back once
        assert taken == len(sent) > 10 * QUEUE_SIZE
        assert out_of_order > 0
    finally:
        ram.close()
