"""Where experts come from. The coordinator does not care: every source answers the same
small interface (base.ExpertSource)."""

from .base import ExpertSource
from .local import DiskSource, RamSource

__all__ = ["ExpertSource", "RamSource", "DiskSource"]
