"""Which expert hosts the coordinator uses and how it talks to them: cluster.toml, or the same
settings from the command line (--hosts, --token-file, --tls-*).

    token_file = "token"            # optional: the hosts' shared token
    [tls]                           # optional: TLS to every HOST:PORT host (not to unix: sockets)
    ca = "ca.pem"                   #   the CA that signed the hosts' certificates
    cert = "coordinator.pem"        #   optional, for mutual TLS: this coordinator's certificate...
    key = "coordinator.key"         #   ...and its key
    [pool]                          # optional
    fetch_deadline_s = 30           #   a fetch not done by then is retried on another replica
    host_restart_wait_s = 60        #   with every holder of an expert down, wait this long for one to come back
    run_experts = "stream"          #   RunExperts on one long-lived stream per host, or "unary": a call per layer and host
    [[hosts]]
    address = "192.168.1.21:50051"  # one table per host

Relative paths are taken from the folder of the TOML file. Needs Python 3.11's tomllib, or the
tomli package on 3.10 (a dependency there)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from common.host_address import HostAddress

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


@dataclass(frozen=True)
class ClientTls:
    ca: Path  # TLS is on when a CA is given
    cert: Path | None = None
    key: Path | None = None


RUN_EXPERTS_CALLS = ("stream", "unary")
_TEXT_SETTINGS = ("run_experts",)  # the [pool] settings that are strings, not numbers


@dataclass(frozen=True)
class PoolSettings:
    fetch_deadline_s: float = 30.0  # one attempt at one host
    info_deadline_s: float = 5.0  # Info at start and each probe of a host marked down
    probe_min_s: float = 1.0  # first re-probe of a host marked down...
    probe_max_s: float = 30.0  # ...then doubling up to this
    chunk_bytes: int = 0  # 0: the host's default
    # With every host that holds an expert unreachable or loading, a fetch waits this long for
    # one to come back (a restart) before it fails; 0: fail at once.
    host_restart_wait_s: float = 60.0
    # How experts run on hosts (placement run/auto) travel: "stream", one long-lived
    # RunExpertsStream per host (the shorter round trip, scripts/run_experts_round_trip.py), or
    # "unary", one RunExperts call per layer and host (what older hosts answer in any case).
    run_experts: str = "stream"

    def __post_init__(self) -> None:
        if self.run_experts not in RUN_EXPERTS_CALLS:
            raise ConfigError(f"pool setting run_experts = {self.run_experts!r}: choose {' or '.join(RUN_EXPERTS_CALLS)} "
                              "(--run-experts)")
        may_be_zero = ("chunk_bytes", "host_restart_wait_s")
        for item in fields(self):
            if item.name in _TEXT_SETTINGS:
                continue
            value = getattr(self, item.name)
            if value < 0 or (item.name not in may_be_zero and value == 0):
                rule = "must not be negative" if item.name in may_be_zero else "must be positive"
                raise ConfigError(f"pool setting {item.name} = {value}: {rule}")
        if self.probe_min_s > self.probe_max_s:
            raise ConfigError(f"pool settings: probe_min_s {self.probe_min_s} is above probe_max_s {self.probe_max_s}")


@dataclass(frozen=True)
class ClusterConfig:
    hosts: tuple[HostAddress, ...]
    token_file: Path | None = None
    tls: ClientTls | None = None
    pool: PoolSettings = field(default_factory=PoolSettings)

    def __post_init__(self) -> None:
        seen = set()
        for host in self.hosts:
            if str(host) in seen:
                raise ConfigError(f"expert host {host} is listed twice")
            seen.add(str(host))
        if self.tls is not None and (self.tls.cert is None) != (self.tls.key is None):
            raise ConfigError("TLS client certificate and key go together (--tls-cert/--tls-key, or [tls] cert/key)")

    def with_hosts(self, extra: list[HostAddress]) -> "ClusterConfig":
        return replace(self, hosts=(*self.hosts, *extra))


def parse_host_list(text: str, *, what: str = "--hosts") -> tuple[HostAddress, ...]:
    """`ADDR[,ADDR...]` as --hosts takes it."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise ConfigError(f"{what} {text!r}: give at least one HOST:PORT")
    return tuple(HostAddress.parse(part, what=what) for part in parts)


_TOP_KEYS = {"token_file", "tls", "pool", "hosts"}
_TLS_KEYS = {"ca", "cert", "key"}
_HOST_KEYS = {"address"}


def _check_keys(table: Any, allowed: set[str], where: str) -> dict:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(allowed))})")
    return table


def read_cluster_config(path: str | Path) -> ClusterConfig:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as err:
        raise ConfigError(f"--cluster {path}: cannot read it ({err})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"--cluster {path}: not valid TOML ({err})") from None
    _check_keys(data, _TOP_KEYS, str(path))
    folder = path.parent

    def file_path(value: Any, where: str) -> Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{path}: {where} must be a file path (a string)")
        return (folder / value).resolve() if not Path(value).is_absolute() else Path(value)

    hosts_table = data.get("hosts", [])
    if not isinstance(hosts_table, list):
        raise ConfigError(f"{path}: hosts must be an array of tables ([[hosts]] address = \"HOST:PORT\")")
    hosts = []
    for number, host in enumerate(hosts_table, 1):
        host = _check_keys(host, _HOST_KEYS, f"{path}: host {number}")
        if "address" not in host or not isinstance(host["address"], str):
            raise ConfigError(f"{path}: host {number} needs address = \"HOST:PORT\"")
        hosts.append(HostAddress.parse(host["address"], what=f"{path}: host {number} address"))
    tls = None
    if "tls" in data:
        table = _check_keys(data["tls"], _TLS_KEYS, f"{path}: [tls]")
        if "ca" not in table:
            raise ConfigError(f"{path}: [tls] needs ca = \"ca.pem\" (the CA that signed the hosts' certificates)")
        tls = ClientTls(
            ca=file_path(table["ca"], "[tls] ca"),
            cert=file_path(table["cert"], "[tls] cert") if "cert" in table else None,
            key=file_path(table["key"], "[tls] key") if "key" in table else None,
        )
    pool_table = _check_keys(data.get("pool", {}), {f.name for f in fields(PoolSettings)}, f"{path}: [pool]")
    for key, value in pool_table.items():
        if key in _TEXT_SETTINGS:
            if not isinstance(value, str):
                raise ConfigError(f"{path}: [pool] {key} must be a string")
        elif not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{path}: [pool] {key} must be a number")
    return ClusterConfig(
        hosts=tuple(hosts),
        token_file=file_path(data["token_file"], "token_file") if "token_file" in data else None,
        tls=tls,
        pool=PoolSettings(**pool_table),
    )
