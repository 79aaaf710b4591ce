"""GPT-OSS's MXFP4 experts are packed as stored and run as transformers runs them: a tiny random
GPT-OSS checkpoint has its experts quantized to MXFP4 here (a power-of-two scale per 32 weights,
each weight rounded to the nearest e2m1 value), written as `*_blocks` / `*_scales` as the
published checkpoints are; a second checkpoint holds the same experts dequantized, in float32.
The MXFP4 store keeps the checkpoint's bytes (about 4.25 bits per weight), and gives
transformers' logits on the dequantized checkpoint for the prompt and 16 decode steps."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.mxfp4 import BLOCK, FP4_VALUES, Mxfp4Matrix
from coordinator.runtime.engine import Engine
from coordinator.runtime.model import KVCache

SIZES = dict(num_layers=3, hidden_size=64, intermediate_size=32, num_heads=4, num_kv_heads=2)
PROMPT_TOKENS = 24
DECODE_STEPS = 16
EXPERTS = "model.layers.{layer}.mlp.experts"


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., O, I] float -> (blocks uint8 [..., O, I/32, 16], scales uint8 [..., O, I/32]), written
    independently of common/mxfp4.py: a block's scale is the smallest power of two that brings its
    largest magnitude within e2m1's 6, each value rounds to the nearest e2m1 value."""
    blocks = weight.float().reshape(*weight.shape[:-1], -1, BLOCK)  # [..., O, B, 32]
    largest = blocks.abs().amax(dim=-1).clamp_min(2.0**-100)
    exponent = torch.ceil(torch.log2(largest / 6.0)).clamp(-127, 127).to(torch.int32)  # [..., O, B]
    scaled = blocks / torch.pow(2.0, exponent.float())[..., None]
    table = torch.tensor(FP4_VALUES)
    codes = (scaled[..., None] - table).abs().argmin(dim=-1).to(torch.uint8)  # [..., O, B, 32]
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)  # the even value in the low nibble
    return packed, (exponent + 127).to(torch.uint8)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return write_checkpoints(tmp_path_factory.mktemp("mxfp4"))


