"""What both ends of the wire agree on: chunk sizes, message-size limits, keepalive.

gRPC's default receive limit is 4 MiB and an expert is 40-350 MB, so FetchExpert streams chunks
and both sides set their limits here explicitly, from one set of numbers."""

from __future__ import annotations

DEFAULT_CHUNK_BYTES = 1 << 20  # BENCHMARKS.md: 1 MiB streams fastest; chunks stay in cache
MIN_CHUNK_BYTES = 64 << 10
MAX_CHUNK_BYTES = 16 << 20
MAX_CHUNK_MESSAGE_BYTES = MAX_CHUNK_BYTES + (4 << 10)  # a chunk plus its few small fields
MAX_REQUEST_BYTES = 1 << 20  # requests are small (RunExpert's activations will need their own limit)

KEEPALIVE_TIME_MS = 30_000  # the client pings an idle connection this often...
KEEPALIVE_TIMEOUT_MS = 10_000  # ...and calls it dead without an answer within this
MAX_RECONNECT_BACKOFF_MS = 1_000  # a restarted host is reachable again within about a second

AUTHORIZATION_KEY = "authorization"  # call metadata: ("authorization", "Bearer TOKEN")


def server_options() -> list[tuple[str, int]]:
    return [
        ("grpc.so_reuseport", 0),  # a second host on a taken port fails instead of sharing it
        ("grpc.max_send_message_length", MAX_CHUNK_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
        # Accept the client's keepalive pings (the default would answer them with GOAWAY).
        ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def channel_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", MAX_REQUEST_BYTES),
        ("grpc.max_receive_message_length", MAX_CHUNK_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    ]
