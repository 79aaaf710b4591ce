"""The native CPU kernel (common/cpu_kernels/hqq_matmul.cpp, through common/cpu_executor.py's
NativeMatrix) gives what the dequantized reference matmul gives, within fp32 rounding: 2, 3 and
4-bit codes, groups of 64 and 128, widths that are not whole 32-byte units of codes, 1 to 16
tokens, fp32 and bf16 activations, and in each instruction set a build can choose (AVX-512 with
and without AVX512-BF16, AVX2, plain C++); x as one or two int8 digits (AVX512-VNNI) gives the
matmul of x so rounded, which is what its bound says. MOE_EDGE_CPU_KERNEL and a failed build pick
torch's int4pack path instead."""

import logging

import pytest
import torch

from common import cpu_kernels
from common.cpu_executor import PlainMatrix, CpuExpert, Int4Matrix, NativeMatrix
from common.errors import ConfigError
from common.quantization import QuantizedMatrix, QuantSpec, quantized_shapes
from common.store.blob_layout import ExpertWeights

# [O, I]: odd rows; widths of 2, 5 and 7 groups of 64 (not whole 128 or 64-column units)
SHAPES = [(7, 128), (33, 320), (40, 448), (130, 1024)]
BOUND = 2e-6  # largest |error| / largest |output|: fp32 sums in another order


def random_matrix(out_features: int, in_features: int, spec: QuantSpec, seed: int) -> QuantizedMatrix:
    generator = torch.Generator().manual_seed(seed)
    shapes = quantized_shapes(out_features, in_features, spec)
    planes = tuple(torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
                   for name, (_, shape) in shapes.items() if name.startswith("codes"))
    groups = shapes["scale"][1]
    scale = (0.01 * (0.5 + torch.rand(groups, generator=generator))).half()
    zero = ((2**spec.bits - 1) * torch.rand(groups, generator=generator)).half()
    return QuantizedMatrix(planes, scale, zero, spec.bits, spec.group_size)


def relative_error(matrix: NativeMatrix, weight: torch.Tensor, x: torch.Tensor) -> float:
    reference = x.double() @ weight.T  # the dequantized weight, float64
    return ((matrix(x).double() - reference).abs().max() / reference.abs().max()).item()


@pytest.fixture(scope="module")
def library():
    library = cpu_kernels.native_library("native")
    assert library is not None
    return library


@pytest.mark.parametrize("bits,group_size,shape", [(bits, group_size, shape) for bits in (2, 3, 4) for group_size in (64, 128)
                                                    for shape in SHAPES if shape[1] % group_size == 0])
def test_the_native_kernel_equals_the_dequantized_matmul(library, bits, group_size, shape):
    quantized = random_matrix(*shape, QuantSpec(bits, group_size), seed=bits * 1000 + shape[1])
    weight = quantized.dequantize(torch.float64)
    matrix = NativeMatrix(quantized, torch.float32, library)
    for tokens in (1, 3, 16):
        for dtype in (torch.float32, torch.bfloat16):  # bf16 x is widened exactly, not rounded again
            x = torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(tokens)).to(dtype)
            assert relative_error(matrix, weight, x) < BOUND, (tokens, dtype)


# -mno-avx512bf16: AVX-512 that multiplies bf16 x in fp32, as on a CPU without vdpbf16ps
@pytest.mark.parametrize("extra_flags", [("-mno-avx512bf16",), ("-mno-avx512f",), ("-mno-avx512f", "-mno-avx2", "-mno-fma")],
                         ids=["avx512-fp32", "avx2", "plain"])
def test_every_instruction_set_gives_the_same_products(tmp_path, monkeypatch, extra_flags):
    monkeypatch.setenv("MOE_EDGE_CACHE_DIR", str(tmp_path))
    library = cpu_kernels.open_library(cpu_kernels.build(cpu_kernels.compiler(), cpu_kernels.FLAGS + extra_flags))
    for bits, shape in ((2, (33, 320)), (4, (40, 448)), (3, (7, 128))):
        quantized = random_matrix(*shape, QuantSpec(bits, 64), seed=bits)
        weight = quantized.dequantize(torch.float64)
        matrix = NativeMatrix(quantized, torch.float32, library)
        for tokens in (1, 5, 9):
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(tokens)).to(dtype)
                assert relative_error(matrix, weight, x) < BOUND, (bits, tokens, dtype)


