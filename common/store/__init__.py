"""The packed expert store: one contiguous blob per expert, a manifest, dense weights."""
