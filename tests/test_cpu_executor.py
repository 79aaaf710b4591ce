"""The CPU expert executor (common/cpu_executor.py) gives what the reference expert FFN
(dequantize, then matmul, float32) gives: the native kernel or repacked int4 for 2, 3 and 4-bit
HQQ experts, plain for unquantized ones, in float32 (tight) and bfloat16 (within its rounding).
The native kernel's own checks are in test_cpu_executor_native.py."""

import pytest
import torch

from common.cpu_executor import CpuExpert, Int4Matrix, NativeMatrix, PlainMatrix, run_experts
from common.expert_ffn import expert_forward
from common.expert_id import ExpertId
from common.store.reader import ExpertStore


@pytest.fixture(scope="module")
def store3(tmp_path_factory, tiny_model_dir):
    from coordinator.tools.pack import pack_checkpoint

    out = tmp_path_factory.mktemp("stores") / "store3"
    pack_checkpoint(model_dir=tiny_model_dir, out=out, expert_bits=3, dense_bits=16, progress=False)
    return out


def expert_views(store, eid: ExpertId):
    opened = ExpertStore(store)
    blob = torch.empty(opened.blob_nbytes, dtype=torch.uint8)
    opened.read_blob_into(eid, blob)
    return opened.layout.views(blob)


@pytest.mark.parametrize("store_name,kernel,matrix_type", [
    ("store4", "native", NativeMatrix), ("store3", "native", NativeMatrix), ("store2", "native", NativeMatrix),
    ("store4", "int4pack", Int4Matrix), ("store3", "int4pack", Int4Matrix), ("store2", "int4pack", Int4Matrix),
    ("store16", "native", PlainMatrix)])
# bfloat16: the expert's output and its activation are rounded to bf16; torch's int4pack also keeps the scales
# and the shifted zeros (8 - z) * s in bf16, which costs up to ~3% on these 2-bit tiny experts (float32 shows
# that both paths are exact)
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 4e-2)])
def test_a_cpu_expert_gives_the_reference_ffn_output(request, store_name, kernel, matrix_type, dtype, bound):
    store = request.getfixturevalue(store_name)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(0))
    for eid in (ExpertId(0, 0), ExpertId(2, 5)):
        weights = expert_views(store, eid)
        reference = expert_forward(x, weights)  # float32, dequantize + matmul
        expert = CpuExpert(weights, dtype=dtype, kernel=kernel)
        assert isinstance(expert.w13, matrix_type) and isinstance(expert.w2, matrix_type)
        ours = expert(x).float()
        assert ((ours - reference).norm() / reference.norm()).item() < bound


def test_several_experts_sum_with_their_routing_weights(store4):
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(1))
    experts = [CpuExpert(expert_views(store4, ExpertId(1, e)), dtype=torch.float32) for e in (3, 6)]
    weights = torch.tensor([[0.7, 0.3], [0.2, 0.8]])
    expected = experts[0](x) * weights[:, :1] + experts[1](x) * weights[:, 1:]
    assert torch.allclose(run_experts(x, experts, weights), expected, atol=1e-6)


@pytest.mark.parametrize("kernel", ["native", "int4pack"])
def test_a_4_bit_expert_reads_about_half_a_byte_per_weight(store4, kernel):
    expert = CpuExpert(expert_views(store4, ExpertId(0, 0)), kernel=kernel)
    weights = 3 * 128 * 256
    assert 0.5 * weights <= expert.nbytes <= 0.5 * weights * 1.2


def test_a_2_bit_expert_on_the_native_kernel_reads_about_a_quarter_byte_per_weight(store2):
    expert = CpuExpert(expert_views(store2, ExpertId(0, 0)), kernel="native")
    weights = 3 * 128 * 256
    assert 0.25 * weights <= expert.nbytes <= 0.25 * weights * 1.3  # codes, and 4 bytes per group of 64
