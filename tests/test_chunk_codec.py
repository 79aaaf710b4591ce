"""Our ExpertChunk codec writes and reads exactly protobuf's wire format, both ways."""

import os

import pytest

from common.rpc import expert_host_pb2 as pb
from common.rpc.chunk_codec import Chunk, decode_chunk, encode_chunk

CASES = [
    Chunk(0, memoryview(os.urandom(1 << 20)), total_bytes=123456789012, checksum="0123456789abcdef"),
    Chunk(1 << 20, memoryview(os.urandom(300))),
    Chunk(5, b""),
    Chunk(0, b"x", total_bytes=1, checksum="c"),
]


@pytest.mark.parametrize("chunk", CASES)
def test_generated_protobuf_reads_what_we_encode(chunk):
    message = pb.ExpertChunk.FromString(encode_chunk(chunk))
    assert (message.offset, message.data, message.total_bytes, message.checksum) == (
        chunk.offset, bytes(chunk.data), chunk.total_bytes, chunk.checksum)


@pytest.mark.parametrize("chunk", CASES)
def test_we_decode_what_generated_protobuf_encodes(chunk):
    wire = pb.ExpertChunk(offset=chunk.offset, data=bytes(chunk.data), total_bytes=chunk.total_bytes,
                          checksum=chunk.checksum).SerializeToString()
    decoded = decode_chunk(wire)
    assert (decoded.offset, bytes(decoded.data), decoded.total_bytes, decoded.checksum) == (
        chunk.offset, bytes(chunk.data), chunk.total_bytes, chunk.checksum)


def test_decoding_skips_unknown_fields_and_refuses_truncated_messages():
    wire = encode_chunk(Chunk(7, b"abc")) + bytes([15 << 3 | 0, 0x96, 0x01]) + bytes([16 << 3 | 5]) + b"1234"
    assert bytes(decode_chunk(wire).data) == b"abc"
    with pytest.raises(ValueError, match="malformed ExpertChunk"):
        decode_chunk(encode_chunk(Chunk(7, b"abcdef"))[:-2])
