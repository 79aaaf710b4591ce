"""make-synthetic beyond Mixtral: the Qwen3-MoE, GLM-4.5, GPT-OSS and DeepSeek-V3 shapes write
stores that hold the dense tensors their family reads, open and generate on the CPU, and can be
cut to their first layers; the real shapes are their published configs (transformers' defaults
where those are a published model's), and what they would weigh per expert and per layer is
what the manifest would say, known without writing them; an unknown shape or a bad --layers is
one line naming the choices."""

import re

import pytest
import torch
from safetensors import safe_open

from common.errors import ConfigError
from common.store.blob_layout import ALIGN

from common.store import dense_names
from common.store.manifest import Manifest
from conftest import coordinator_cli
from coordinator.families import FAMILIES
from coordinator.runtime.engine import Engine
from coordinator.tools.synthetic import hf_config_for, make_synthetic_store, plan_synthetic_store
from coordinator.tools.synthetic_shapes import SHAPES

SMALL = {"small-qwen3": "qwen3_moe", "small-glm4": "glm4_moe", "small-gpt-oss": "gpt_oss",
         "small-deepseek": "deepseek_v3"}
DENSE_LAYERS = {"small-qwen3": (), "small-glm4": (0,), "small-gpt-oss": (), "small-deepseek": (0,)}
QUANTIZED_PART = re.compile(r"\.(codes\.p\d+|scale|zero)$")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic-families")
    for shape in SMALL:
        make_synthetic_store(shape=shape, out=folder / shape, dense_bits=4, progress=False)  # gpt-oss: MXFP4
    return folder


class ShapeOnlyCheckpoint:
    """What a family's dense_tensors() reads, with every tensor an empty meta tensor: enough to
    learn which names pack would write for a config."""

    def __init__(self, config):
        self.config, self.folder = config, "synthetic"

    def has(self, name: str) -> bool:
        return False

    def tensor(self, name: str) -> torch.Tensor:
        return torch.empty(0, device="meta")


def stored_dense_names(store) -> set[str]:
    """dense.safetensors' names, a quantized projection's parts counted as the projection."""
    with safe_open(str(store / "dense.safetensors"), "pt") as dense:
        names = set(dense.keys())
    return {QUANTIZED_PART.sub("", name) if dense_names.is_attention(QUANTIZED_PART.sub("", name)) else name
            for name in names}


@pytest.mark.parametrize("shape", SMALL)
def test_synthetic_store_of_each_family_generates_from_token_ids(stores, shape):
    engine = Engine.open(stores / shape, device="cpu")
    generation = engine.generate([1, 2, 3], max_new_tokens=3)
    list(generation)
    assert len(generation.token_ids) == 3


@pytest.mark.parametrize("shape", SMALL)
def test_manifest_names_the_family_and_experts_are_stored_for_moe_layers_only(stores, shape):
    manifest = Manifest.read(stores / shape)
    model = manifest.model
    assert model.family == SMALL[shape] and manifest.hf_config["model_type"] == SMALL[shape]
    assert model.dense_layers == DENSE_LAYERS[shape]
    assert {eid.layer for eid in manifest.experts} == set(model.moe_layers)
    assert len(manifest.experts) == len(model.moe_layers) * model.num_experts


@pytest.mark.parametrize("shape", SMALL)
def test_synthetic_store_holds_exactly_the_dense_tensors_pack_writes_for_the_family(stores, shape):
    model = Manifest.read(stores / shape).model
    expected = set(FAMILIES[model.family].dense_tensors(ShapeOnlyCheckpoint(model)))
    assert stored_dense_names(stores / shape) == expected


def test_glm_store_has_biases_shared_experts_and_a_dense_first_layer(stores):
    engine = Engine.open(stores / "small-glm4", device="cpu")
    first, second = engine.dense.layers[0], engine.dense.layers[1]
    assert first.router is None and first.dense_w13 is not None and first.shared_w13 is None
    assert second.router_bias is not None and second.shared_w13 is not None and second.qkv_bias is not None  # q/k/v biases, stacked with the weights


def test_real_shapes_read_as_their_family_reads_them():
    qwen = FAMILIES["qwen3_moe"].model_config(hf_config_for("qwen3-30b-a3b"))
    assert (qwen.num_layers, qwen.num_experts, qwen.top_k, qwen.intermediate_size, qwen.qk_norm) == (48, 128, 8, 768, "head")
    assert qwen.dense_layers == () and qwen.head_dim == 128 and qwen.vocab_size == 151936
    glm = FAMILIES["glm4_moe"].model_config(hf_config_for("glm-4.5-air"))
    assert (glm.num_layers, glm.num_experts, glm.top_k, glm.intermediate_size) == (46, 128, 8, 1408)
    assert glm.dense_layers == (0,) and glm.dense_intermediate_size == 10944
    assert glm.shared_expert_intermediate_size == 1408 and glm.rotary_dim == 64 and glm.attention_bias
    assert glm.router == "sigmoid_grouped" and glm.qk_norm == "none" and glm.num_heads == 96


