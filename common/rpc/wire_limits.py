"""What both ends of the wire agree on: chunk sizes, message-size limits, keepalive.

gRPC's default receive limit is 4 MiB and an expert is 40-350 MB, so FetchExpert streams chunks
and both sides set their limits here explicitly, from one set of numbers.

RunExperts carries a step's activations (T x H x 2-4 bytes, plus T x n float32 weights) each way:
small for decode, tens of MB for a long prompt. gRPC sets one receive limit per server, not per
method, so the host's receive limit is RunExperts' (gRPC refuses a bigger message with
RESOURCE_EXHAUSTED before reading it); the other requests are far smaller than that."""

from __future__ import annotations

DEFAULT_CHUNK_BYTES = 1 << 20  # BENCHMARKS.md: 1 MiB streams fastest; chunks stay in cache
MIN_CHUNK_BYTES = 64 << 10
MAX_CHUNK_BYTES = 16 << 20
MAX_CHUNK_MESSAGE_BYTES = MAX_CHUNK_BYTES + (4 << 10)  # a chunk plus its few small fields
MAX_REQUEST_BYTES = 1 << 20  # Info and FetchExpert requests: a few fields
MAX_RUN_EXPERTS_BYTES = 64 << 20  # a RunExperts request or reply: e.g. 4096 prompt tokens x 4096 hidden x float32

KEEPALIVE_TIME_MS = 30_000  # the client pings an idle connection this often...
KEEPALIVE_TIMEOUT_MS = 10_000  # ...and calls it dead without an answer within this
MAX_RECONNECT_BACKOFF_MS = 1_000  # a restarted host is reachable again within about a second

AUTHORIZATION_KEY = "authorization"  # call metadata: ("authorization", "Bearer TOKEN")


def server_options() -> list[tuple[str, int]]:
    return [
        ("grpc.so_reuseport", 0),  # a second host on a taken port fails instead of sharing it
        ("grpc.max_send_message_length", max(MAX_CHUNK_MESSAGE_BYTES, MAX_RUN_EXPERTS_BYTES)),
        ("grpc.max_receive_message_length", max(MAX_REQUEST_BYTES, MAX_RUN_EXPERTS_BYTES)),
        # Accept the client's keepalive pings (the default would answer them with GOAWAY).
        ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def channel_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max(MAX_REQUEST_BYTES, MAX_RUN_EXPERTS_BYTES)),
        ("grpc.max_receive_message_length", max(MAX_CHUNK_MESSAGE_BYTES, MAX_RUN_EXPERTS_BYTES)),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    ]
