"""The schema of manifest.json: every field's type and range, then its consistency with the rest.

Two steps. `parse_document` checks each field on its own (pydantic, strict: a number given as a
string is refused, not converted); `check_consistency` checks what one field says against
another (top_k against num_experts, the blob layout against the model config, the expert list
against the layers). Both raise StoreError naming the manifest and the field
(`STORE/manifest.json: model.top_k 9 is above model.num_experts 8`).

Knows nothing of the files beside the manifest: whether they exist and hold their blobs is the
reader's check (common/store/reader.py); whether model_id matches the content is manifest.py's."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from ..errors import ConfigError, StoreError
from ..expert_activation import ExpertActivation
from ..model_config import ATTENTIONS, EXPERT_ACTIVATIONS, FAMILY_NAMES, QK_NORMS, ROPE_TYPES, ROUTERS, ModelConfig
from ..quantization import FORMATS, SUPPORTED_BITS, QuantSpec
from .blob_layout import ALIGN, DTYPES, BlobLayout, TensorSlot
from .checksum import ALGORITHM

_HEX16 = r"^[0-9a-f]{16}$"


def _plain_file_name(name: str) -> str:
    """A name inside the store folder: no folder part, nothing that climbs out of it."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or Path(name).is_absolute():
        raise ValueError(f"{name!r} is not a plain file name inside the store folder")
    return name


PlainFileName = Annotated[str, AfterValidator(_plain_file_name)]
Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]
Checksum = Annotated[str, Field(pattern=_HEX16)]


class _Strict(BaseModel):
    # strict: "128" is not 128 and 1 is not True; unknown keys are left for newer readers
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class ModelFields(_Strict):
    vocab_size: Positive
    hidden_size: Positive
    intermediate_size: Positive
    num_layers: Positive
    num_heads: Positive
    num_kv_heads: Positive
    head_dim: Positive
    num_experts: Positive
    top_k: Positive
    rms_norm_eps: Annotated[float, Field(gt=0)]
    rope_theta: Annotated[float, Field(gt=0)]
    max_position_embeddings: Positive
    sliding_window: Positive | None
    tie_word_embeddings: bool
    bos_token_id: NonNegative | None
    eos_token_id: NonNegative | None
    # the family fields (common/model_config.py), absent from stores packed before them
    family: Literal[FAMILY_NAMES] = "mixtral"  # type: ignore[valid-type]
    attention_bias: bool = False
    qk_norm: Literal[QK_NORMS] = "none"  # type: ignore[valid-type]
    rotary_dim: Positive | None = None
    router: Literal[ROUTERS] = "softmax"  # type: ignore[valid-type]
    norm_topk_prob: bool = True
    router_bias: bool = False
    n_group: Positive = 1
    topk_group: Positive = 1
    routed_scaling_factor: Annotated[float, Field(gt=0)] = 1.0
    dense_layers: list[NonNegative] = []
    dense_intermediate_size: Positive | None = None
    shared_expert_intermediate_size: NonNegative = 0
    shared_expert_gate: bool = False
    attention: Literal[ATTENTIONS] = "grouped"  # type: ignore[valid-type]
    q_lora_rank: Positive | None = None
    kv_lora_rank: NonNegative = 0
    qk_nope_head_dim: NonNegative = 0
    qk_rope_head_dim: NonNegative = 0
    v_head_dim: NonNegative = 0
    rope_interleave: bool = False
    attention_sinks: bool = False
    output_bias: bool = False
    sliding_layers: list[NonNegative] | None = None
    rope_type: Literal[ROPE_TYPES] = "default"  # type: ignore[valid-type]
    rope_factor: Annotated[float, Field(gt=0)] = 1.0
    rope_original_max_position_embeddings: Positive | None = None
    rope_beta_fast: Annotated[float, Field(gt=0)] = 32.0
    rope_beta_slow: Annotated[float, Field(gt=0)] = 1.0
    rope_truncate: bool = True
    rope_attention_factor: Annotated[float, Field(gt=0)] = 1.0
    softmax_scale_factor: Annotated[float, Field(gt=0)] = 1.0
    expert_bias: bool = False
    expert_activation: Literal[EXPERT_ACTIVATIONS] = "silu_gated"  # type: ignore[valid-type]
    swiglu_alpha: Annotated[float, Field(gt=0)] | None = None
    swiglu_limit: Annotated[float, Field(gt=0)] | None = None


