"""The one interface every expert source implements."""

from __future__ import annotations

from typing import Protocol

import torch

from common.expert_id import ExpertId


class ExpertSource(Protocol):
    name: str
    blob_nbytes: int

    def resident_blob(self, eid: ExpertId) -> torch.Tensor | None:
        """The blob if it already lies in pinned (or, on a CPU run, plain) host memory and can be
        copied to the device as it is; None if it must be fetched with fetch_into."""

    async def fetch_into(self, eid: ExpertId, out: torch.Tensor) -> None:
        """Fill `out` (uint8 [blob_nbytes], host memory) with the expert's verified blob.
        Runs on the fetch loop; must not block it."""

    def bytes_by_origin(self) -> dict[str, int]:
        """Bytes delivered so far, per origin (file tier, host address, ...), for the stats."""

    def close(self) -> None:
        ...
