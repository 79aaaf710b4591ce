"""The fused decode step's wiring (decoder.py, moe.py's route) off a GPU: the decoder is made to
take kernels/decode_fusion.py on the CPU, the kernels run in Triton's interpreter
(TRITON_INTERPRET=1), and a greedy decode from a fixed prompt must give the torch ops' tokens,
its logits close to theirs. Run by tests/test_decode_fusion.py as `python -m
tests.decode_fusion_decode_check STORE DTYPE`; prints one line per path (resident, per-layer,
resident with the router kernel declining) and exits non-zero on a miss. Not collected by pytest (no test_ prefix)."""

import sys

import torch

from coordinator.runtime import decoder as decoder_module
from coordinator.runtime.decoder import Decoder
from coordinator.runtime.engine import Engine
from coordinator.runtime.kernels import decode_fusion
from coordinator.runtime.model import KVCache

STEPS = 6


def decode(engine: Engine, *, resident_path: bool) -> tuple[list[int], torch.Tensor, Decoder]:
    """Greedy steps from a fixed prompt through a fresh decoder: (tokens, logits [STEPS, V], decoder)."""
    prompt = engine.encode("The quick brown fox")
    kv = KVCache(engine.config, 64, torch.device("cpu"), engine.dtype)
    logits = engine._prefill(prompt, kv)
    decoder = Decoder(engine.model, kv, cuda_graphs=False, resident_path=resident_path)
    tokens, steps, position = [], [], len(prompt)
    for _ in range(STEPS):
        tokens.append(int(logits[-1].argmax()))
        logits = decoder.step(tokens[-1], position).clone()
        steps.append(logits[0])
        position += 1
    return tokens, torch.stack(steps), decoder


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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
