"""Choosing the next token from the logits: greedy, or temperature + nucleus (top-p) sampling
with a seeded generator so that a seed gives the same text every time.

`SamplingParams` is the one place where sampling settings are checked; the CLI (`generate`),
the Python API (`Engine.generate`) and the HTTP server all build one, so they accept and refuse
the same values (ConfigError naming the setting):

    temperature  a finite number; > 0 when sampling (greedy ignores it, 0 is fine there).
                 Below GREEDY_BELOW_TEMPERATURE (1e-5) sampling is greedy: at such a temperature
                 every token but the most likely has a probability under exp(-1e5 * gap), which
                 is 0 in any float, so the result is the same and no division can overflow.
    top_p        a number in (0, 1], checked even when greedy (which ignores it).
    seed         any integer, or None for a fresh random seed. torch seeds with 64 bits, so the
                 seed is reduced modulo 2**64 (`generator_seed`): -1 and 2**64 - 1 are the same
                 seed, as torch itself treats negative seeds.

Knows nothing about the model or tokenizer: logits in, a token id out."""

from __future__ import annotations

import math
from dataclasses import InitVar, dataclass

import torch

from common.errors import ConfigError

GREEDY_BELOW_TEMPERATURE = 1e-5
SEED_MODULUS = 2**64


def _number(value, name: str) -> float:
    """value as a float, or ConfigError when it is not a finite real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} {value!r}: must be a number")
    try:
        number = float(value)
    except OverflowError:  # an int too big for a float
        raise ConfigError(f"{name} {value}: must be a finite number") from None
    if not math.isfinite(number):
        raise ConfigError(f"{name} {value}: must be a finite number")
    return number


@dataclass(frozen=True)
class SamplingParams:
    """as_options=True names the settings as the CLI spells them (--temperature, --top-p, --seed)
    in error messages; the API and the server use the plain names (temperature, top_p, seed)."""

    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    as_options: InitVar[bool] = False

    def __post_init__(self, as_options: bool) -> None:
        def name(setting: str) -> str:
            return "--" + setting.replace("_", "-") if as_options else setting

        temperature = _number(self.temperature, name("temperature"))
        if temperature < 0 or (not self.greedy and temperature == 0):
            raise ConfigError(f"{name('temperature')} {self.temperature}: must be > 0 "
                              f"(below {GREEDY_BELOW_TEMPERATURE:g} it samples greedily)")
        top_p = _number(self.top_p, name("top_p"))
        if not 0 < top_p <= 1:
            raise ConfigError(f"{name('top_p')} {self.top_p}: must be in (0, 1]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError(f"{name('seed')} {self.seed!r}: must be an integer")
        object.__setattr__(self, "temperature", temperature)
        object.__setattr__(self, "top_p", top_p)

    @property
    def samples(self) -> bool:
        """False when the next token is the most likely one: greedy, or a temperature so small
        that sampling would give the same token (see GREEDY_BELOW_TEMPERATURE)."""
        return not self.greedy and self.temperature >= GREEDY_BELOW_TEMPERATURE

    @property
    def generator_seed(self) -> int | None:
        """The seed as torch takes it: reduced modulo 2**64 (torch's own rule for negative seeds)."""
        return None if self.seed is None else self.seed % SEED_MODULUS


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator = torch.Generator()
        if params.generator_seed is not None:
            self.generator.manual_seed(params.generator_seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """logits [V] (any float dtype, any device) -> token id."""
        if not self.params.samples:
            return int(torch.argmax(logits).item())
        # float64, and the largest logit moved to 0 before dividing: at temperature >= 1e-5 the
        # scaled gaps stay far inside float64's range and the top token keeps probability > 0
        logits = logits.detach().to("cpu", torch.float64)
        probs = torch.softmax((logits - logits.max()) / self.params.temperature, dim=-1)
        if self.params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # keep the smallest set whose mass reaches top_p (the first token always stays)
            keep = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) < self.params.top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=self.generator).item())