class QuantFields(_Strict):
    bits: Literal[SUPPORTED_BITS]  # type: ignore[valid-type]
    group_size: Positive
    format: Literal[FORMATS] = "hqq"  # type: ignore[valid-type]  # absent in stores packed before MXFP4


class QuantizationFields(_Strict):
    experts: QuantFields
    dense: QuantFields


FloatDtype = Literal["float16", "bfloat16", "float32"]


class TensorFields(_Strict):
    name: Annotated[str, Field(min_length=1)]
    dtype: Literal[tuple(DTYPES)]  # type: ignore[valid-type]
    shape: Annotated[list[Positive], Field(min_length=1)]
    offset: NonNegative


class ActivationFields(_Strict):
    kind: Literal[EXPERT_ACTIVATIONS]  # type: ignore[valid-type]
    alpha: float | None = None
    limit: float | None = None


class LayoutFields(_Strict):
    nbytes: Positive
    align: Literal[ALIGN]  # type: ignore[valid-type]
    quantization: QuantFields
    weight_dtype: FloatDtype
    tensors: Annotated[list[TensorFields], Field(min_length=1)]
    activation: ActivationFields | None = None  # absent: silu_gated


class FileFields(_Strict):
    file: PlainFileName
    checksum: Checksum


class ExpertFields(_Strict):
    layer: NonNegative
    expert: NonNegative
    file: PlainFileName
    checksum: Checksum


class ManifestDocument(_Strict):
    format: str
    format_version: int
    model_id: Annotated[str, Field(pattern=_HEX16)]
    model: ModelFields
    dtype: FloatDtype
    quantization: QuantizationFields
    blob_layout: LayoutFields
    checksum_algorithm: Literal[ALGORITHM]  # type: ignore[valid-type]
    dense: FileFields
    experts: Annotated[list[ExpertFields], Field(min_length=1)]
    tokenizer_files: list[PlainFileName] = []
    hf_config: dict[str, Any]


def field_path(location: tuple) -> str:
    """('experts', 3, 'file') -> 'experts[3].file'"""
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _describe(error: dict) -> str:
    """One pydantic error as a sentence that names the field and the value found."""
    where, kind, found, context = field_path(error["loc"]), error["type"], error.get("input"), error.get("ctx") or {}
    if kind == "missing":
        return f"{where} is missing"
    if kind in ("int_type", "float_type", "bool_type", "string_type", "list_type", "dict_type", "model_type"):
        wanted = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
                  "string_type": "a string", "list_type": "a list", "dict_type": "an object",
                  "model_type": "an object"}[kind]
        return f"{where} {found!r} ({type(found).__name__}) should be {wanted}"
    if kind == "greater_than_equal":
        return f"{where} {found!r} is below {context['ge']}"
    if kind == "greater_than":
        return f"{where} {found!r} must be above {context['gt']}"
    if kind == "literal_error":
        return f"{where} {found!r} is not one of {context['expected']}"
    if kind == "string_pattern_mismatch":
        return f"{where} {found!r} is not 16 lowercase hex digits"
    if kind == "too_short":
        return f"{where} is empty"
    if kind == "value_error":
        return f"{where} {error['ctx']['error']}"
    return f"{where}: {error['msg']} (found {found!r})"


def parse_document(data: dict[str, Any], *, source: Path) -> ManifestDocument:
    try:
        return ManifestDocument.model_validate(data)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]  # one line: the first fault is enough to act on
        more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
        raise StoreError(f"{source}: {_describe(first)}{more}") from None


