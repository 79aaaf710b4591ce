"""Benchmarks: commands that print a table and write JSON, never timed tests. Each is a client
of the engine (decode.py) or of an expert host (fetch.py), not a second engine. Results and
the commands that produced them: BENCHMARKS.md."""