def test_a_cut_store_keeps_its_first_layers_and_the_dense_layer_rule(tmp_path):
    result = coordinator_cli("make-synthetic", "--shape", "small-glm4", "--layers", "2", "--out", tmp_path / "cut",
                             "--quiet")
    assert result.returncode == 0, result.stderr
    assert "first 2 of 4 layers; per-layer figures only" in result.stdout
    model = Manifest.read(tmp_path / "cut").model
    assert model.num_layers == 2 and model.dense_layers == (0,) and model.moe_layers == [1]
    assert Manifest.read(tmp_path / "cut").hf_config["num_hidden_layers"] == 2


def test_an_unknown_shape_is_one_line_naming_the_shapes(tmp_path):
    result = coordinator_cli("make-synthetic", "--shape", "dbrx-132b", "--out", tmp_path / "s")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "--shape dbrx-132b" in result.stderr and all(name in result.stderr for name in SHAPES)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("layers, says", [("5", "choose 1 to 4"), ("0", "choose 1 to 4"), ("1", "all dense")])
def test_layers_that_leave_no_experts_or_exceed_the_model_are_refused(tmp_path, layers, says):
    result = coordinator_cli("make-synthetic", "--shape", "small-glm4", "--layers", layers, "--out", tmp_path / "s")
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: --layers {layers}:") and says in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "s").exists()


def test_gpt_oss_store_has_mxfp4_experts_with_biases_sinks_and_alternating_windows(stores):
    manifest = Manifest.read(stores / "small-gpt-oss")
    assert manifest.expert_quant.is_mxfp4 and manifest.layout.activation.kind == "clamped_swiglu"
    assert {"w13.codes", "w13.scales", "w13.bias", "w2.codes", "w2.scales", "w2.bias"} == {s.name for s in manifest.layout.slots}
    assert manifest.model.sliding_layers == (0, 2) and manifest.model.rope_type == "yarn"
    engine = Engine.open(stores / "small-gpt-oss", device="cpu")
    layer = engine.dense.layers[1]
    assert layer.sinks.shape == (8,) and layer.o_bias is not None and layer.router_logit_bias is not None


def test_deepseek_store_has_latent_attention_and_yarn(stores):
    model = Manifest.read(stores / "small-deepseek").model
    assert model.attention == "latent" and model.rope_type == "yarn" and model.softmax_scale_factor > 1
    engine = Engine.open(stores / "small-deepseek", device="cpu")
    first, second = engine.dense.layers[0], engine.dense.layers[1]
    assert first.dense_w13 is not None and first.latent.q_a_proj.shape == (64, 256)
    assert second.shared_w13.shape == (256, 256) and second.router_bias.shape == (16,)


