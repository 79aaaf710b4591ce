"""GPT-OSS's own parts, beyond what tests/test_families.py proves against transformers: the YaRN
tables equal transformers' for the published rope settings, a store says in its blob layout how
to run an expert (biases and the clamped SwiGLU), a malformed MXFP4 expert tensor is refused by
name in one line before anything is written (tests/test_mxfp4.py packs well-formed ones), and
quantization methods other than MXFP4 are refused."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.errors import ConfigError

SIZES = dict(num_layers=2, hidden_size=64, intermediate_size=32, num_heads=4, num_kv_heads=2, num_experts=4)


@pytest.fixture(scope="module")
def gpt_oss_dir(tmp_path_factory):
    from coordinator.tools.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("gpt-oss") / "model", family="gpt_oss", **SIZES)


@pytest.mark.parametrize("truncate", [False, True])
def test_yarn_frequencies_and_scaling_equal_transformers_for_the_published_settings(truncate):
    from transformers import GptOssConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from coordinator.families import gpt_oss
    from coordinator.runtime import rope

    rope_parameters = dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0, beta_slow=1.0,
                           truncate=truncate, original_max_position_embeddings=4096)  # gpt-oss-20b's config.json
    hf = GptOssConfig(rope_parameters=rope_parameters).to_dict()
    theirs, their_scaling = ROPE_INIT_FUNCTIONS["yarn"](GptOssConfig(**hf))
    ours, our_scaling = rope.inverse_frequencies(gpt_oss.model_config(hf))
    assert torch.equal(ours, theirs)
    assert our_scaling == pytest.approx(their_scaling, rel=1e-12)


def test_a_store_names_the_expert_biases_and_activation_in_its_layout(gpt_oss_dir, tmp_path):
    from coordinator.tools.pack import pack_checkpoint

    summary = pack_checkpoint(model_dir=gpt_oss_dir, out=tmp_path / "store", expert_bits=4, group_size=32, progress=False)
    layout = json.loads((tmp_path / "store" / "manifest.json").read_text())["blob_layout"]
    shapes = {t["name"]: t["shape"] for t in layout["tensors"]}
    assert shapes["w13.bias"] == [64] and shapes["w2.bias"] == [64]
    assert layout["activation"] == {"kind": "clamped_swiglu", "alpha": 1.702, "limit": 3.0}
    assert summary.manifest.model.sliding_layers == (0,) and summary.manifest.model.rope_type == "yarn"


def test_a_layout_whose_activation_differs_from_the_model_is_refused(gpt_oss_dir, tmp_path):
    from common.errors import StoreError
    from common.store.manifest import Manifest
    from coordinator.tools.pack import pack_checkpoint

    pack_checkpoint(model_dir=gpt_oss_dir, out=tmp_path / "store", progress=False)
    path = tmp_path / "store" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["blob_layout"]["activation"]["limit"] = 7.0
    path.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="blob_layout.activation"):
        Manifest.read(tmp_path / "store")


def test_a_malformed_mxfp4_expert_tensor_is_refused_by_name_before_anything_is_written(gpt_oss_dir, tmp_path):
    from coordinator.tools.pack import pack_checkpoint

    model = shutil.copytree(gpt_oss_dir, tmp_path / "model")
    weights = load_file(model / "model.safetensors")
    experts, hidden, ffn = SIZES["num_experts"], SIZES["hidden_size"], SIZES["intermediate_size"]
    shapes = {"gate_up_proj": (2 * ffn, hidden // 32), "down_proj": (hidden, ffn // 32)}
    for layer in range(SIZES["num_layers"]):  # as the published checkpoints store them
        prefix = f"model.layers.{layer}.mlp.experts"
        for matrix, (rows, blocks) in shapes.items():
            del weights[f"{prefix}.{matrix}"]
            weights[f"{prefix}.{matrix}_blocks"] = torch.zeros(experts, rows, blocks, 16, dtype=torch.uint8)
            weights[f"{prefix}.{matrix}_scales"] = torch.full((experts, rows, blocks), 127, dtype=torch.uint8)
    weights["model.layers.1.mlp.experts.down_proj_scales"] = torch.zeros(experts, hidden, 2, dtype=torch.uint8)
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "store"
    with pytest.raises(ConfigError, match=r"tensor model.layers.1.mlp.experts.down_proj_scales is torch.uint8 \[4, 64, 2\]; "
                                          r"MXFP4 for this config is torch.uint8 \[4, 64, 1\]"):
        pack_checkpoint(model_dir=model, out=out, progress=False)
    assert not out.exists()


def test_a_quantization_config_other_than_mxfp4_is_refused_in_one_line(gpt_oss_dir):
    from coordinator.families import gpt_oss

    hf = json.loads((gpt_oss_dir / "config.json").read_text())
    hf["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    assert gpt_oss.model_config(hf).family == "gpt_oss"
    hf["quantization_config"] = {"quant_method": "bitsandbytes"}
    with pytest.raises(ConfigError, match="quant_method 'bitsandbytes': only MXFP4 experts are read"):
        gpt_oss.model_config(hf)
