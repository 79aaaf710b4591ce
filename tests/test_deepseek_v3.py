"""What the deepseek_v3 family adds beyond tests/test_families.py: latent attention without a q
bottleneck (`q_lora_rank` None, as DeepSeek-V2-Lite) and with rotary on the halves rather than
interleaved pairs matches transformers; the multi-token-prediction layers are left out;
YaRN rope matches transformers; other quantization methods and rope types are refused by name before
anything is written (tests/test_fp8_checkpoints.py reads FP8 block checkpoints)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.errors import ConfigError
from coordinator.runtime.engine import Engine
from coordinator.runtime.model import KVCache
from coordinator.tools.pack import pack_checkpoint

SIZES = dict(vocab_size=512, num_layers=3, hidden_size=64, intermediate_size=32, num_experts=8, top_k=2,
             num_heads=4, num_kv_heads=4)


def make_model(out, **changes):
    """The tiny deepseek_v3 of tools/tiny_model.py with `changes` to its transformers config."""
    from transformers import AutoModelForCausalLM

    from coordinator.tools.tiny_model import _family_config, _spread_routing, build_tokenizer

    config = _family_config("deepseek_v3", **SIZES)
    for name, value in changes.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    _spread_routing(model, 0)
    model.save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("deepseek") / "model")


@torch.inference_mode()
def test_without_a_q_bottleneck_and_with_half_split_rotary_logits_match_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_model(tmp_path / "model", q_lora_rank=None, rope_interleave=False)
    pack_checkpoint(model_dir=model, out=tmp_path / "store", progress=False)
    reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="eager").eval()
    prompt = torch.randint(3, 300, (12,), generator=torch.Generator().manual_seed(7))
    with Engine.open(tmp_path / "store", cache_experts=2) as engine:
        assert engine.config.q_lora_rank is None and not engine.config.rope_interleave
        kv = KVCache(engine.config, 20, torch.device("cpu"), torch.float32)
        ours = engine.model.forward(prompt, 0, kv, all_logits=True)
        theirs = reference(prompt[None], use_cache=True)
        assert (ours - theirs.logits[0]).abs().max().item() < 1e-4
        past, token = theirs.past_key_values, int(theirs.logits[0, -1].argmax())
        for position in range(12, 20):
            ours = engine._decode_step(token, position, kv)
            theirs = reference(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            assert (ours[0] - theirs.logits[0, -1]).abs().max().item() < 1e-4
            past, token = theirs.past_key_values, int(theirs.logits[0, -1].argmax())


YARN = {  # DeepSeek-V3's and R1's config.json (rope_theta beside it)
    "v3": dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, original_max_position_embeddings=4096, beta_fast=32,
               beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
    # mscale and mscale_all_dim apart, so cos and sin are scaled too, not only the softmax
    "mscales-differ": dict(rope_type="yarn", rope_theta=10000.0, factor=16.0, original_max_position_embeddings=256,
                           beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=1.0),
}
PROMPT, STEPS = 24, 16


@pytest.mark.parametrize("settings", YARN)
@torch.inference_mode()
def test_yarn_rope_logits_and_greedy_tokens_match_transformers(tmp_path, settings):
    from transformers import AutoModelForCausalLM

    model = make_model(tmp_path / "model", rope_parameters=dict(YARN[settings]))
    pack_checkpoint(model_dir=model, out=tmp_path / "store", progress=False)
    reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="eager").eval()
    reference.generation_config.eos_token_id = None
    prompt = torch.randint(3, 300, (PROMPT,), generator=torch.Generator().manual_seed(1234))
    with Engine.open(tmp_path / "store", cache_experts=2) as engine:
        assert engine.config.rope_type == "yarn" and engine.config.softmax_scale_factor > 1.0
        kv = KVCache(engine.config, PROMPT + STEPS, torch.device("cpu"), torch.float32)
        ours = engine.model.forward(prompt, 0, kv, all_logits=True)
        theirs = reference(prompt[None], use_cache=True)
        assert (ours - theirs.logits[0]).abs().max().item() < 1e-4
        past, token = theirs.past_key_values, int(theirs.logits[0, -1].argmax())
        for position in range(PROMPT, PROMPT + STEPS):
            ours = engine._decode_step(token, position, kv)
            theirs = reference(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            assert (ours[0] - theirs.logits[0, -1]).abs().max().item() < 1e-4
            past, token = theirs.past_key_values, int(theirs.logits[0, -1].argmax())
        generation = engine.generate(prompt.tolist(), max_new_tokens=STEPS, stop_at_eos=False)
        list(generation)
    expected = reference.generate(prompt[None], do_sample=False, max_new_tokens=STEPS)[0, PROMPT:].tolist()
    assert generation.token_ids == expected


def test_the_yarn_softmax_scale_is_deepseeks_mscale_squared():
    from transformers import DeepseekV3Config

    from coordinator.families import deepseek_v3

    hf = DeepseekV3Config(rope_scaling={**YARN["v3"], "type": "yarn"}, max_position_embeddings=163840).to_dict()
    config = deepseek_v3.model_config(hf)
    assert config.softmax_scale_factor == pytest.approx((0.1 * math.log(40) + 1) ** 2, rel=1e-12)
    assert config.rope_attention_factor == 1.0 and config.rope_factor == 40.0


def test_the_kv_cache_holds_the_latent_and_k_pe_per_position(tiny, tmp_path):
    pack_checkpoint(model_dir=tiny, out=tmp_path / "store", progress=False)
    with Engine.open(tmp_path / "store") as engine:
        kv = KVCache(engine.config, 32, torch.device("cpu"), torch.float32)
    assert kv.keys.shape == (3, 1, 32, 16) and kv.values.shape == (3, 1, 32, 8)  # kv_lora_rank, qk_rope_head_dim


def test_multi_token_prediction_layers_are_left_out(tiny, tmp_path):
    weights = load_file(tiny / "model.safetensors")
    for name in [n for n in weights if n.startswith("model.layers.2.")]:  # an MTP layer is numbered past the last
        weights[name.replace("model.layers.2.", "model.layers.3.")] = weights[name].clone()
    weights["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)
    save_file(weights, tiny.parent / "with-mtp.safetensors", metadata={"format": "pt"})
    model = tmp_path / "model"
    model.mkdir()
    for path in tiny.iterdir():
        if path.name != "model.safetensors":
            (model / path.name).write_bytes(path.read_bytes())
    (tiny.parent / "with-mtp.safetensors").rename(model / "model.safetensors")
    summary = pack_checkpoint(model_dir=model, out=tmp_path / "store", progress=False)
    assert summary is not None and (tmp_path / "store" / "manifest.json").is_file()


def edited_copy(tiny, folder, *, config_changes=None, extra_tensor=None):
    folder.mkdir()
    for path in tiny.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config.update(config_changes or {})
    (folder / "config.json").write_text(json.dumps(config))
    if extra_tensor:
        weights = load_file(folder / "model.safetensors")
        weights[extra_tensor] = torch.ones(1, 1)
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("config_changes,extra_tensor,named", [
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, None,
     "quantization_config.quant_method 'gptq' is not supported"),
    (None, "model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv",  # scales beside a bf16 weight
     "is not used by moe-edge's deepseek_v3 reader"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}}, None,
     "rope_type 'linear' is not supported"),
    ({"attention_bias": True}, None, "attention_bias True is not supported"),
])
def test_other_quantizations_rope_types_and_attention_biases_are_refused_by_name_before_writing(tiny, tmp_path, config_changes, extra_tensor, named):
    model = edited_copy(tiny, tmp_path / "model", config_changes=config_changes, extra_tensor=extra_tensor)
    with pytest.raises(ConfigError, match=named.replace("(", r"\(")) as refusal:
        pack_checkpoint(model_dir=model, out=tmp_path / "store", progress=False)
    assert not (tmp_path / "store").exists()
    if extra_tensor:
        assert extra_tensor in str(refusal.value)
