"""Where experts come from. The coordinator does not care: every source answers the same
small interface (base.ExpertSource). In-process: RamSource, DiskSource. Remote: ExpertPool,
over the expert hosts a ClusterConfig lists (imported lazily: only they need grpc)."""

from .base import ExpertSource
from .local import DiskSource, RamSource

__all__ = ["ExpertSource", "RamSource", "DiskSource", "ExpertPool", "ClusterConfig"]


def __getattr__(name: str):
    if name == "ExpertPool":
        from .expert_pool import ExpertPool

        return ExpertPool
    if name == "ClusterConfig":
        from .cluster_config import ClusterConfig

        return ClusterConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
