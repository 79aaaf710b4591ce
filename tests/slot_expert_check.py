"""Checks the in-place slot expert kernels (kernels/slot_experts.py) against float64 math on the
dequantized weights, for random blobs in a [K, nbytes] slot memory and a device tensor of slot
indices; run by tests/test_resident_decode.py on the GPU or (TRITON_INTERPRET=1) on the CPU.
Prints the seed first (rerun: `python -m tests.slot_expert_check DEVICE SEED`), then one line per
case (each kernel variant: slot_experts.VARIANTS, v4 included: "v4->v1" where it runs v1, float32 and
4-bit; on the CPU its plain-Triton path, the interpreter having no inline asm, so its PTX path is
checked only on the GPU), and exits non-zero on a miss. Where v1 sums its hidden activations in
the w13 epilogue (sums_in_kernel), those sums within 1e-6 of the sum of |values| per 16 of
torch.sum's over the stored hidden_act; and gate_up_prepared from x and x_sums as
decode_fusion.add_rms_norm writes them gives gate_up's hidden_act: bit for bit where its x_sums
equal torch.sum's (bf16 inputs: their 16-value sums are exact in float32 in almost any order),
else the expert step from it within the same bound of float64's (float32 inputs: the sums' order
differs, and the exponent trick scales an ulp of a sum by up to 2**(W*(k+1)), as it scales torch's). Not collected by pytest (no test_ prefix)."""

import sys

import torch
import torch.nn.functional as F

from common.model_config import ModelConfig
from common.quantization import QuantSpec
from common.store.blob_layout import BlobLayout
from coordinator.runtime.kernels import slot_experts
from tests.check_seed import device_and_seed, seeded

BOUND = {torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 3e-2}  # relative L2 error: two matrices, rounded between
# (hidden, ffn): the second has several steps per row and rows that need two row blocks; the
# last, w13 rows of several groups per plane, so that v3's default shares each row between threads
SHAPES = {"cuda": [(128, 256), (256, 512), (512, 1024), (1024, 256)], "cpu": [(128, 256), (256, 512), (1024, 256)]}
SLOTS = 4


