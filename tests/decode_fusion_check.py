"""Checks the decode step's fused kernels (kernels/decode_fusion.py) against today's torch ops,
which stay the reference: torch.add + rms_norm.py, and F.linear + router.route for softmax
routing (+ the resident path's torch.sort and index_select). Run by tests/test_decode_fusion.py
on the GPU or (TRITON_INTERPRET=1) on the CPU. Prints the seed first (rerun: `python -m
tests.decode_fusion_check DEVICE SEED`), then one line per case, and exits non-zero on a miss.
Not collected by pytest (no test_ prefix).

Bounds:
  add + norm   the sum bit-exact (torch.equal); the normed row within two ulps of the dtype of
               rms_norm.py's (float32: 1e-6 relative), elementwise. Only the order of the
               float32 sum of squares differs, but its last bit can move both roundings (the
               normalised row, then its product with the weight): one seed in fp16 at H = 4096
               gave two ulps.
  router       exact inputs (multiples of 1/8 and 1/64, so every logit's float32 sum is exact in
               any order and rounds to the dtype the same way): the experts equal to a stable
               sort's (ties: lowest index first) and to router.route's where the top k+1 have no
               ties, the weights within 1e-6 of router.route's; the sorted outputs equal to
               torch.sort + index_select of those. Random inputs: a logit near a rounding
               boundary of bf16/fp16 may round the other way (the float32 sum's order differs
               from the matmul's), so the weights within 2e-2 relative, the same set of experts
               where the k-th and k+1-th scores are 2e-2 apart; in float32 the logits themselves
               are sums in another order (~1e-7 relative each, times |logit| in the weights): the
               weights within 4e-6, the experts as for exact inputs.
  slot input   add + norm writing also kernels/slot_experts.py's x and x_sums: the normed row
               equal to the plain launch's, x equal to it in float32 (what gate_up's copy gives,
               bit-exact), x_sums within 1e-6 of the sum of |x| per 16 columns of torch.sum's
               (the order of 16 float32 additions; counted exact too).
  partials     b as [R, H] float32 partial sums (the slot kernels' w2 output): the sum within
               float32's summation bound (2 R u times the sum of the magnitudes) plus one ulp of a
               16-bit dtype of torch's a + partial.sum(0).to(dtype) (the order of R float32
               additions), the norm as above of rms_norm.py's on it."""

import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from coordinator.runtime import router as torch_router
from coordinator.runtime.kernels import decode_fusion
from coordinator.runtime.rms_norm import rms_norm
from tests.check_seed import device_and_seed, seeded

HIDDEN = {"cuda": [64, 1000, 4096, 7168, 8192], "cpu": [64, 1000, 4096]}
# (experts, hidden, k): Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE (60 experts, 4 of them), a tiny one
ROUTERS = {"cuda": [(8, 4096, 2), (128, 2048, 8), (64, 2048, 8), (60, 3584, 4), (8, 64, 2)],
           "cpu": [(8, 4096, 2), (128, 2048, 8), (60, 1000, 4), (8, 64, 2)]}
MANTISSA = {torch.bfloat16: 7, torch.float16: 10}
LOOSE = 2e-2  # random bf16/fp16 router inputs: a logit one ulp of the dtype off
FLOAT32_RANDOM = 4e-6  # random float32 router inputs: the logits are float32 sums in another order


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dtype's ulp at each value (float32 tensor of them; normal range)."""
    exponent = torch.floor(torch.log2(values.abs().clamp_min(torch.finfo(dtype).tiny)))
    return torch.exp2(exponent - MANTISSA[dtype])


def check_add_rms_norm(device: str, dtype: torch.dtype, hidden: int, with_b: bool,
                       generator: torch.Generator) -> tuple[bool, str]:
    a = (torch.randn(1, hidden, generator=generator) * 3).to(device=device, dtype=dtype)
    b = torch.randn(1, hidden, generator=generator).to(device=device, dtype=dtype)
    weight = (torch.rand(hidden, generator=generator) * 1.5 + 0.25).to(device=device, dtype=dtype)
    eps = 1e-5
    want_sum = torch.add(a, b) if with_b else a
    want = rms_norm(want_sum, weight, eps)
    got_sum = torch.full_like(a, float("nan"))
    got = torch.full_like(a, float("nan"))
    decode_fusion.add_rms_norm(a, b if with_b else None, weight, eps, got_sum if with_b else None, got)
    sum_ok = torch.equal(got_sum, want_sum) if with_b else True
    diff = (got.float() - want.float()).abs()
    if dtype == torch.float32:
        allowed = 1e-6 * want.abs()
    else:
        allowed = 2 * ulp(torch.maximum(got.float().abs(), want.float().abs()), dtype)
    norm_ok = bool((diff <= allowed).all()) and not torch.isnan(got).any()
    worst = (diff / allowed.clamp_min(1e-30)).max().item()
    return sum_ok and norm_ok, f"sum {'exact' if sum_ok else 'DIFFERS'}, norm worst {worst:.2f} of the bound"


