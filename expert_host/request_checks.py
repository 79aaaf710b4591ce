"""What a FetchExpert request may ask for, checked before any byte is sent. Each refusal
carries the gRPC status the servicer answers with and a message that names what is wrong."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from common.errors import MoeEdgeError
from common.expert_id import ExpertId
from common.rpc.wire_limits import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, MIN_CHUNK_BYTES

from .shard import ExpertShard


class RequestRefused(MoeEdgeError):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class FetchPlan:
    eid: ExpertId
    chunk_bytes: int


def plan_fetch(shard: ExpertShard, *, layer: int, expert: int, has_id: bool, chunk_bytes: int, model_id: str) -> FetchPlan:
    model = shard.manifest.model
    if not has_id:
        raise RequestRefused(grpc.StatusCode.INVALID_ARGUMENT, "FetchExpert: the request names no expert (field id)")
    if layer < 0 or expert < 0:
        raise RequestRefused(grpc.StatusCode.INVALID_ARGUMENT, f"layer {layer} expert {expert}: indices cannot be negative")
    if layer >= model.num_layers or expert >= model.num_experts:
        raise RequestRefused(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"layer {layer} expert {expert}: the model has layers 0-{model.num_layers - 1} and experts 0-{model.num_experts - 1}",
        )
    if model_id and model_id != shard.manifest.model_id:
        raise RequestRefused(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"this host serves store {shard.manifest.model_id}, the request is for store {model_id}",
        )
    eid = ExpertId(layer, expert)
    if not shard.holds(eid):
        raise RequestRefused(grpc.StatusCode.NOT_FOUND, f"{eid}: not held by this host (see Info for what it holds)")
    if chunk_bytes == 0:
        chunk_bytes = DEFAULT_CHUNK_BYTES
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise RequestRefused(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"chunk_bytes {chunk_bytes}: choose 0 (default) or {MIN_CHUNK_BYTES}-{MAX_CHUNK_BYTES}",
        )
    return FetchPlan(eid, chunk_bytes)
