"""Test hooks: faults a host can be told to make (hidden `serve` flags that only tests use),
so the coordinator's deadline, checksum and restart handling can be shown against a real server."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FaultInjection:
    fetch_delay_s: float = 0.0  # wait this long before the first chunk of every fetch
    corrupt_chunks: bool = False  # flip one byte of every fetch's first chunk, after its checksum was taken
    load_delay_s: float = 0.0  # wait this long before loading the shard (health says NOT_SERVING meanwhile)
    run_delay_s: float = 0.0  # wait this long before running the experts of every RunExperts request

    @property
    def active(self) -> bool:
        return self.fetch_delay_s > 0 or self.corrupt_chunks or self.load_delay_s > 0 or self.run_delay_s > 0
