"""FP8 block checkpoints as DeepSeek-V3 ships them (float8_e4m3fn weights, a float32
`weight_scale_inv` per block, config.json's quantization_config quant_method "fp8"): pack reads
them as they come, and the store is identical, byte for byte, to the one packed from the same
weights dequantized to float32 beforehand (w = fp8 * scale_inv per block), unquantized and at
4-bit HQQ, with blocks that divide the matrices or leave cut-short blocks at their edges (and
the same for a Qwen3-MoE checkpoint: the reader is no family's). Other quantization methods, for
every family, and malformed FP8 tensors are refused by name in one line before anything is
written."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.errors import ConfigError
from conftest import coordinator_cli
from coordinator.tools.pack import pack_checkpoint

FP8_MAX = 448.0  # the largest float8_e4m3fn
SIZES = dict(num_layers=3, hidden_size=64, intermediate_size=32, num_heads=4, num_kv_heads=4, num_experts=8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from coordinator.tools.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("deepseek-fp8") / "model", family="deepseek_v3", **SIZES)


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    """Qwen3-MoE's FP8 checkpoints (Qwen3-30B-A3B-FP8) are the same format: the reader is the family's."""
    from coordinator.tools.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("qwen3-fp8") / "model", family="qwen3_moe",
                           **{**SIZES, "num_kv_heads": 2})


def is_block_scaled(name: str) -> bool:
    """The published checkpoints' FP8 weights: every linear projection, not the router, the
    embedding, the LM head or the norms."""
    return name.endswith("_proj.weight") or name.endswith("_proj_with_mqa.weight")


def to_fp8_blocks(weight: torch.Tensor, rows: int, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 [O, I], scale_inv [ceil(O/rows), ceil(I/columns)] float32): each block scaled so its
    largest magnitude is FP8's largest, as DeepSeek's own conversion does."""
    out_features, in_features = weight.shape
    scale = torch.empty(math.ceil(out_features / rows), math.ceil(in_features / columns))
    for r in range(scale.shape[0]):
        for c in range(scale.shape[1]):
            block = weight[r * rows : (r + 1) * rows, c * columns : (c + 1) * columns]
            scale[r, c] = block.abs().max().clamp(min=1e-12) / FP8_MAX
    expanded = scale.repeat_interleave(rows, 0)[:out_features].repeat_interleave(columns, 1)[:, :in_features]
    return (weight / expanded).to(torch.float8_e4m3fn), scale


def dequantized(fp8: torch.Tensor, scale: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """The test's own w = fp8 * scale_inv per block, in float32."""
    out_features, in_features = fp8.shape
    expanded = scale.repeat_interleave(rows, 0)[:out_features].repeat_interleave(columns, 1)[:, :in_features]
    return fp8.float() * expanded


def copy_with(tiny, folder, weights, quantization_config=None):
    folder.mkdir()
    for path in tiny.iterdir():
        if path.name != "model.safetensors":
            shutil.copy(path, folder / path.name)
    config = json.loads((tiny / "config.json").read_text())
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config))
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def fp8_and_equivalent(tiny, folder, rows, columns):
    """An FP8 block copy of `tiny` and the float32 checkpoint of the same weights dequantized."""
    original = load_file(tiny / "model.safetensors")
    fp8, plain = {}, {}
    for name, weight in original.items():
        if is_block_scaled(name):
            codes, scale = to_fp8_blocks(weight, rows, columns)
            fp8[name], fp8[f"{name}_scale_inv"] = codes, scale
            plain[name] = dequantized(codes, scale, rows, columns)
        else:
            fp8[name] = plain[name] = weight
    config = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [rows, columns], "activation_scheme": "dynamic"}
    return copy_with(tiny, folder / "fp8", fp8, config), copy_with(tiny, folder / "plain", plain), original, plain


@pytest.mark.parametrize("rows, columns", [(128, 128), (16, 16), (16, 40)],
                         ids=["128x128-as-published", "16x16-edges-cut-short", "16x40"])
@pytest.mark.parametrize("expert_bits, dense_bits", [(16, 16), (4, 4)], ids=["unquantized", "hqq-4"])
def test_an_fp8_block_checkpoint_packs_into_the_store_of_its_dequantized_weights(tiny, tmp_path, rows, columns,
                                                                                 expert_bits, dense_bits):
    fp8, plain, original, equivalent = fp8_and_equivalent(tiny, tmp_path, rows, columns)
    name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"  # 24 rows: a block cut short at 16
    assert not torch.equal(equivalent[name], original[name])  # the FP8 rounding is there to carry over
    options = dict(expert_bits=expert_bits, dense_bits=dense_bits, group_size=32, progress=False)
    ours = pack_checkpoint(model_dir=fp8, out=tmp_path / "from-fp8", **options).manifest
    theirs = pack_checkpoint(model_dir=plain, out=tmp_path / "from-plain", **options).manifest
    assert ours.model_id == theirs.model_id
    assert ours.experts == theirs.experts and ours.dense_checksum == theirs.dense_checksum
    assert ours.dtype == "float32" and ours.hf_config["quantization_config"]["quant_method"] == "fp8"


def test_another_familys_fp8_block_checkpoint_packs_into_the_store_of_its_dequantized_weights(tiny_qwen3, tmp_path):
    fp8, plain, _, _ = fp8_and_equivalent(tiny_qwen3, tmp_path, 16, 16)
    options = dict(expert_bits=4, dense_bits=16, group_size=32, progress=False)
    ours = pack_checkpoint(model_dir=fp8, out=tmp_path / "from-fp8", **options).manifest
    theirs = pack_checkpoint(model_dir=plain, out=tmp_path / "from-plain", **options).manifest
    assert ours.model.family == "qwen3_moe" and ours.model_id == theirs.model_id


