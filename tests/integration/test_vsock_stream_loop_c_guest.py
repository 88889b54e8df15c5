"""The C stream loop under the C stand-in for the Linux guest driver
(bench/limits/vsock_guest.c), which consumes as fast as Linux does and checks every byte it
receives (a wrong, lost or repeated byte fails its run): the steady state of a host->guest
stream, the one the loop exists for, runs through it nearly all the time, and the bytes are
right. The back-end is the real process (`vmchannel serve`), the host peer the bench's C
source; the loop's own counters come from ``query-vsock-stats`` over QMP.

Spec: virtio 1.2 §5.10.6.4 (stream data in order, without loss), §5.10.6.3 (credit).
"""

from __future__ import annotations

import json
import socket

from bench.scenarios import Ctx
from bench.vsock_scenarios import VsockSetup


def _qmp(path: str, command: str, arguments: dict | None = None) -> object:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        f = s.makefile("rwb")

        def ask(execute: str, args: dict | None = None) -> dict:
            f.write(json.dumps({"execute": execute, **({"arguments": args} if args else {})})
                    .encode() + b"\n")
            f.flush()
            while True:
                answer = json.loads(f.readline())
                if "return" in answer or "error" in answer:
                    return answer

        json.loads(f.readline())  # the greeting
        ask("qmp_capabilities")
        answer = ask(command, arguments)
    assert "return" in answer, answer
    return answer["return"]


def test_the_c_stand_in_checks_every_byte_the_c_loop_delivers(tmp_path):
    ctx = Ctx(quick=True, runs=1, seconds=0.3, pinnings=("same",), workdir=tmp_path,
              log=lambda line: None)
    mgmt = str(tmp_path / "mgmt.sock")
    s = VsockSetup(ctx, "same", "vsock-rx", "loop", engine="c", mgmt_socket=mgmt)
    try:
        s.connect("source", 1)
        moved = sum(s.guest.run(0.4)["bytes"] for _ in range(3))
        assert moved > 16 << 20
        stats = _qmp(mgmt, "query-vsock-stats", {"cid": 3})[0]
        assert stats["stream-loop-runs"] > 0
        # the stand-in's check passed for every byte, and the loop carried most of them
        assert stats["stream-loop-bytes"] > moved // 2
    finally:
        s.close()