def _check_model(model: ModelFields, source: Path) -> None:
    if model.rotary_dim is not None and (model.rotary_dim > model.head_dim or model.rotary_dim % 2):
        raise StoreError(f"{source}: model.rotary_dim {model.rotary_dim} must be even and at most model.head_dim {model.head_dim}")
    if model.num_experts % model.n_group or model.topk_group > model.n_group:
        raise StoreError(f"{source}: model.n_group {model.n_group} must divide model.num_experts {model.num_experts} "
                         f"and be at least model.topk_group {model.topk_group}")
    if model.attention == "latent":
        if not (model.kv_lora_rank and model.qk_rope_head_dim and model.v_head_dim) or model.qk_rope_head_dim % 2:
            raise StoreError(f"{source}: model.attention 'latent' needs model.kv_lora_rank, model.v_head_dim and an even "
                             f"model.qk_rope_head_dim above 0")
        if model.head_dim != model.qk_nope_head_dim + model.qk_rope_head_dim:
            raise StoreError(f"{source}: model.head_dim {model.head_dim} should be model.qk_nope_head_dim "
                             f"{model.qk_nope_head_dim} + model.qk_rope_head_dim {model.qk_rope_head_dim}")
    outside = [layer for layer in model.dense_layers if layer >= model.num_layers]
    if outside:
        raise StoreError(f"{source}: model.dense_layers names layer {outside[0]}, the model has 0-{model.num_layers - 1}")
    if model.dense_layers and model.dense_intermediate_size is None:
        raise StoreError(f"{source}: model.dense_layers needs model.dense_intermediate_size")
    outside = [layer for layer in model.sliding_layers or () if layer >= model.num_layers]
    if outside:
        raise StoreError(f"{source}: model.sliding_layers names layer {outside[0]}, the model has 0-{model.num_layers - 1}")
    if model.rope_type == "yarn" and model.rope_original_max_position_embeddings is None:
        raise StoreError(f"{source}: model.rope_type 'yarn' needs model.rope_original_max_position_embeddings")
    if model.expert_activation == "clamped_swiglu" and (model.swiglu_alpha is None or model.swiglu_limit is None):
        raise StoreError(f"{source}: model.expert_activation 'clamped_swiglu' needs model.swiglu_alpha and model.swiglu_limit")
    if model.top_k > model.num_experts:
        raise StoreError(f"{source}: model.top_k {model.top_k} is above model.num_experts {model.num_experts}")
    if model.num_heads % model.num_kv_heads:
        raise StoreError(f"{source}: model.num_kv_heads {model.num_kv_heads} does not divide model.num_heads {model.num_heads}")
    for name in ("bos_token_id", "eos_token_id"):
        token = getattr(model, name)
        if token is not None and token >= model.vocab_size:
            raise StoreError(f"{source}: model.{name} {token} is outside model.vocab_size {model.vocab_size}")


def _quant_spec(fields: QuantFields, where: str, source: Path) -> QuantSpec:
    try:
        return QuantSpec(fields.bits, fields.group_size, fields.format)
    except ConfigError as err:
        raise StoreError(f"{source}: {where}: {err}") from None


def _describe_spec(spec: QuantSpec) -> str:
    return "an MXFP4" if spec.is_mxfp4 else f"a {spec.bits}-bit"


def _check_layout(doc: ManifestDocument, config: ModelConfig, source: Path) -> BlobLayout:
    """The layout as written, after checking it fits its blob and matches the model config."""
    fields = doc.blob_layout
    spec = _quant_spec(fields.quantization, "blob_layout.quantization", source)
    if fields.quantization != doc.quantization.experts:
        raise StoreError(f"{source}: blob_layout.quantization {fields.quantization.model_dump()} differs from "
                         f"quantization.experts {doc.quantization.experts.model_dump()}")
    if fields.weight_dtype != doc.dtype:
        raise StoreError(f"{source}: blob_layout.weight_dtype {fields.weight_dtype!r} differs from dtype {doc.dtype!r}")
    try:
        activation = ExpertActivation(**fields.activation.model_dump()) if fields.activation else ExpertActivation()
    except ConfigError as err:
        raise StoreError(f"{source}: blob_layout.activation: {err}") from None
    layout = BlobLayout(tuple(TensorSlot(t.name, t.dtype, tuple(t.shape), t.offset) for t in fields.tensors),
                        fields.nbytes, spec, fields.weight_dtype, activation)
    try:
        expected = BlobLayout.for_expert(config, spec, DTYPES[fields.weight_dtype])
    except ConfigError as err:
        raise StoreError(f"{source}: blob_layout does not fit the model: {err}") from None
    if layout.activation != expected.activation:
        raise StoreError(f"{source}: blob_layout.activation {layout.activation.to_dict()} differs from the model's "
                         f"{expected.activation.to_dict()} (model.expert_activation, model.swiglu_alpha, model.swiglu_limit)")
    wanted = {slot.name: slot for slot in expected.slots}
    names = [slot.name for slot in layout.slots]
    if sorted(names) != sorted(wanted):
        raise StoreError(f"{source}: blob_layout.tensors are {names}, {_describe_spec(spec)} expert has {list(wanted)}")
    for index, slot in enumerate(layout.slots):
        where = f"blob_layout.tensors[{index}] ({slot.name})"
        want = wanted[slot.name]
        if slot.dtype != want.dtype:
            raise StoreError(f"{source}: {where}.dtype {slot.dtype!r} should be {want.dtype!r}")
        if slot.shape != want.shape:
            raise StoreError(f"{source}: {where}.shape {list(slot.shape)} does not match the model config, "
                             f"which needs {list(want.shape)}")
        if slot.offset % ALIGN:
            raise StoreError(f"{source}: {where}.offset {slot.offset} is not a multiple of {ALIGN}")
        if slot.offset + slot.nbytes > layout.nbytes:
            raise StoreError(f"{source}: {where}.offset {slot.offset} + {slot.nbytes} bytes runs past "
                             f"blob_layout.nbytes {layout.nbytes}")
    ordered = sorted(range(len(layout.slots)), key=lambda i: layout.slots[i].offset)
    for before, after in zip(ordered, ordered[1:]):
        a, b = layout.slots[before], layout.slots[after]
        if a.offset + a.nbytes > b.offset:
            raise StoreError(f"{source}: blob_layout.tensors[{after}] ({b.name}) at bytes {b.offset}-{b.offset + b.nbytes} "
                             f"overlaps blob_layout.tensors[{before}] ({a.name}) at bytes {a.offset}-{a.offset + a.nbytes}")
    return layout


