"""Addresses of expert hosts, as `--listen`, `--hosts` and cluster.toml write them.

`HOST:PORT` (`127.0.0.1:50051`, `[::1]:50051`, `ram-pc-1:50051`) or `unix:PATH` (a Unix
socket, for an expert host on the same machine). Knows nothing of gRPC beyond the target
string it hands to a channel or a server."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .errors import ConfigError

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


@dataclass(frozen=True)
class HostAddress:
    host: str = ""  # name or IP literal, without brackets
    port: int = 0  # 0 on a listen address: any free port
    unix_path: str | None = None

    @classmethod
    def parse(cls, text: str, *, what: str = "address", allow_any_port: bool = False) -> "HostAddress":
        text = text.strip()
        if text.startswith("unix:"):
            path = text[len("unix:"):]
            if not path:
                raise ConfigError(f"{what} {text!r}: unix: needs a socket path, e.g. unix:/tmp/expert-host.sock")
            return cls(unix_path=path)
        host, sep, port_text = text.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ConfigError(f"{what} {text!r}: write an IPv6 address in brackets, e.g. [::1]:50051")
        if not sep or not host or not port_text.isdigit():
            raise ConfigError(f"{what} {text!r}: expected HOST:PORT (e.g. 192.168.1.20:50051) or unix:PATH")
        port = int(port_text)
        if not (0 if allow_any_port else 1) <= port <= 65535:
            raise ConfigError(f"{what} {text!r}: port {port} is outside {0 if allow_any_port else 1}-65535")
        return cls(host=host, port=port)

    @property
    def is_unix(self) -> bool:
        return self.unix_path is not None

    @property
    def is_loopback(self) -> bool:
        """True for a Unix socket or an address only this machine can reach."""
        if self.is_unix:
            return True
        if self.host.lower() in LOOPBACK_NAMES:
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a host name: assume it can be reached from elsewhere
            return False

    def with_port(self, port: int) -> "HostAddress":
        return HostAddress(self.host, port, self.unix_path)

    def __str__(self) -> str:
        if self.is_unix:
            return f"unix:{self.unix_path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def grpc_target(self) -> str:
        """The string grpc's channels and servers take."""
        return str(self)
