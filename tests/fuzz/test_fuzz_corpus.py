"""The fuzz harnesses as a normal short test: feed a generated corpus (no atheris needed).

The corpus is deterministic: hand-written seeds that reach each hostile shape, plus random
inputs from a fixed seed, plus any files in ``tests/fuzz/corpus/<target>/`` (crashers that
atheris found go there and stay as regressions). ``HYPOTHESIS_PROFILE=nightly`` feeds many
more random inputs.

Spec: see tests/fuzz/fuzz_ring.py and tests/fuzz/fuzz_channel.py.
"""

from __future__ import annotations

import os
import pathlib
import random
import struct

import pytest

from tests.fuzz import fuzz_channel, fuzz_ring, fuzz_session, fuzz_vsock

CORPUS = pathlib.Path(__file__).parent / "corpus"
RANDOM_INPUTS = 2000 if os.environ.get("HYPOTHESIS_PROFILE") == "nightly" else 150


def corpus(target: str, seeds: list[bytes], length: int) -> list[bytes]:
    rng = random.Random(f"vmchannel-{target}")
    inputs = list(seeds)
    inputs += [rng.randbytes(rng.randint(0, length)) for _ in range(RANDOM_INPUTS)]
    folder = CORPUS / target
    if folder.is_dir():
        inputs += [p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()]
    return inputs


RING_SEEDS = [b"", b"\x00" * 64, b"\x01" * 64, b"\xff" * 200,
              bytes(range(256)), bytes(range(255, -1, -1))]


def _msg(request: int, payload: bytes = b"", flags: int = 1) -> bytes:
    return struct.pack("=III", request, flags, len(payload)) + payload


CHANNEL_SEEDS = [b"", b"\x01", b"\x00" + _msg(1), b"\x01" + _msg(1) + _msg(3, b"\0" * 8),
                 b"\x00" + _msg(2, b"x" * 5000), b"\x01" + _msg(1)[:7],
                 b"\x00" + _msg(5, b"abc", flags=0)]


@pytest.mark.parametrize("chunk", range(5))
def test_ring_fuzz_corpus(chunk):
    inputs = corpus("ring", RING_SEEDS, 160)
    for data in inputs[chunk::5]:
        fuzz_ring.one_input(data)


def test_channel_fuzz_corpus():
    for data in corpus("channel", CHANNEL_SEEDS, 96):
        fuzz_channel.one_input(data)


def test_ring_decoder_reaches_hostile_and_benign_rings():
    """The decoder is not degenerate: the corpus yields chains and several error codes."""
    from ring.errors import ChainError
    from tests.property.ringpair import available_impls
    from tests.property.rings import start_pair
    codes, chains = set(), 0
    for data in corpus("ring", RING_SEEDS, 160):
        raw, _ops = fuzz_ring.decode(data)
        kind, value = start_pair({"py": available_impls()["py"]}, raw)[0].call("pop")
        if kind == "exc":
            codes.add(value.code)
        elif value is not None:
            chains += 1
    assert chains >= 5
    assert len(codes) >= 5 and ChainError.AVAIL_IDX in codes, codes


def _request(code: int, *fields: bytes) -> bytes:
    """A session-fuzz input naming request ``code`` (an index into REQUESTS) with plain
    flags, no fds and a structured payload driven by ``fields``."""
    return bytes([code, 1, 1, 0, 1]) + b"".join(fields)


SESSION_SEEDS = [
    b"",
    _request(0) + _request(1),  # GET_FEATURES, SET_FEATURES
    bytes([4, 1, 1, 1, 1, 1]) + bytes(12),  # SET_MEM_TABLE with the RAM fd, one region
] + [bytes([i % 47, i & 0xC, i, i % 4, i]) * 3 for i in range(0, 255, 7)]


@pytest.mark.parametrize("chunk", range(3))
def test_session_fuzz_corpus(chunk):
    inputs = corpus("session", SESSION_SEEDS, 200)
    for data in inputs[chunk::3]:
        fuzz_session.one_input(data)


def _vsock_steps(*steps: bytes) -> bytes:
    return b"\x03\x01" + b"".join(steps)


VSOCK_SEEDS = [
    b"",
    # guest REQUEST 1024 -> host 80, then the device answers, then data both ways
    _vsock_steps(bytes([0, 1, 1, 0, 2, 0, 10, 0, 0, 0]), bytes([7, 200]),
                 bytes([3, 0, 0, 20]), bytes([7, 255])),
    # a host CONNECT to guest port 81, the guest accepts (RESPONSE), host floods
    _vsock_steps(bytes([4, 1]), bytes([7, 10]), bytes([0, 2, 1, 0, 1, 2, 0, 0, 0, 0]),
                 bytes([3, 0, 0, 63]), bytes([7, 255]), bytes([7, 255])),
]


@pytest.mark.parametrize("chunk", range(3))
def test_vsock_fuzz_corpus(chunk):
    inputs = corpus("vsock", VSOCK_SEEDS, 300)
    for data in inputs[chunk::3]:
        fuzz_vsock.one_input(data)