def layout_for(hidden: int, ffn: int, bits: int) -> BlobLayout:
    config = ModelConfig(vocab_size=16, hidden_size=hidden, intermediate_size=ffn, num_layers=1, num_heads=1,
                         num_kv_heads=1, head_dim=hidden, num_experts=SLOTS, top_k=2, rms_norm_eps=1e-5,
                         rope_theta=1e4, max_position_embeddings=8, sliding_window=None,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    return BlobLayout.for_expert(config, QuantSpec(bits, 64), torch.float16)


def random_memory(layout: BlobLayout, generator: torch.Generator) -> torch.Tensor:
    """[SLOTS, nbytes]: random codes, scales and zeros in their ranges."""
    blobs = []
    for _ in range(SLOTS):
        tensors = {}
        for slot in layout.slots:
            if slot.dtype == "uint8":
                tensors[slot.name] = torch.randint(0, 256, slot.shape, dtype=torch.uint8, generator=generator)
            elif slot.name.endswith("scale"):
                tensors[slot.name] = (torch.rand(slot.shape, generator=generator) * 0.02).half()
            else:
                tensors[slot.name] = (torch.rand(slot.shape, generator=generator) * (2**layout.spec.bits - 1)).half()
        blobs.append(layout.pack(tensors))
    return torch.stack(blobs)


def reference(layout, memory, x, slots, weights) -> torch.Tensor:
    out = torch.zeros(x.shape, dtype=torch.float64)
    for position, slot in enumerate(slots.tolist()):
        expert = layout.views(memory[slot].cpu())
        gate_up = x.double().cpu() @ expert.w13.dequantize(torch.float32).double().T
        gate, up = gate_up.chunk(2, dim=-1)
        out += weights[0, position].item() * ((F.silu(gate) * up) @ expert.w2.dequantize(torch.float32).double().T)
    return out


def main(device: str, seed: int) -> int:
    generator = seeded("tests.slot_expert_check", device, seed)
    failures = 0
    dtypes = [torch.float32] + ([torch.float16, torch.bfloat16] if device == "cuda" else [torch.bfloat16])
    for bits in (2, 4):
        for hidden, ffn in SHAPES[device]:
            layout = layout_for(hidden, ffn, bits)
            if not slot_experts.supports(layout):
                continue
            memory = random_memory(layout, generator).to(device)
            for dtype in dtypes:
                x = torch.randn(1, hidden, generator=generator).to(device=device, dtype=dtype)
                slots = torch.randperm(SLOTS, generator=generator)[:2].to(device)
                weights = torch.rand(1, 2, generator=generator).to(device)
                want = reference(layout, memory, x, slots, weights)
                for variant in slot_experts.VARIANTS:
                    run = slot_experts.SlotExperts(layout, 2, torch.device(device), dtype, variant)
                    label = variant if run.variant == variant else f"{variant}->{run.variant}"
                    if run.variant == "v4":
                        label += " asm" if run.v4_asm else " plain"
                        assert device == "cuda" or not run.v4_asm, "the interpreter cannot run v4's PTX path"
                    out = torch.zeros((1, hidden), dtype=dtype, device=device)
                    run(x, memory, slots, weights, out)
                    error = ((out.double().cpu() - want).norm() / want.norm()).item()
                    ok = error < BOUND[dtype] and not torch.isnan(out).any()
                    if run.sums_in_kernel:
                        stored = run.hidden_act.view(2, -1, slot_experts.CHUNK)
                        bound = 1e-6 * stored.abs().sum(2)
                        sums_ok = bool(((run.hidden_sums - stored.sum(2)).abs() <= bound).all())
                        ok &= sums_ok
                        label += " (sums in kernel" + ("" if sums_ok else ": OFF") + ")"
                    if run.takes_prepared_input:
                        hidden_act = run.hidden_act.clone()
                        run.hidden_act.fill_(float("nan"))
                        run.x.fill_(float("nan"))
                        run.x_sums.fill_(float("nan"))
                        from coordinator.runtime.kernels import decode_fusion
                        unit = torch.ones(hidden, dtype=dtype, device=device)  # rms_norm of x_n with unit weight: x_n
                        normed = torch.empty_like(x)
                        decode_fusion.add_rms_norm(x, None, unit, 1e-5, None, normed, run.x, run.x_sums)
                        norm_sums = run.x_sums.clone()
                        run.gate_up(normed, memory, slots)
                        again, torch_sums = run.hidden_act.clone(), run.x_sums.clone()
                        run.hidden_act.fill_(float("nan"))
                        decode_fusion.add_rms_norm(x, None, unit, 1e-5, None, normed, run.x, run.x_sums)
                        run.gate_up_prepared(memory, slots)
                        if torch.equal(norm_sums, torch_sums):
                            prepared_ok = torch.equal(run.hidden_act, again)
                        else:
                            out2 = torch.zeros((1, hidden), dtype=dtype, device=device)
                            run.down(memory, slots, weights, out2)
                            want2 = reference(layout, memory, normed, slots, weights)
                            prepared_ok = ((out2.double().cpu() - want2).norm() / want2.norm()).item() < BOUND[dtype]
                        prepared_ok = prepared_ok and not torch.isnan(run.hidden_act).any().item()
                        ok &= prepared_ok
                        label += "" if prepared_ok else " (prepared input DIFFERS)"
                    failures += not ok
                    print(f"{label} bits={bits} hidden={hidden} ffn={ffn} {str(dtype):>14} rel err {error:.2e} "
                          f"{'ok' if ok else 'FAIL'}")
    return 1 if failures else 0


if __name__ == "__main__":
    device, seed = device_and_seed()
    sys.exit(main(device, seed))
