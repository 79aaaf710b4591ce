"""serve(): one engine behind the OpenAI-compatible HTTP API, in the foreground until Ctrl-C.

Listening beyond this machine (any address that is not loopback) needs an API key, or
`insecure=True` (`--insecure`) to do it anyway with a warning: the API runs arbitrary prompts on
your hardware, and without a key anyone on the network may use it."""

from __future__ import annotations

import sys
from pathlib import Path

from common.errors import ConfigError
from common.host_address import HostAddress

from .body_limit import DEFAULT_MAX_REQUEST_BYTES

DEFAULT_LISTEN = "127.0.0.1:8000"


def check_settings(*, listen: str, api_key: str | None, insecure: bool, max_queue: int,
                   default_max_tokens: int, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> HostAddress:
    """The address to listen on, or ConfigError: a bad setting, or a non-loopback address
    without a key nor insecure. Cheap: the CLI calls it before the model loads."""
    address = HostAddress.parse(listen, what="--listen", allow_any_port=True)
    if address.is_unix:
        raise ConfigError(f"--listen {listen}: the HTTP server listens on HOST:PORT, e.g. 127.0.0.1:8000")
    if not address.is_loopback and api_key is None and not insecure:
        raise ConfigError(f"--listen {listen}: other machines could use this server without a key; "
                          "pass --api-key-file FILE (or --insecure to do it anyway)")
    if max_queue < 0:
        raise ConfigError(f"--max-queue {max_queue}: must be 0 or more")
    if default_max_tokens < 1:
        raise ConfigError(f"--default-max-tokens {default_max_tokens}: must be at least 1")
    if max_request_bytes < 1:
        raise ConfigError(f"--max-request-bytes {max_request_bytes}: must be at least 1")
    return address


def default_model_name(engine) -> str:
    return Path(engine.store.folder).resolve().name


def serve(*, engine, listen: str = DEFAULT_LISTEN, api_key: str | None = None, max_queue: int = 16,
          model_name: str | None = None, default_max_tokens: int = 256, insecure: bool = False,
          max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> None:
    from .app import build_app
    from .http_server import run_server

    address = check_settings(listen=listen, api_key=api_key, insecure=insecure, max_queue=max_queue,
                             default_max_tokens=default_max_tokens, max_request_bytes=max_request_bytes)
    if not address.is_loopback:
        if api_key is None:
            print(f"WARNING: listening on {address.host} with NO API key: anyone who can reach this port can use it",
                  file=sys.stderr, flush=True)
        print("note: the API has no TLS; on a shared network put a TLS proxy in front of it", file=sys.stderr, flush=True)
    name = model_name or default_model_name(engine)
    app = build_app(engine, model_name=name, api_key=api_key, max_queue=max_queue,
                    default_max_tokens=default_max_tokens, max_request_bytes=max_request_bytes)

    def announce(url: str) -> None:
        print(f"moe-edge: serving {name} on {url} (OpenAI API at {url}/v1, metrics at {url}/metrics)", flush=True)

    run_server(app, host=address.host, port=address.port, on_listening=announce)
    print("moe-edge: stopped", flush=True)