def _check_experts(doc: ManifestDocument, config: ModelConfig, source: Path) -> None:
    seen: dict[tuple[int, int], int] = {}
    moe_layers = config.moe_layers
    for index, entry in enumerate(doc.experts):
        if entry.layer >= config.num_layers:
            raise StoreError(f"{source}: experts[{index}].layer {entry.layer} is outside the model's layers 0-{config.num_layers - 1}")
        if entry.layer not in moe_layers:
            raise StoreError(f"{source}: experts[{index}].layer {entry.layer} is one of model.dense_layers, which hold no experts")
        if entry.expert >= config.num_experts:
            raise StoreError(f"{source}: experts[{index}].expert {entry.expert} is outside the model's experts 0-{config.num_experts - 1}")
        key = (entry.layer, entry.expert)
        if key in seen:
            raise StoreError(f"{source}: experts[{index}] lists layer {key[0]} expert {key[1]} again (first at experts[{seen[key]}])")
        seen[key] = index
    total = len(moe_layers) * config.num_experts
    if len(seen) != total:
        missing = next((l, e) for l in moe_layers for e in range(config.num_experts) if (l, e) not in seen)
        raise StoreError(f"{source}: experts lists {len(seen)} experts, the model has {total} "
                         f"(layer {missing[0]} expert {missing[1]} is missing)")


def check_consistency(doc: ManifestDocument, *, source: Path) -> tuple[ModelConfig, QuantSpec, QuantSpec, BlobLayout]:
    """The parts a Manifest is built from, once they agree with each other."""
    _check_model(doc.model, source)
    fields = doc.model.model_dump()
    fields.update(rms_norm_eps=float(fields["rms_norm_eps"]), rope_theta=float(fields["rope_theta"]),  # 1e6 written as 1000000
                  routed_scaling_factor=float(fields["routed_scaling_factor"]), dense_layers=tuple(fields["dense_layers"]))
    for name in ("rope_factor", "rope_beta_fast", "rope_beta_slow", "rope_attention_factor", "softmax_scale_factor", "swiglu_alpha",
                 "swiglu_limit"):
        fields[name] = None if fields[name] is None else float(fields[name])
    config = ModelConfig(**fields)
    expert_quant = _quant_spec(doc.quantization.experts, "quantization.experts", source)
    dense_quant = _quant_spec(doc.quantization.dense, "quantization.dense", source)
    if dense_quant.is_mxfp4:  # only experts are kept as a checkpoint's MXFP4
        raise StoreError(f"{source}: quantization.dense.format 'mxfp4': dense weights are plain or HQQ")
    layout = _check_layout(doc, config, source)
    _check_experts(doc, config, source)
    return config, expert_quant, dense_quant, layout
