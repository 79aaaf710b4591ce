"""FetchExpert's chunks on the wire, without protobuf's copies of their bytes.

The generated ExpertChunk copies a chunk's bytes twice more on each side (into the message and
again into the wire bytes; out of the wire bytes and again into a new `bytes` for `.data`).
Those copies of fresh megabyte buffers were most of the time of a fetch (BENCHMARKS.md). This
codec writes and reads the very same protobuf wire format for ExpertChunk (field numbers are
taken from the generated descriptor), with one copy when encoding and none when decoding: a
decoded chunk's `data` is a view into the received message. Any protobuf client still reads
what we send; tests check both directions against the generated class."""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.descriptor import FieldDescriptor

from . import expert_host_pb2

FETCH_EXPERT_METHOD = "/{}/FetchExpert".format(expert_host_pb2.DESCRIPTOR.services_by_name["ExpertHost"].full_name)

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5  # protobuf wire types
_FIELDS = expert_host_pb2.ExpertChunk.DESCRIPTOR.fields_by_name
_WIRE_TYPE = {FieldDescriptor.TYPE_UINT64: _VARINT, FieldDescriptor.TYPE_BYTES: _LEN, FieldDescriptor.TYPE_STRING: _LEN}
for _name, _type in (("offset", _VARINT), ("data", _LEN), ("total_bytes", _VARINT), ("checksum", _LEN)):
    if _WIRE_TYPE.get(_FIELDS[_name].type) != _type:
        raise ImportError(f"ExpertChunk.{_name} changed type in proto/expert_host.proto: update {__name__}")
_OFFSET, _DATA, _TOTAL, _CHECKSUM = (_FIELDS[n].number for n in ("offset", "data", "total_bytes", "checksum"))


@dataclass(frozen=True, slots=True)
class Chunk:
    offset: int
    data: memoryview | bytes
    total_bytes: int = 0  # first chunk only
    checksum: str = ""  # first chunk only


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def encode_chunk(chunk: Chunk) -> bytes:
    """The wire bytes of ExpertChunk (fields in number order, defaults left out as protobuf does)."""
    parts = []
    if chunk.offset:
        parts += [_tag(_OFFSET, _VARINT), _varint(chunk.offset)]
    if len(chunk.data):
        parts += [_tag(_DATA, _LEN), _varint(len(chunk.data)), chunk.data]
    if chunk.total_bytes:
        parts += [_tag(_TOTAL, _VARINT), _varint(chunk.total_bytes)]
    if chunk.checksum:
        checksum = chunk.checksum.encode()
        parts += [_tag(_CHECKSUM, _LEN), _varint(len(checksum)), checksum]
    return b"".join(parts)


def _read_varint(view: memoryview, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = view[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7
        if shift > 63:
            raise ValueError("malformed ExpertChunk: varint longer than 10 bytes")


def decode_chunk(message: bytes) -> Chunk:
    """ExpertChunk wire bytes -> Chunk whose `data` is a view into `message` (no copy).
    Unknown fields are skipped, as protobuf does."""
    view = memoryview(message)
    fields: dict[int, object] = {}
    at = 0
    try:
        while at < len(view):
            key, at = _read_varint(view, at)
            number, wire_type = key >> 3, key & 7
            if wire_type == _VARINT:
                fields[number], at = _read_varint(view, at)
            elif wire_type == _LEN:
                length, at = _read_varint(view, at)
                if at + length > len(view):
                    raise ValueError("malformed ExpertChunk: a field runs past the message's end")
                fields[number], at = view[at : at + length], at + length
            elif wire_type in (_I64, _I32):
                at += 8 if wire_type == _I64 else 4
            else:
                raise ValueError(f"malformed ExpertChunk: wire type {wire_type}")
    except IndexError:
        raise ValueError("malformed ExpertChunk: truncated") from None
    checksum = fields.get(_CHECKSUM, b"")
    return Chunk(
        offset=int(fields.get(_OFFSET, 0)),
        data=fields.get(_DATA, b""),
        total_bytes=int(fields.get(_TOTAL, 0)),
        checksum=bytes(checksum).decode("ascii", errors="replace"),
    )