def test_the_products_do_not_depend_on_the_threads_or_their_schedule(library):
    """Each output row is one thread's, summed in one order: bit for bit the same on 1 or 3
    threads, each with a fixed share (0) or taking 1 or 4 tiles at a time."""
    for bits, dtype in ((2, torch.bfloat16), (4, torch.float32)):
        matrix = NativeMatrix(random_matrix(130, 1024, QuantSpec(bits, 64), seed=bits), torch.float32, library)
        x = torch.randn(5, 1024, generator=torch.Generator().manual_seed(bits)).to(dtype)
        outputs = []
        for threads in (1, 3):
            for tiles_per_take in (0, 1, 4):
                y = torch.empty(5, 130)
                assert library.hqq_matmul(matrix.codes.data_ptr(), matrix.scale.data_ptr(), matrix.zero.data_ptr(), bits,
                                          64, 130, 1024, x.data_ptr(), int(dtype == torch.bfloat16), 5, y.data_ptr(),
                                          threads, tiles_per_take, 0) == 0
                outputs.append(y)
        assert all(torch.equal(outputs[0], y) for y in outputs[1:]), bits


def x_in_digits(x: torch.Tensor, digits: int, group_size: int = 64) -> torch.Tensor:
    """x rounded as hqq_matmul.cpp's to_digits rounds it (float32 steps, ties to even), float64."""
    x = x.float().view(x.shape[0], -1, group_size)  # [T, G, g]
    largest = x.abs().amax(-1, keepdim=True)
    scale = largest / 127
    # a division, as in C++ (127 / tensor is torch's reciprocal times 127: rounded twice)
    inverse = torch.where(largest > 0, torch.full_like(largest, 127) / largest, torch.zeros_like(largest))
    v = (x * inverse).clamp(-127, 127)
    hi = torch.round(v)
    lo = torch.round((v - hi) * 254).clamp(-127, 127) if digits == 2 else torch.zeros_like(v)
    return (scale.double() * (hi.double() + lo.double() / 254)).view(x.shape[0], -1)


def has_vnni() -> bool:
    library = cpu_kernels.native_library("auto")
    return library is not None and bool(library.hqq_int8_products())


needs_vnni = pytest.mark.skipif(not has_vnni(), reason="x as int8 digits needs AVX512-VNNI")


@needs_vnni
@pytest.mark.parametrize("digits", [1, 2])
@pytest.mark.parametrize("bits,shape", [(2, (33, 320)), (3, (7, 128)), (4, (130, 1024))])
def test_x_as_int8_digits_gives_the_matmul_of_x_so_rounded(library, bits, shape, digits):
    """MOE_EDGE_CPU_X_DIGITS: x rounded per group to one or two int8 digits of its largest |x| /
    127, then the same products within fp32 rounding; the rounding itself within |x|max / 254
    (one digit: about 5x bf16's in a product) or / 64516 (two)."""
    quantized = random_matrix(*shape, QuantSpec(bits, 64), seed=bits)
    weight = quantized.dequantize(torch.float64)
    matrix = NativeMatrix(quantized, torch.float32, library, x_digits=digits)  # fp32 out: the sums themselves
    step = 1 / (254 if digits == 1 else 64516) + 2**-22  # of |x|max: the digits' rounding, + x / sx's in fp32
    for tokens in (1, 5, 9):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(tokens)).to(dtype)
            rounded = x_in_digits(x, digits)
            largest = x.double().abs().view(tokens, -1, 64).amax(-1, keepdim=True)
            assert ((rounded - x.double()).view(tokens, -1, 64).abs() <= largest * step).all()
            reference = rounded @ weight.T
            error = ((matrix(x).double() - reference).abs().max() / reference.abs().max()).item()
            assert error < BOUND, (tokens, dtype, error)


