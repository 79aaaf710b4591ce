"""The expert host: a gRPC server that holds a shard of a packed store's experts (in RAM, or
read from the store's files per fetch) and streams an expert's bytes to the coordinator on request.

    python -m expert_host serve --store STORE [--layers 0-15] [--experts 0-7] [--listen 127.0.0.1:50051]

It knows nothing of models, tokens or GPUs: only expert ids, blobs and their checksums. It never imports the coordinator.
Map of the code: docs/architecture.md."""
