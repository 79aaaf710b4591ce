"""What the coordinator and the expert hosts share: the packed store format, quantization,
the expert FFN math, configs, errors and the generated gRPC code. Nothing here knows about
the token loop or about serving. Map of the code: docs/architecture.md."""
