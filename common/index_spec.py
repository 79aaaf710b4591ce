"""Index lists such as `0-15` or `0,2,5-7`, as the CLI takes them for layers and experts."""

from __future__ import annotations

import re

from .errors import ConfigError

_PART = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_index_spec(spec: str | None, count: int, *, what: str) -> list[int]:
    """Return the sorted indices named by `spec` (None or "all" means every index below `count`)."""
    if spec is None or spec.strip().lower() in ("", "all"):
        return list(range(count))
    chosen: set[int] = set()
    for part in spec.split(","):
        match = _PART.match(part.strip())
        if not match:
            raise ConfigError(f"--{what} {spec!r}: {part.strip()!r} is not an index or a range like 0-7")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if low > high or high >= count:
            raise ConfigError(f"--{what} {spec!r}: {part.strip()!r} is outside 0-{count - 1}")
        chosen.update(range(low, high + 1))
    return sorted(chosen)
