"""Our packed-code layout round-trips and dequantizes to what HQQ itself reconstructs."""

import pytest
import torch

from common.model_config import ModelConfig
from common.quantization import QuantizedMatrix, QuantSpec, bit_planes, pack_plane, quantize_matrix, unpack_plane
from common.store.blob_layout import ALIGN, BlobLayout
from common.errors import ConfigError


@pytest.mark.parametrize("width", [4, 2, 1])
def test_bit_planes_round_trip(width):
    codes = torch.randint(0, 2**width, (7, 64), dtype=torch.uint8)
    assert torch.equal(unpack_plane(pack_plane(codes, width), width), codes)


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_dequantize_equals_hqq_reconstruction(bits):
    from hqq.core.quantize import Quantizer

    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(bits)) * 0.02
    ours = quantize_matrix(weight, QuantSpec(bits, 32))
    codes, meta = Quantizer.quantize(weight, nbits=bits, group_size=32, axis=1, bitpack=False,
                                     optimize=True, compute_dtype=torch.float32, device="cpu")
    hqq = ((codes - meta["zero"]) * meta["scale"]).view(48, 128)
    assert torch.equal(ours.codes(), codes.view(48, 128).to(torch.uint8))
    # ours keeps scale and zero in fp16: the only difference is that rounding
    assert (ours.dequantize(torch.float32) - hqq).abs().max() < 2e-3 * weight.abs().max()
    assert len(ours.planes) == len(bit_planes(bits))


def test_group_size_must_divide_the_input_width():
    with pytest.raises(ConfigError, match="group-size"):
        QuantSpec(4, 48).check_fits(64, what="w2")
    with pytest.raises(ConfigError, match="multiple of 8"):
        QuantSpec(4, 12)


@pytest.mark.parametrize("bits", [16, 4, 3, 2])
def test_blob_layout_views_give_back_the_packed_tensors(bits):
    config = ModelConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                         num_kv_heads=2, head_dim=16, num_experts=2, top_k=1, rms_norm_eps=1e-5,
                         rope_theta=1e4, max_position_embeddings=64, sliding_window=None,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    spec = QuantSpec(bits, 32)
    layout = BlobLayout.for_expert(config, spec, torch.float32)
    w13 = torch.randn(256, 64)
    w2 = torch.randn(64, 128)
    if spec.quantized:
        tensors = {**quantize_matrix(w13, spec).tensors("w13"), **quantize_matrix(w2, spec).tensors("w2")}
    else:
        tensors = {"w13.weight": w13, "w2.weight": w2}
    blob = layout.pack(tensors)
    assert blob.numel() == layout.nbytes and layout.nbytes % ALIGN == 0
    views = layout.views(blob)
    for name, matrix in (("w13", views.w13), ("w2", views.w2)):
        if isinstance(matrix, QuantizedMatrix):
            assert torch.equal(matrix.scale, tensors[f"{name}.scale"])
            assert torch.equal(matrix.planes[0], tensors[f"{name}.codes.p0"])
        else:
            assert torch.equal(matrix, tensors[f"{name}.weight"])
            assert matrix.data_ptr() == blob.data_ptr() + next(s.offset for s in layout.slots if s.name == f"{name}.weight")
    assert BlobLayout.from_dict(layout.to_dict()) == layout
