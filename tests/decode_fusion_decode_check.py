"""The fused decode step's wiring (decoder.py, moe.py's route) off a GPU: the decoder is made to
take kernels/decode_fusion.py on the CPU, the kernels run in Triton's interpreter
(TRITON_INTERPRET=1), and a greedy decode from a fixed prompt must give the torch ops' tokens,
its logits close to theirs. Run by tests/test_decode_fusion.py as `python -m
tests.decode_fusion_decode_check STORE DTYPE`; prints one line per path (resident, per-layer,
resident with the router kernel declining) and exits non-zero on a miss. Not collected by pytest (no test_ prefix).

`python -m tests.decode_fusion_decode_check STORE DTYPE slots` (a store whose experts take the
slot kernels, e.g. 4-bit HQQ): the slot kernels (kernels/slot_experts.py) forced on the CPU too,
through a stand-in for the fused quantized linear, resident and per-layer (the offloaded per-count
slot path). On the resident path: with today's glue around them (SlotExperts declining
prepared input: the copy, the sums, out.add_) and with the fused glue (the MoE norm writing
x and x_sums, the next add + norm summing the w2 partials), both giving the torch ops' tokens;
the fused glue's logits close to today's glue's, and the per-layer graphs' (the phase clock's
path) equal to the whole token's."""

import sys

import torch

from coordinator.runtime import decoder as decoder_module
from coordinator.runtime.decoder import Decoder
from coordinator.runtime.engine import Engine
from coordinator.runtime.kernels import decode_fusion
from tests.greedy_decode import greedy_steps

STEPS = 6


class _Clock:
    """Stands in for a PhaseClock: the resident step then runs its per-layer graphs."""

    def mark(self, phase: str) -> None:
        pass


def decode(engine: Engine, *, resident_path: bool, clock: bool = False) -> tuple[list[int], torch.Tensor, Decoder]:
    """Greedy steps from a fixed prompt through a fresh decoder: (tokens, logits [STEPS, V], decoder).
    clock: the decoder's phase clock set (resident: the per-layer graphs in place of the token's)."""
    def make(kv):
        decoder = Decoder(engine.model, kv, cuda_graphs=False, resident_path=resident_path)
        decoder.clock = _Clock() if clock else None
        return decoder

    run = greedy_steps(engine, STEPS, decoder=make)
    return run.tokens, run.logits, run.decoder


def main(store: str, dtype: str) -> int:
    failures = 0
    with Engine.open(store, cache_experts=2, dtype=dtype) as engine, torch.inference_mode():
        engine.use_cache_mode("resident")
        # the last: the router kernel declining (as for a router with biases), route's torch ops fill in_order
        for resident_path, router_kernel in ((True, True), (False, True), (True, False)):
            want, plain, decoder = decode(engine, resident_path=resident_path)
            assert decoder.fusion is None  # the CPU's own decode never fuses
            own, fits = decoder_module._decode_fusion, decode_fusion.router_fits
            decoder_module._decode_fusion = lambda device: decode_fusion  # as on CUDA with Triton
            if not router_kernel:
                decode_fusion.router_fits = lambda *args: False
            try:
                tokens, fused, decoder = decode(engine, resident_path=resident_path)
            finally:
                decoder_module._decode_fusion, decode_fusion.router_fits = own, fits
            assert decoder.fusion is decode_fusion and decoder.resident == resident_path
            error = ((fused - plain).abs().max() / plain.abs().max()).item()
            ok = tokens == want and error < (1e-5 if dtype == "float32" else 5e-2)
            failures += not ok
            print(f"{dtype} {'resident' if resident_path else 'per-layer'}"
                  f"{'' if router_kernel else ', torch router'}: tokens {tokens} "
                  f"{'==' if tokens == want else '!='} {want}, logits max rel err {error:.1e} {'ok' if ok else 'FAIL'}")
    return 1 if failures else 0


def _fused_linear(linear):
    """The quantized linear as the decoder sees the fused one (its `fused` cue), same numbers."""
    def fused(x, weight):
        return linear(x, weight)
    fused.fused = True
    return fused


def main_slots(store: str, dtype: str) -> int:
    from coordinator.runtime.kernels import slot_experts

    failures = 0
    with Engine.open(store, cache_experts=2, dtype=dtype) as engine, torch.inference_mode():
        engine.use_cache_mode("resident")
        moe = engine.model.moe
        own = decoder_module._decode_fusion, decoder_module.slot_experts_for, moe.quantized_linear
        prepared = slot_experts.SlotExperts.takes_prepared_input
        loose = 1e-5 if dtype == "float32" else 5e-2

        def forced(device, layout, top_k, model_dtype):
            return slot_experts.SlotExperts(layout, top_k, device, model_dtype) if slot_experts.supports(layout) else None

        for resident_path in (True, False):
            want, plain, decoder = decode(engine, resident_path=resident_path)
            assert decoder.fusion is None
            decoder_module._decode_fusion = lambda device: decode_fusion
            decoder_module.slot_experts_for = forced
            moe.quantized_linear = _fused_linear(own[2])
            runs = {}
            try:
                for name, glue, clock in (("today's glue", False, False), ("fused glue", True, False),
                                          ("fused glue, per-layer graphs", True, True)):
                    if not resident_path and (glue is False or clock):
                        continue  # the per-layer path has no resident glue to compare
                    slot_experts.SlotExperts.takes_prepared_input = property(lambda self, g=glue: g and prepared.fget(self))
                    tokens, logits, decoder = decode(engine, resident_path=resident_path, clock=clock)
                    runs[name] = tokens, logits
                    if resident_path:
                        assert decoder.slot_experts is not None and decoder.glue_fused == glue, "slot kernels not taken"
                    else:
                        assert decoder.counted_slot_experts is not None, "slot kernels not taken"
                    error = ((logits - plain).abs().max() / plain.abs().max()).item()
                    ok = tokens == want and error < 5e-2  # the slot kernels' float32 sums, not dequantize + matmul
                    line = f"tokens {tokens} {'==' if tokens == want else '!='} {want}, logits max rel err {error:.1e}"
                    if name == "fused glue" and resident_path:
                        base = runs["today's glue"][1]
                        glue_error = ((logits - base).abs().max() / base.abs().max()).item()
                        ok = ok and glue_error < loose
                        line += f", against today's glue {glue_error:.1e}"
                    if clock:
                        same = torch.equal(logits, runs["fused glue"][1])
                        ok = ok and same
                        line += f", {'equal to' if same else 'DIFFERS from'} the token graph's"
                    failures += not ok
                    print(f"{dtype} slot kernels {'resident' if resident_path else 'per-layer'}, {name}: {line} "
                          f"{'ok' if ok else 'FAIL'}")
            finally:
                decoder_module._decode_fusion, decoder_module.slot_experts_for, moe.quantized_linear = own
                slot_experts.SlotExperts.takes_prepared_input = prepared
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[3] == "slots":
        sys.exit(main_slots(sys.argv[1], sys.argv[2]))
    sys.exit(main(sys.argv[1], sys.argv[2]))
