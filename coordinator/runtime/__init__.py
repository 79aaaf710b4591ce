"""The runtime: the engine and everything on its hot path (model, decoder, MoE block, expert
cache, loader, prefetcher, counters, sampling). Built from EngineOptions by `Engine`; knows
nothing of HTTP, command lines or how a store was made. Map: docs/architecture.md."""