def write_checkpoints(root):
    """(the MXFP4 checkpoint, the dequantized float32 one), in `root`."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from coordinator.tools.tiny_model import make_tiny_model

    plain = make_tiny_model(root / "plain", family="gpt_oss", seed=0, **SIZES)
    mxfp4, reference = shutil.copytree(plain, root / "mxfp4"), shutil.copytree(plain, root / "reference")
    weights = load_file(plain / "model.safetensors")
    quantized, dequantized = dict(weights), dict(weights)
    for layer in range(SIZES["num_layers"]):
        prefix = EXPERTS.format(layer=layer)
        for matrix in ("gate_up_proj", "down_proj"):
            stored = weights.pop(f"{prefix}.{matrix}")  # [E, in, out], applied as x @ W
            blocks, scales = quantize_mxfp4(stored.transpose(1, 2))  # the checkpoint's [E, out, in/32, 16]
            del quantized[f"{prefix}.{matrix}"]
            quantized[f"{prefix}.{matrix}_blocks"], quantized[f"{prefix}.{matrix}_scales"] = blocks, scales
            dequantized[f"{prefix}.{matrix}"] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    save_file(quantized, mxfp4 / "model.safetensors", metadata={"format": "pt"})
    save_file(dequantized, reference / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((mxfp4 / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4",  # as gpt-oss-20b's config.json says
                                     "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                                "model.embed_tokens", "lm_head"]}
    (mxfp4 / "config.json").write_text(json.dumps(config))
    return mxfp4, reference


@pytest.fixture(scope="module")
def store(checkpoints, tmp_path_factory):
    from coordinator.tools.pack import pack_checkpoint

    out = tmp_path_factory.mktemp("mxfp4-store") / "store"
    pack_checkpoint(model_dir=checkpoints[0], out=out, expert_bits=4, progress=False)
    return out


@pytest.fixture(scope="module")
def reference(checkpoints):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoints[1], dtype=torch.float32, attn_implementation="eager")
    model.generation_config.eos_token_id = None  # 16 tokens, as ours with stop_at_eos=False
    return model.eval()


@pytest.fixture(scope="module")
def prompt_ids():
    return torch.randint(3, 300, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(1234))


def expert_weights(store, layer: int, expert: int):
    from common.expert_id import ExpertId
    from common.store.reader import ExpertStore

    reader = ExpertStore(store)
    return reader.layout.views(reader.expert_blob(ExpertId(layer, expert)))


def test_dequantize_equals_transformers_reading_of_the_same_blocks():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 8, 2, 16), dtype=torch.uint8, generator=generator)  # [E, O, I/32, 16]
    scales = torch.randint(100, 150, (3, 8, 2), dtype=torch.uint8, generator=generator)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, I, O]
    for expert in range(3):
        ours = Mxfp4Matrix(blocks[expert].reshape(8, 32), scales[expert]).dequantize(torch.float32)
        assert torch.equal(ours, theirs[expert].t())


def test_pack_keeps_the_experts_as_stored_at_4_25_bits_per_weight(checkpoints, store):
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["quantization"]["experts"] == {"bits": 4, "group_size": 32, "format": "mxfp4"}
    layout = manifest["blob_layout"]
    sizes = {t["name"]: t["shape"] for t in layout["tensors"]}
    assert sizes == {"w13.codes": [64, 32], "w13.scales": [64, 2], "w13.bias": [64],
                     "w2.codes": [64, 16], "w2.scales": [64, 1], "w2.bias": [64]}
    matrix_bytes = sum(shape[0] * shape[1] for name, shape in sizes.items() if not name.endswith("bias"))
    assert matrix_bytes * 8 / (2 * 32 * 64 + 64 * 32) == 4.25
    weights = load_file(checkpoints[0] / "model.safetensors")
    expert = expert_weights(store, 1, 3)
    prefix = EXPERTS.format(layer=1)
    gate_up, down = weights[f"{prefix}.gate_up_proj_blocks"][3], weights[f"{prefix}.down_proj_blocks"][3]
    assert torch.equal(expert.w13.codes, torch.cat([gate_up[0::2], gate_up[1::2]]).reshape(64, 32))  # rows moved, bytes kept
    assert torch.equal(expert.w2.codes, down.reshape(64, 16))
    scales = weights[f"{prefix}.gate_up_proj_scales"][3]
    assert torch.equal(expert.w13.scales, torch.cat([scales[0::2], scales[1::2]]))


@torch.inference_mode()
def test_logits_match_transformers_on_the_dequantized_checkpoint(store, reference, prompt_ids):
    with Engine.open(store, cache_experts=2) as engine:
        kv = KVCache(engine.config, PROMPT_TOKENS + DECODE_STEPS, torch.device("cpu"), torch.float32)
        ours = engine.model.forward(prompt_ids, 0, kv, all_logits=True)
        theirs = reference(prompt_ids[None], use_cache=True)
        assert (ours - theirs.logits[0]).abs().max().item() < 1e-4
        past, token, position = theirs.past_key_values, int(theirs.logits[0, -1].argmax()), PROMPT_TOKENS
        for _ in range(DECODE_STEPS):
            ours = engine._decode_step(token, position, kv)
            theirs = reference(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            assert (ours[0] - theirs.logits[0, -1]).abs().max().item() < 1e-4
            past, token, position = theirs.past_key_values, int(theirs.logits[0, -1].argmax()), position + 1


@pytest.mark.parametrize("options", [dict(cache_experts=1), dict(cache_experts=8), dict(cache_experts=2, placement="run")],
                         ids=["K=1", "all-cached", "misses-run-on-the-cpu"])
def test_greedy_tokens_equal_transformers_generate(store, reference, prompt_ids, options):
    with torch.inference_mode():
        expected = reference.generate(prompt_ids[None], do_sample=False, max_new_tokens=DECODE_STEPS)[0, PROMPT_TOKENS:]
    with Engine.open(store, **options) as engine:
        generation = engine.generate(prompt_ids.tolist(), max_new_tokens=DECODE_STEPS, stop_at_eos=False)
        list(generation)
    assert generation.token_ids == expected.tolist()


def test_the_cpu_executor_on_an_mxfp4_blob_equals_expert_forward(store):
    from common.cpu_executor import CpuExpert
    from common.expert_ffn import expert_forward
    weights = expert_weights(store, 2, 5)
    x = torch.randn(3, SIZES["hidden_size"], generator=torch.Generator().manual_seed(0))
    assert isinstance(weights.w13, Mxfp4Matrix)
    assert torch.allclose(CpuExpert(weights, dtype=torch.float32)(x), expert_forward(x, weights), atol=1e-5, rtol=0)


def test_hqq_stores_write_no_format_so_their_manifests_and_model_ids_are_unchanged():
    from common.quantization import QuantSpec

    assert QuantSpec(4, 64).to_dict() == {"bits": 4, "group_size": 64}
    assert QuantSpec.mxfp4().to_dict() == {"bits": 4, "group_size": 32, "format": "mxfp4"}


def test_a_manifest_whose_mxfp4_layout_names_hqq_tensors_is_refused(store, tmp_path):
    from common.errors import StoreError
    from common.store.manifest import Manifest

    copy = shutil.copytree(store, tmp_path / "store")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["blob_layout"]["tensors"][1]["name"] = "w13.scale"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="an MXFP4 expert has"):
        Manifest.read(copy)
