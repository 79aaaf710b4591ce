"""A store file that shrinks or changes while it is in use gives a one-line StoreError naming the
file (or the expert that fails its checksum), never a signal, and the engine or the expert host
keeps working: once the file is restored, the same engine generates the usual tokens again.
Real files, a disk-source engine in this process, `expert_host serve --mmap` on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import grpc
import pytest

from common.errors import StoreError
from common.expert_id import ExpertId
from common.rpc import expert_host_pb2 as pb
from common.rpc import expert_host_pb2_grpc as pb_grpc
from common.store.checksum import blob_checksum
from common.store.manifest import expert_file_name
from common.store.reader import ExpertStore
from coordinator.runtime.engine import Engine
from expert_host_processes import expert_hosts  # noqa: F401  (fixture)

PROMPT = "User: tell me a story about a dog\nAssistant:"


@pytest.fixture
def store_copy(store16, tmp_path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(store16, copy)
    return copy


def blob_offsets(path: Path) -> dict[str, int]:
    """Tensor name -> absolute byte offset of its data in a safetensors file."""
    with open(path, "rb") as handle:
        (header_bytes,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_bytes))
    return {name: 8 + header_bytes + entry["data_offsets"][0] for name, entry in header.items() if name != "__metadata__"}


def shrink(path: Path) -> bytes:
    """Cut the file in place to its header and a few bytes of the first blob; returns what it held."""
    original = path.read_bytes()
    with open(path, "r+b") as handle:
        handle.truncate(min(blob_offsets(path).values()) + 100)
    return original


def change_in_place(path: Path, eids: list[ExpertId]) -> bytes:
    """Flip one byte inside each named blob, same file, same size; returns what it held."""
    original = path.read_bytes()
    offsets = blob_offsets(path)
    with open(path, "r+b") as handle:
        for eid in eids:
            handle.seek(offsets[eid.tensor_name] + 1000)
            byte = handle.read(1)
            handle.seek(-1, os.SEEK_CUR)
            handle.write(bytes([byte[0] ^ 0x40]))
    return original


def restore(path: Path, original: bytes) -> None:
    with open(path, "r+b") as handle:  # the same file the engine has open, not a new one
        handle.write(original)
        handle.truncate(len(original))


def tokens(engine: Engine) -> list[int]:
    generation = engine.generate(PROMPT, max_new_tokens=6)
    list(generation)
    return generation.token_ids


# --- the disk source -----------------------------------------------------------------------


def test_a_file_shrunk_under_a_disk_engine_is_a_store_error_and_restoring_it_heals(store_copy):
    path = store_copy / expert_file_name(1)
    with Engine.open(store_copy, source="disk", device="cpu", cache_experts=2, progress=False) as engine:
        usual = tokens(engine)
        original = shrink(path)
        with pytest.raises(StoreError) as failed:
            tokens(engine)
        message = str(failed.value)
        assert message.startswith(f"{path}: is ") and "shrank while in use" in message and "\n" not in message
        restore(path, original)
        assert tokens(engine) == usual


def test_a_file_changed_in_place_after_its_first_read_fails_its_checksum_naming_the_expert(store_copy):
    path = store_copy / expert_file_name(2)
    everyone = [ExpertId(2, e) for e in range(8)]
    with Engine.open(store_copy, source="disk", device="cpu", cache_experts=2, progress=False) as engine:
        usual = tokens(engine)  # reads (and verifies) experts of layer 2
        original = change_in_place(path, everyone)
        with pytest.raises(StoreError, match=rf"^{path}: layer 2 expert \d fails its checksum"):
            tokens(engine)
        restore(path, original)
        assert tokens(engine) == usual


def test_a_file_replaced_by_a_new_one_is_reopened(store_copy):
    store = ExpertStore(store_copy)
    eid = ExpertId(0, 3)
    before = store.expert_blob(eid)
    path = store.file_of(eid)
    shutil.copy(path, path.with_suffix(".new"))
    os.replace(path.with_suffix(".new"), path)  # another inode under the same name
    assert bytes(store.expert_blob(eid).numpy()) == bytes(before.numpy())


def test_a_blob_is_verified_on_first_read_and_again_only_when_its_file_changed(store_copy, monkeypatch):
    store = ExpertStore(store_copy)
    verified = []
    check = store.verify
    monkeypatch.setattr(store, "verify", lambda eid, blob: (verified.append(eid), check(eid, blob)))
    eid = ExpertId(3, 1)
    store.expert_blob(eid)
    store.expert_blob(eid)
    assert verified == [eid]
    stat = store.file_of(eid).stat()
    os.utime(store.file_of(eid), ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # "touched": may have changed
    store.expert_blob(eid)
    store.expert_blob(ExpertId(3, 2))
    assert verified == [eid, eid, ExpertId(3, 2)]


# --- the expert host, --mmap ----------------------------------------------------------------


def fetch(stub, eid: ExpertId) -> bytes:
    request = pb.FetchExpertRequest(id=pb.ExpertId(layer=eid.layer, expert=eid.expert))
    return b"".join(chunk.data for chunk in stub.FetchExpert(request, timeout=30))


def refused(stub, eid: ExpertId) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as failed:
        fetch(stub, eid)
    return failed.value


def test_a_mmap_host_answers_a_status_for_a_shrunk_or_changed_file_and_keeps_serving(expert_hosts, store_copy):  # noqa: F811
    store = ExpertStore(store_copy)
    host = expert_hosts.start(store_copy, "--mmap")
    shrunk, changed, other = ExpertId(1, 4), ExpertId(2, 5), ExpertId(0, 0)
    with grpc.insecure_channel(host.address) as channel:
        stub = pb_grpc.ExpertHostStub(channel)
        for eid in (shrunk, changed, other):
            assert blob_checksum(fetch(stub, eid)) == store.checksum_of(eid)

        original = shrink(store.file_of(shrunk))
        error = refused(stub, shrunk)
        assert error.code() == grpc.StatusCode.DATA_LOSS
        assert str(store.file_of(shrunk)) in error.details() and "shrank while in use" in error.details()
        assert blob_checksum(fetch(stub, other)) == store.checksum_of(other)
        restore(store.file_of(shrunk), original)
        assert blob_checksum(fetch(stub, shrunk)) == store.checksum_of(shrunk)

        original = change_in_place(store.file_of(changed), [changed])
        error = refused(stub, changed)
        assert error.code() == grpc.StatusCode.DATA_LOSS
        assert f"{store.file_of(changed)}: layer 2 expert 5 fails its checksum" in error.details()
        assert blob_checksum(fetch(stub, other)) == store.checksum_of(other)
        restore(store.file_of(changed), original)
        assert blob_checksum(fetch(stub, changed)) == store.checksum_of(changed)
    assert host.process.poll() is None, host.log()