def test_gpt_oss_experts_are_mxfp4_unless_a_width_is_given_on_the_command_line(tmp_path):
    result = coordinator_cli("make-synthetic", "--shape", "small-gpt-oss", "--layers", "1", "--out", tmp_path / "m",
                             "--quiet")
    assert result.returncode == 0, result.stderr
    assert "(MXFP4 as published, 4.31 bits/param)" in result.stdout and Manifest.read(tmp_path / "m").expert_quant.is_mxfp4
    result = coordinator_cli("make-synthetic", "--shape", "small-gpt-oss", "--layers", "1", "--expert-bits", "4",
                             "--out", tmp_path / "q", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "(4-bit HQQ, " in result.stdout and Manifest.read(tmp_path / "q").expert_quant.format == "hqq"


def test_gpt_oss_takes_hqq_experts_when_a_width_is_given(tmp_path):
    plan = plan_synthetic_store(shape="small-gpt-oss", expert_bits=4)
    assert not plan.expert_spec.is_mxfp4 and plan.expert_spec.bits == 4
    assert plan_synthetic_store(shape="small-gpt-oss").expert_spec.is_mxfp4
    assert plan_synthetic_store(shape="small-deepseek").expert_spec.bits == 2


# The fields of the published config.json that transformers' defaults do not hold (its defaults are
# gpt-oss-120b's and DeepSeek-V3's own values otherwise).
NOT_DEFAULTS = {"gpt-oss-120b": set(), "deepseek-v3": {"max_position_embeddings", "rope_parameters"}}


@pytest.mark.parametrize("shape", NOT_DEFAULTS)
def test_real_shapes_agree_with_transformers_defaults_where_those_are_the_published_model(shape):
    from transformers import AutoConfig

    defaults = AutoConfig.for_model(SHAPES[shape].family).to_dict()
    differing = {name for name, value in SHAPES[shape].config.items() if defaults.get(name) != value}
    assert differing == NOT_DEFAULTS[shape]


def test_new_real_shapes_read_as_their_family_reads_them():
    small, large = (FAMILIES["gpt_oss"].model_config(hf_config_for(name)) for name in ("gpt-oss-20b", "gpt-oss-120b"))
    assert (small.num_layers, small.num_experts, large.num_layers, large.num_experts) == (24, 32, 36, 128)
    for model in (small, large):
        assert (model.hidden_size, model.intermediate_size, model.top_k, model.vocab_size) == (2880, 2880, 4, 201088)
        assert (model.num_heads, model.num_kv_heads, model.head_dim, model.sliding_window) == (64, 8, 64, 128)
        assert model.sliding_layers == tuple(range(0, model.num_layers, 2)) and model.attention_sinks
        assert model.rope_type == "yarn" and model.rope_factor == 32.0 and model.expert_bias and model.output_bias
        assert model.expert_activation == "clamped_swiglu" and model.swiglu_limit == 7.0
    deepseek = FAMILIES["deepseek_v3"].model_config(hf_config_for("deepseek-v3"))
    assert (deepseek.num_layers, deepseek.num_experts, deepseek.top_k, deepseek.intermediate_size) == (61, 256, 8, 2048)
    assert deepseek.dense_layers == (0, 1, 2) and deepseek.dense_intermediate_size == 18432
    assert (deepseek.n_group, deepseek.topk_group, deepseek.routed_scaling_factor) == (8, 4, 2.5)
    assert (deepseek.q_lora_rank, deepseek.kv_lora_rank, deepseek.qk_nope_head_dim, deepseek.qk_rope_head_dim,
            deepseek.v_head_dim, deepseek.num_heads, deepseek.vocab_size) == (1536, 512, 128, 64, 128, 128, 129280)
    assert deepseek.shared_expert_intermediate_size == 2048 and deepseek.rope_factor == 40.0


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def mxfp4_bytes(rows: int, columns: int) -> int:
    """codes (4 bits a weight), scales (a byte per 32), bias (bf16 per row)."""
    return aligned(rows * columns // 2) + aligned(rows * columns // 32) + aligned(rows * 2)


def hqq_bytes(rows: int, columns: int, bits: int, group: int = 64) -> int:
    """codes (bit planes), fp16 scale and zero per group."""
    planes = {4: (4,), 3: (2, 1), 2: (2,)}[bits]
    return sum(aligned(rows * columns * width // 8) for width in planes) + 2 * aligned(rows * columns // group * 2)


# (shape, --expert-bits, --layers): the bytes of one expert from the published sizes alone
REAL = {
    ("gpt-oss-20b", None, None): (mxfp4_bytes(2 * 2880, 2880) + mxfp4_bytes(2880, 2880), 32, 24),
    ("gpt-oss-120b", None, None): (mxfp4_bytes(2 * 2880, 2880) + mxfp4_bytes(2880, 2880), 128, 36),
    ("deepseek-v3", 2, None): (hqq_bytes(2 * 2048, 7168, 2) + hqq_bytes(7168, 2048, 2), 256, 58),
    ("deepseek-v3", 4, 5): (hqq_bytes(2 * 2048, 7168, 4) + hqq_bytes(7168, 2048, 4), 256, 2),
}


@pytest.mark.parametrize("shape, bits, layers", REAL)
def test_what_a_real_shape_would_write_per_expert_and_per_layer_is_known_without_writing(shape, bits, layers):
    expert, experts, moe_layers = REAL[shape, bits, layers]
    plan = plan_synthetic_store(shape=shape, expert_bits=bits, layers=layers)
    layout = plan.manifest_fields()["layout"].to_dict()
    assert layout["nbytes"] == expert and plan.layer_bytes == expert * experts
    assert len(plan.config.moe_layers) == moe_layers and plan.experts == experts * moe_layers
    print(f"{shape} bits={bits} layers={layers}: {expert / 1e6:.2f} MB per expert, {plan.layer_bytes / 1e9:.2f} GB "
          f"per layer, {plan.layer_bytes * moe_layers / 1e9:.1f} GB of experts, dense {plan.dense_bytes / 1e9:.2f} GB")


@pytest.mark.parametrize("shape", SMALL)
def test_a_written_store_weighs_what_its_plan_says(stores, shape):
    plan = plan_synthetic_store(shape=shape)
    manifest = Manifest.read(stores / shape)
    assert manifest.layout.to_dict() == plan.layout.to_dict() and manifest.model == plan.config
    for layer in plan.config.moe_layers:
        file = stores / shape / manifest.experts[next(e for e in manifest.experts if e.layer == layer)].file
        assert 0 <= file.stat().st_size - plan.layer_bytes < 64 * 1024  # the safetensors header
    with safe_open(str(stores / shape / "dense.safetensors"), "pt") as dense:
        assert sum(dense.get_tensor(name).nbytes for name in dense.keys()) == plan.dense_bytes


def test_a_deepseek_cut_to_its_dense_layers_is_refused_and_one_layer_more_has_experts():
    with pytest.raises(ConfigError, match="all dense; keep at least 4"):
        plan_synthetic_store(shape="deepseek-v3", layers=3)
    assert plan_synthetic_store(shape="deepseek-v3", layers=4).config.moe_layers == [3]
