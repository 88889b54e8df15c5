"""ring/cstruct.py: many fields of a compiled cffi struct with one ``struct`` call agree
with cffi's own field access, and a layout that does not match is refused at start-up."""

import pytest

from ring.cring import ffi
from ring.cstruct import field_codec

FIELDS = (("cid", "Q"), ("guest_port", "I"), ("credit", "Q"), ("fd", "i"),
          ("out.chains", "I"), ("out.broken", "i"))


def test_packed_fields_are_what_cffi_reads_and_unpacked_are_what_it_wrote():
    p = ffi.new("struct vs_rx_pump *")
    codec, offset = field_codec(ffi, "struct vs_rx_pump", FIELDS)
    view = ffi.buffer(p)
    codec.pack_into(view, offset, 2**64 - 1, 0xFFFFFFFF, 12345678901, -7, 46, -3)
    assert (p.cid, p.guest_port, p.credit, p.fd, p.out.chains, p.out.broken) == (
        2**64 - 1, 0xFFFFFFFF, 12345678901, -7, 46, -3)
    p.host_port, p.buf_alloc, p.fwd_cnt, p.call_errno = 1, 2, 3, 4  # skipped: untouched
    p.cid, p.fd, p.out.chains = 9, 8, 7
    assert codec.unpack_from(view, offset) == (9, 0xFFFFFFFF, 12345678901, 8, 7, -3)
    assert (p.host_port, p.buf_alloc, p.fwd_cnt, p.call_errno) == (1, 2, 3, 4)


@pytest.mark.parametrize("fields, why", [
    ((("cid", "I"),), "bytes"),  # a u64 read as 4 bytes
    ((("credit", "Q"), ("cid", "Q")), "order"),
])
def test_a_layout_that_does_not_match_the_compiled_struct_is_refused(fields, why):
    with pytest.raises(ImportError, match=why):
        field_codec(ffi, "struct vs_rx_pump", fields)