@needs_vnni
def test_int8_digits_do_not_depend_on_the_threads_either(library):
    matrix = NativeMatrix(random_matrix(130, 1024, QuantSpec(2, 64), seed=5), torch.float32, library, x_digits=2)
    x = torch.randn(5, 1024, generator=torch.Generator().manual_seed(5)).bfloat16()
    outputs = []
    for threads in (1, 3):
        for tiles_per_take in (0, 1):
            matrix.threads, matrix.tiles_per_take = threads, tiles_per_take
            outputs.append(matrix(x))
    assert all(torch.equal(outputs[0], y) for y in outputs[1:])


def test_int8_digits_are_refused_where_the_build_has_no_vnni(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_EDGE_CACHE_DIR", str(tmp_path))
    library = cpu_kernels.open_library(cpu_kernels.build(cpu_kernels.compiler(), cpu_kernels.FLAGS + ("-mno-avx512vnni",)))
    assert library.hqq_int8_products() == 0
    quantized = random_matrix(33, 320, QuantSpec(2, 64), seed=1)
    with pytest.raises(ConfigError, match="AVX512-VNNI"):
        NativeMatrix(quantized, torch.bfloat16, library, x_digits=1)
    monkeypatch.setenv("MOE_EDGE_CPU_X_DIGITS", "2")
    with pytest.raises(ConfigError, match="MOE_EDGE_CPU_X_DIGITS=2"):
        NativeMatrix(quantized, torch.bfloat16, library)
    monkeypatch.delenv("MOE_EDGE_CPU_X_DIGITS")
    assert NativeMatrix(quantized, torch.bfloat16, library).x_digits == 0  # the default here: x as given
    y = torch.empty(1, 33)
    x = torch.randn(1, 320)
    assert library.hqq_matmul(0, 0, 0, 2, 64, 33, 320, x.data_ptr(), 0, 1, y.data_ptr(), 1, 0, 1) == -1


@needs_vnni
def test_by_default_a_bf16_expert_takes_two_digits_where_the_cpu_has_vnni(tmp_path, monkeypatch, library):
    """Without AVX512-BF16 x as given goes through fp32 products, slower than two digits; with
    it through vdpbf16ps, which two digits beat on the GPU machine's Xeon and matched on a Zen 4."""
    monkeypatch.delenv("MOE_EDGE_CPU_X_DIGITS", raising=False)
    monkeypatch.setenv("MOE_EDGE_CACHE_DIR", str(tmp_path))
    without_bf16 = cpu_kernels.open_library(cpu_kernels.build(cpu_kernels.compiler(),
                                                              cpu_kernels.FLAGS + ("-mno-avx512bf16",)))
    quantized = random_matrix(33, 320, QuantSpec(2, 64), seed=1)
    assert NativeMatrix(quantized, torch.bfloat16, without_bf16).x_digits == 2
    assert NativeMatrix(quantized, torch.float32, without_bf16).x_digits == 0  # fp32 experts: exact
    assert NativeMatrix(quantized, torch.bfloat16, library).x_digits == 2
    monkeypatch.setenv("MOE_EDGE_CPU_X_DIGITS", "0")
    assert NativeMatrix(quantized, torch.bfloat16, without_bf16).x_digits == 0


def test_a_bad_x_digits_setting_is_named(monkeypatch, library):
    monkeypatch.setenv("MOE_EDGE_CPU_X_DIGITS", "3")
    with pytest.raises(ConfigError, match="MOE_EDGE_CPU_X_DIGITS='3'"):
        NativeMatrix(random_matrix(33, 320, QuantSpec(2, 64), seed=1), torch.bfloat16, library)


def test_a_2_bit_matrix_keeps_its_codes_at_2_bits(library):
    quantized = random_matrix(64, 1024, QuantSpec(2, 64), seed=0)
    matrix = NativeMatrix(quantized, torch.bfloat16, library)
    assert matrix.codes.numel() == 64 * 1024 // 4
    assert matrix.nbytes == 64 * 1024 // 4 + 2 * 2 * 64 * 1024 // 64



@pytest.fixture
def fresh_choice():
    cpu_kernels.forget_library()
    yield
    cpu_kernels.forget_library()


def test_the_environment_variable_forces_torch_int4pack(monkeypatch, fresh_choice):
    monkeypatch.setenv("MOE_EDGE_CPU_KERNEL", "int4pack")
    weights = ExpertWeights(w13=random_matrix(256, 128, QuantSpec(2, 64), seed=1), w2=random_matrix(128, 128, QuantSpec(2, 64), seed=2))
    expert = CpuExpert(weights, dtype=torch.float32)
    assert isinstance(expert.w13, Int4Matrix) and isinstance(expert.w2, Int4Matrix)
    monkeypatch.setenv("MOE_EDGE_CPU_KERNEL", "native")
    native = CpuExpert(weights, dtype=torch.float32)
    assert isinstance(native.w13, NativeMatrix) and isinstance(native.w2, NativeMatrix)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(native(x), expert(x), rtol=1e-4, atol=1e-6)


def test_a_failed_build_falls_back_with_one_warning(tmp_path, monkeypatch, caplog, fresh_choice):
    """Auto wants the native kernel; with no compiler a matrix int4pack can run goes there, one it
    cannot (here: groups of 512) is dequantized, after one warning naming the compiler."""
    monkeypatch.setenv("MOE_EDGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.delenv("MOE_EDGE_CPU_KERNEL", raising=False)
    weights = ExpertWeights(w13=random_matrix(256, 512, QuantSpec(2, 512), seed=1), w2=random_matrix(512, 128, QuantSpec(2, 64), seed=2))
    with caplog.at_level(logging.WARNING, logger="common.cpu_kernels"):
        experts = [CpuExpert(weights, dtype=torch.float32) for _ in range(2)]
    assert all(isinstance(e.w13, PlainMatrix) and isinstance(e.w2, Int4Matrix) for e in experts)
    warnings = [r.getMessage() for r in caplog.records if r.name == "common.cpu_kernels"]
    assert len(warnings) == 1 and "no-such-compiler" in warnings[0]
    with pytest.raises(ConfigError, match="native"):
        CpuExpert(weights, dtype=torch.float32, kernel="native")


def test_an_unknown_kernel_name_is_refused(monkeypatch, fresh_choice):
    monkeypatch.setenv("MOE_EDGE_CPU_KERNEL", "fastest")
    with pytest.raises(ConfigError, match="MOE_EDGE_CPU_KERNEL"):
        cpu_kernels.native_library()


def test_auto_runs_the_native_kernel_and_int4pack_on_request(monkeypatch, fresh_choice):
    monkeypatch.delenv("MOE_EDGE_CPU_KERNEL", raising=False)
    for bits in (2, 3, 4):
        weights = ExpertWeights(w13=random_matrix(256, 128, QuantSpec(bits, 64), seed=1),
                                w2=random_matrix(128, 128, QuantSpec(bits, 64), seed=2))
        expert = CpuExpert(weights, dtype=torch.bfloat16)
        assert isinstance(expert.w13, NativeMatrix) and isinstance(expert.w2, NativeMatrix), bits
        assert isinstance(CpuExpert(weights, dtype=torch.bfloat16, kernel="int4pack").w13, Int4Matrix)
    odd_group = ExpertWeights(w13=random_matrix(256, 512, QuantSpec(2, 512), seed=1), w2=random_matrix(512, 128, QuantSpec(2, 64), seed=2))
    int4pack = CpuExpert(odd_group, dtype=torch.bfloat16, kernel="int4pack")
    assert isinstance(int4pack.w13, PlainMatrix) and isinstance(int4pack.w2, Int4Matrix)  # int4pack lacks groups of 512
