"""The coordinator: runs on the GPU machine. Dense part on the device, the token loop, the KV
cache, the GPU expert cache, the prefetcher and the client API. Map of the code: docs/architecture.md.

    from coordinator import Engine
    with Engine.open("STORE", device="cpu") as engine:
        for piece in engine.generate("Hello", max_new_tokens=20):
            print(piece, end="", flush=True)
"""

__all__ = ["Engine", "Generation", "GenerationStats"]


def __getattr__(name: str):
    # Imported lazily so that `python -m coordinator --help` answers without loading torch.
    if name in __all__:
        from .runtime import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'coordinator' has no attribute {name!r}")
