import pytest

import protocol as P


def test_frames_split_anywhere_reassemble():
    payloads = [b"", b"a", b"x" * 70_000]
    wire = b"".join(P.encode_frame(p) for p in payloads)
    for step in (1, 3, 4096):
        dec = P.FrameDecoder(max_size=100_000)
        got = []
        for i in range(0, len(wire), step):
            dec.receive_data(wire[i : i + step])
            while (f := dec.next_frame()) is not P.NEED_DATA:
                got.append(f)
        dec.eof()
        assert got == payloads


def test_truncated_frame_is_an_error_not_a_clean_eof():
    dec = P.FrameDecoder()
    dec.receive_data(P.encode_frame(b"hello world")[:-3])
    assert dec.next_frame() is P.NEED_DATA
    with pytest.raises(P.DecodeError, match="mid-frame"):
        dec.eof()


def test_oversize_length_prefix_rejected_before_buffering():
    dec = P.FrameDecoder(max_size=1024)
    with pytest.raises(P.OversizeError):
        dec.receive_data((10**6).to_bytes(4, "big"))
