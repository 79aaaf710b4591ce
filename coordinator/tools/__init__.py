"""Offline tools that make stores: `pack` (a Hugging Face checkpoint folder -> a store),
`make-synthetic` (real shapes, random weights), `make-tiny-model` (a small random checkpoint
for tests and the demo). Nothing here runs at generation time. Map: docs/architecture.md."""
