"""What a FetchExpert or RunExperts request may ask for, checked before any byte is sent or any
expert runs. Each refusal carries the gRPC status the servicer answers with and a message that
names what is wrong (the field, the expert). Knows the shard's model and what it holds; runs
nothing. Shapes: T = tokens, H = hidden size, n = experts asked for."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import torch

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


RUN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class RunPlan:
    experts: tuple[ExpertId, ...]
    hidden: torch.Tensor  # [T, H] in the dtype the host computes in
    weights: torch.Tensor  # [T, n] float32


def plan_run_experts(shard: ExpertShard, *, layer: int, experts: list[int], dtype: str, shape: list[int],
                     hidden: bytes, weights: bytes, model_id: str) -> RunPlan:
    model = shard.manifest.model
    if model_id and model_id != shard.manifest.model_id:
        raise RequestRefused(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"this host serves store {shard.manifest.model_id}, the request is for store {model_id}",
        )
    if not 0 <= layer < model.num_layers:
        raise _invalid(f"layer {layer}: the model has layers 0-{model.num_layers - 1}")
    if not experts:
        raise _invalid(f"layer {layer}: the request names no expert (field experts)")
    for expert in experts:
        if not 0 <= expert < model.num_experts:
            raise _invalid(f"layer {layer} expert {expert}: the model has experts 0-{model.num_experts - 1} (field experts)")
    if len(set(experts)) != len(experts):
        raise _invalid(f"layer {layer}: experts {list(experts)} names an expert twice (field experts)")
    eids = tuple(ExpertId(layer, expert) for expert in experts)
    missing = [eid for eid in eids if not shard.holds(eid)]
    if missing:
        named = ", ".join(str(eid) for eid in missing)
        raise RequestRefused(grpc.StatusCode.NOT_FOUND, f"{named}: not held by this host (see Info for what it holds)")
    if dtype not in RUN_DTYPES:
        raise _invalid(f"dtype {dtype!r}: choose one of {', '.join(RUN_DTYPES)} (field dtype)")
    if len(shape) != 2 or shape[0] == 0 or shape[1] != model.hidden_size:
        raise _invalid(f"shape {list(shape)}: want [T, {model.hidden_size}] (T tokens > 0, the model's hidden size) "
                       "(field shape)")
    tokens, hidden_size = shape
    torch_dtype = RUN_DTYPES[dtype]
    want = tokens * hidden_size * torch_dtype.itemsize
    if len(hidden) != want:
        raise _invalid(f"hidden: {len(hidden)} bytes, but shape {list(shape)} of {dtype} is {want} bytes (field hidden)")
    want = tokens * len(experts) * 4
    if len(weights) != want:
        raise _invalid(f"weights: {len(weights)} bytes, but float32 [T={tokens}, n={len(experts)}] is {want} bytes "
                       "(field weights)")
    # bytearray: torch.frombuffer wants a writable buffer; the copy is one step's activations
    hidden_tensor = torch.frombuffer(bytearray(hidden), dtype=torch_dtype).view(tokens, hidden_size)  # [T, H]
    weights_tensor = torch.frombuffer(bytearray(weights), dtype=torch.float32).view(tokens, len(experts))  # [T, n]
    return RunPlan(eids, hidden_tensor, weights_tensor)


def _invalid(message: str) -> RequestRefused:
    return RequestRefused(grpc.StatusCode.INVALID_ARGUMENT, f"RunExperts: {message}")
