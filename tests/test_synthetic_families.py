"""make-synthetic beyond Mixtral: the Qwen3-MoE and GLM-4.5 shapes write stores that hold the
dense tensors their family reads, open and generate on the CPU, and can be cut to their first
layers; an unknown shape or a bad --layers is one line naming the choices."""

import re

import pytest
import torch
from safetensors import safe_open

from common.store import dense_names
from common.store.manifest import Manifest
from conftest import coordinator_cli
from coordinator.families import FAMILIES
from coordinator.runtime.engine import Engine
from coordinator.tools.synthetic import hf_config_for, make_synthetic_store
from coordinator.tools.synthetic_shapes import SHAPES

SMALL = {"small-qwen3": "qwen3_moe", "small-glm4": "glm4_moe"}
QUANTIZED_PART = re.compile(r"\.(codes\.p\d+|scale|zero)$")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic-families")
    for shape in SMALL:
        make_synthetic_store(shape=shape, out=folder / shape, expert_bits=2, dense_bits=4, progress=False)
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
    assert model.dense_layers == ((0,) if shape == "small-glm4" else ())
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
    assert second.router_bias is not None and second.shared_w13 is not None and second.q_bias is not None


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
    result = coordinator_cli("make-synthetic", "--shape", "deepseek-v3", "--out", tmp_path / "s")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "--shape deepseek-v3" in result.stderr and all(name in result.stderr for name in SHAPES)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("layers, says", [("5", "choose 1 to 4"), ("0", "choose 1 to 4"), ("1", "all dense")])
def test_layers_that_leave_no_experts_or_exceed_the_model_are_refused(tmp_path, layers, says):
    result = coordinator_cli("make-synthetic", "--shape", "small-glm4", "--layers", layers, "--out", tmp_path / "s")
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: --layers {layers}:") and says in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "s").exists()