def test_a_quant_method_is_refused_by_name_for_families_that_do_not_look_at_it(tiny_qwen3, tmp_path):
    model = copy_with(tiny_qwen3, tmp_path / "model", load_file(tiny_qwen3 / "model.safetensors"),
                      {"quant_method": "gptq", "bits": 4})
    refused(model, tmp_path, "quantization_config.quant_method 'gptq' is not supported")


def test_gpt_oss_reads_only_its_mxfp4(tmp_path):
    from coordinator.tools.tiny_model import make_tiny_model

    model = make_tiny_model(tmp_path / "gpt-oss", family="gpt_oss", num_layers=1, hidden_size=64, intermediate_size=32,
                            num_heads=4, num_kv_heads=2, num_experts=4)
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [16, 16]}
    (model / "config.json").write_text(json.dumps(config))
    assert "(moe-edge runs 'mxfp4')" in refused(model, tmp_path, "quantization_config.quant_method 'fp8' is not supported")


def test_the_store_of_an_fp8_checkpoint_generates(tiny, tmp_path):
    from coordinator.runtime.engine import Engine

    fp8, _, _, _ = fp8_and_equivalent(tiny, tmp_path, 16, 16)
    pack_checkpoint(model_dir=fp8, out=tmp_path / "store", progress=False)
    with Engine.open(tmp_path / "store") as engine:
        generation = engine.generate([1, 5, 9], max_new_tokens=4, stop_at_eos=False)
        list(generation)
    assert len(generation.token_ids) == 4


def refused(model, tmp_path, match):
    with pytest.raises(ConfigError, match=match) as refusal:
        pack_checkpoint(model_dir=model, out=tmp_path / "store", progress=False)
    assert "\n" not in str(refusal.value) and not (tmp_path / "store").exists()
    return str(refusal.value)


@pytest.mark.parametrize("config, says", [
    ({"quant_method": "awq", "bits": 4}, "quantization_config.quant_method 'awq' is not supported"),
    ({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [16, 16]}, "quantization_config.fmt 'e5m2'"),
    ({"quant_method": "fp8", "weight_block_size": None}, "quantization_config.weight_block_size None"),
    ({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [16, 16]},
     "quantization_config.activation_scheme 'static'"),
], ids=["awq", "e5m2", "per-tensor", "static"])
def test_other_quantizations_are_refused_by_name_before_writing(tiny, tmp_path, config, says):
    fp8, _, _, _ = fp8_and_equivalent(tiny, tmp_path, 16, 16)
    edited = json.loads((fp8 / "config.json").read_text())
    edited["quantization_config"] = config
    (fp8 / "config.json").write_text(json.dumps(edited))
    refused(fp8, tmp_path, says)


def test_an_unknown_quant_method_is_one_line_from_the_command_line(tiny, tmp_path):
    model = copy_with(tiny, tmp_path / "model", load_file(tiny / "model.safetensors"), {"quant_method": "hqq"})
    result = coordinator_cli("pack", "--model", model, "--out", tmp_path / "store", "--quiet")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "quantization_config.quant_method 'hqq' is not supported" in result.stderr
    assert not (tmp_path / "store").exists()


def test_pack_says_the_fp8_weights_are_dequantized(tiny, tmp_path):
    fp8, _, _, _ = fp8_and_equivalent(tiny, tmp_path, 16, 16)
    result = coordinator_cli("pack", "--model", fp8, "--out", tmp_path / "store", "--group-size", "32", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "FP8 block weights (16x16 scales) are dequantized to float32 as they are read" in result.stderr


NAME = "model.layers.2.mlp.experts.3.down_proj.weight"


def test_an_fp8_weight_without_its_scales_is_refused_by_name(tiny, tmp_path):
    fp8, _, _, _ = fp8_and_equivalent(tiny, tmp_path, 16, 16)
    weights = load_file(fp8 / "model.safetensors")
    del weights[f"{NAME}_scale_inv"]
    save_file(weights, fp8 / "model.safetensors", metadata={"format": "pt"})
    assert NAME in refused(fp8, tmp_path, "without its .*_scale_inv")


def test_scales_of_the_wrong_shape_are_refused_by_name(tiny, tmp_path):
    fp8, _, _, _ = fp8_and_equivalent(tiny, tmp_path, 16, 16)
    weights = load_file(fp8 / "model.safetensors")
    weights[f"{NAME}_scale_inv"] = torch.ones(4, 1)  # [64, 32] in 16x16 blocks wants [4, 2]
    save_file(weights, fp8 / "model.safetensors", metadata={"format": "pt"})
    assert NAME in refused(fp8, tmp_path, r"must be torch.float32 \[4, 2\]")


def test_scales_beside_a_weight_that_is_not_fp8_are_refused_by_name(tiny, tmp_path):
    fp8, _, original, _ = fp8_and_equivalent(tiny, tmp_path, 16, 16)
    weights = load_file(fp8 / "model.safetensors")
    weights[NAME] = original[NAME]  # float32 again, its scales still beside it
    save_file(weights, fp8 / "model.safetensors", metadata={"format": "pt"})
    assert NAME in refused(fp8, tmp_path, "torch.float32, not fp8")


def test_fp8_weights_without_an_fp8_quantization_config_are_refused_by_name(tiny, tmp_path):
    fp8, _, _, _ = fp8_and_equivalent(tiny, tmp_path, 16, 16)
    edited = json.loads((fp8 / "config.json").read_text())
    del edited["quantization_config"]
    (fp8 / "config.json").write_text(json.dumps(edited))
    refused(fp8, tmp_path, "torch.float8_e4m3fn, but config.json has no quantization_config")