def norm_bound(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> tuple[bool, float]:
    """got within two ulps of the dtype of want (float32: 1e-6 relative), elementwise, as
    check_add_rms_norm's norm; the worst share of it."""
    diff = (got.float() - want.float()).abs()
    if dtype == torch.float32:
        allowed = 1e-6 * want.abs() + 1e-30
    else:
        allowed = 2 * ulp(torch.maximum(got.float().abs(), want.float().abs()), dtype)
    ok = bool((diff <= allowed).all()) and not torch.isnan(got).any()
    return ok, (diff / allowed.clamp_min(1e-30)).max().item()


def check_slot_input(device: str, dtype: torch.dtype, hidden: int, generator: torch.Generator) -> tuple[bool, str]:
    a = (torch.randn(1, hidden, generator=generator) * 3).to(device=device, dtype=dtype)
    b = torch.randn(1, hidden, generator=generator).to(device=device, dtype=dtype)
    weight = (torch.rand(hidden, generator=generator) * 1.5 + 0.25).to(device=device, dtype=dtype)
    plain_sum, plain = torch.empty_like(a), torch.empty_like(a)
    decode_fusion.add_rms_norm(a, b, weight, 1e-5, plain_sum, plain)
    got_sum, got = torch.full_like(a, float("nan")), torch.full_like(a, float("nan"))
    x = torch.full((1, hidden), float("nan"), device=device)
    x_sums = torch.full((hidden // 16,), float("nan"), device=device)
    decode_fusion.add_rms_norm(a, b, weight, 1e-5, got_sum, got, x, x_sums)
    want_x = torch.empty(1, hidden, device=device)
    want_x.copy_(got)  # what SlotExperts.gate_up does with the normed row
    want_sums = torch.sum(want_x.view(-1, 16), dim=1)
    rows_ok = torch.equal(got_sum, plain_sum) and torch.equal(got, plain)
    x_ok = torch.equal(x, want_x)
    bound = 1e-6 * want_x.abs().view(-1, 16).sum(1)
    sums_ok = bool(((x_sums - want_sums).abs() <= bound).all())
    exact = int((x_sums == want_sums).sum())
    ok = rows_ok and x_ok and sums_ok
    return ok, (f"rows {'equal' if rows_ok else 'DIFFER'}, x {'exact' if x_ok else 'DIFFERS'}, "
                f"sums {'ok' if sums_ok else 'OFF'} ({exact}/{hidden // 16} exact)")


def check_partials(device: str, dtype: torch.dtype, hidden: int, parts: int,
                   generator: torch.Generator) -> tuple[bool, str]:
    a = (torch.randn(1, hidden, generator=generator) * 3).to(device=device, dtype=dtype)
    partial = (torch.randn(parts, hidden, generator=generator) * 0.5).to(device)
    weight = (torch.rand(hidden, generator=generator) * 1.5 + 0.25).to(device=device, dtype=dtype)
    out = torch.zeros_like(a)
    out.add_(partial.sum(0, keepdim=True).to(out.dtype))  # today's: SlotExperts.down onto the zeroed out
    want_sum = torch.add(a, out)
    got_sum, got = torch.full_like(a, float("nan")), torch.full_like(a, float("nan"))
    decode_fusion.add_rms_norm(a, partial, weight, 1e-5, got_sum, got, partials=True)
    # The R partials summed in another order than torch's: float32's summation bound (2 R u the
    # sum of the magnitudes, a's included: near-cancelling partials make the result small and the
    # error relative to it large; a seed in float32 gave three ulps of the result), plus one ulp of
    # a 16-bit dtype for the rounding that difference can tip.
    magnitude = partial.abs().sum(0, keepdim=True) + a.float().abs()
    allowed = 2 * parts * 2.0**-24 * magnitude + 1e-30
    if dtype != torch.float32:
        allowed = allowed + ulp(torch.maximum(got_sum.float().abs(), want_sum.float().abs()), dtype)
    sum_diff = (got_sum.float() - want_sum.float()).abs()
    sum_ok = bool((sum_diff <= allowed).all()) and not torch.isnan(got_sum).any()
    sum_worst = (sum_diff / allowed).max().item()
    norm_ok, norm_worst = norm_bound(got, rms_norm(got_sum, weight, 1e-5), dtype)
    exact = int((got_sum == want_sum).sum())
    return sum_ok and norm_ok, (f"sum worst {sum_worst:.2f} of the bound ({exact}/{hidden} exact), "
                                f"norm worst {norm_worst:.2f}")


def router_inputs(experts: int, hidden: int, exact: bool, dtype: torch.dtype, device: str,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if exact:  # every product a multiple of 1/512, every sum below 2**10: exact in float32
        x = torch.randint(-8, 9, (1, hidden), generator=generator) / 8
        w = torch.randint(-8, 9, (experts, hidden), generator=generator) / 64
    else:
        x = torch.randn(1, hidden, generator=generator)
        w = torch.randn(experts, hidden, generator=generator) * 0.05
    return x.to(device=device, dtype=dtype), w.to(device=device, dtype=dtype)


def check_router(device: str, dtype: torch.dtype, shape: tuple[int, int, int], normalize: bool, exact: bool,
                 generator: torch.Generator) -> tuple[bool, str]:
    experts, hidden, k = shape
    x, w = router_inputs(experts, hidden, exact, dtype, device, generator)
    config = SimpleNamespace(router="softmax", top_k=k, norm_topk_prob=normalize)
    logits = (x.double() @ w.double().T).to(dtype)  # [1, E]: correctly rounded (exact inputs: F.linear's too)
    want_weights, want_experts = torch_router.route(logits, config, None)
    if exact:
        assert torch.equal(logits, F.linear(x, w)), "exact inputs whose matmul is not exact"
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    stable = torch.sort(probs, dim=-1, descending=True, stable=True)  # ties: lowest index first
    weights = torch.full((1, k), float("nan"), device=device)
    chosen = torch.full((1, k), -1, dtype=torch.long, device=device)
    sorted_out = (torch.full((k,), -1, dtype=torch.long, device=device),
                  torch.full((k,), -1, dtype=torch.long, device=device),
                  torch.full((1, k), float("nan"), device=device))
    decode_fusion.softmax_router(x, w, k, normalize, weights, chosen, sorted_out)
    top = stable.values[0, : k + 1]
    ties = bool((top[1:] == top[:-1]).any()) if k < experts else bool((top[1:k] == top[: k - 1]).any())
    if exact or dtype == torch.float32:
        bound = 1e-6 if exact else FLOAT32_RANDOM
        weights_ok = bool(((weights - want_weights).abs() <= bound * want_weights.abs() + 1e-12).all())
        experts_ok = torch.equal(chosen[0], stable.indices[0, :k]) and (ties or torch.equal(chosen, want_experts))
    else:  # the same experts (as a set: the order of close ones may flip with a logit) where the k-th is clear
        weights_ok = bool(((weights - want_weights).abs() <= LOOSE * want_weights.abs() + 1e-9).all())
        clear = k == experts or (top[k - 1] - top[k]).item() > LOOSE * top[k - 1].item()
        experts_ok = not clear or torch.equal(chosen.sort().values, stable.indices[:, :k].sort().values)
    in_order, positions = torch.sort(chosen[0])
    sorted_ok = (torch.equal(sorted_out[0], in_order) and torch.equal(sorted_out[1], positions)
                 and torch.equal(sorted_out[2], torch.index_select(weights, 1, positions)))
    # without sorted_out: the same weights and experts, nothing else written
    weights2, chosen2 = torch.full_like(weights, float("nan")), torch.full_like(chosen, -1)
    decode_fusion.softmax_router(x, w, k, normalize, weights2, chosen2)
    plain_ok = torch.equal(weights2, weights) and torch.equal(chosen2, chosen)
    error = ((weights - want_weights).abs() / want_weights.abs().clamp_min(1e-30)).max().item()
    ok = weights_ok and experts_ok and sorted_ok and plain_ok
    return ok, (f"weights rel err {error:.1e}, experts {'ok' if experts_ok else 'DIFFER'}"
                f"{' (ties)' if ties else ''}, sorted {'ok' if sorted_ok else 'DIFFER'}")


def main(device: str, seed: int) -> int:
    generator = seeded("tests.decode_fusion_check", device, seed)
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    failures = 0
    for dtype in dtypes:
        for hidden in HIDDEN[device]:
            for with_b in (True, False):
                ok, line = check_add_rms_norm(device, dtype, hidden, with_b, generator)
                failures += not ok
                print(f"add_rms_norm {str(dtype):>14} H={hidden:<5} {'a+b' if with_b else 'a  '} {line} "
                      f"{'ok' if ok else 'FAIL'}")
    for dtype in dtypes:
        for hidden in HIDDEN[device]:
            if hidden % 16 == 0:
                ok, line = check_slot_input(device, dtype, hidden, generator)
                failures += not ok
                print(f"add_rms_norm -> slot input {str(dtype):>14} H={hidden:<5} {line} {'ok' if ok else 'FAIL'}")
            for parts in (1, 8):
                ok, line = check_partials(device, dtype, hidden, parts, generator)
                failures += not ok
                print(f"add_rms_norm partials {str(dtype):>14} H={hidden:<5} R={parts} {line} {'ok' if ok else 'FAIL'}")
    for dtype in dtypes:
        for shape in ROUTERS[device]:
            for normalize in (True, False):
                for exact in (True, False):
                    ok, line = check_router(device, dtype, shape, normalize, exact, generator)
                    failures += not ok
                    print(f"softmax_router {str(dtype):>14} E,H,k={shape} norm={normalize:d} "
                          f"{'exact ' if exact else 'random'} {line} {'ok' if ok else 'FAIL'}")
    return 1 if failures else 0


if __name__ == "__main__":
    device, seed = device_and_seed()
    sys.exit(main(device, seed))
