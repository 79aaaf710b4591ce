"""Which side refused a TLS connection to an expert host, told with Python's `ssl`.

gRPC reports every failed handshake as UNAVAILABLE with generic details; a host that refuses our
client certificate (mutual TLS) just hangs up ("Socket closed"). This repeats the handshake with
`ssl` and reads the host's first bytes: a certificate our CA file does not trust fails the
handshake; a handshake that succeeds and is then hung up on means the host did not accept our
client certificate (none given, or signed by a CA it does not trust). Blocking: call it from a
worker thread. Knows nothing of gRPC."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

# Alerts a host sends about our client certificate when its TLS stack says why (TLS 1.2 does it
# in the handshake, TLS 1.3 right after it).
_CLIENT_CERTIFICATE_ALERTS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSLV3_ALERT_BAD_CERTIFICATE", "TLSV1_ALERT_UNKNOWN_CA",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "TLSV1_ALERT_ACCESS_DENIED",
}


def diagnose_tls(host: str, port: int, *, ca: Path, cert: Path | None, key: Path | None, timeout_s: float) -> str | None:
    """What is wrong with the certificates between us and host:port, in words naming the files,
    or None when this check sees nothing wrong (or cannot tell: the host is down, say)."""
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=ca)
        if cert is not None and key is not None:
            context.load_cert_chain(cert, key)
        context.set_alpn_protocols(["h2"])  # what gRPC offers
    except (OSError, ssl.SSLError):
        return None  # our own files: read and checked when the credentials were made
    try:
        raw = socket.create_connection((host, port), timeout=timeout_s)
    except OSError:
        return None
    with raw:
        try:
            tls = context.wrap_socket(raw, server_hostname=host)
        except ssl.SSLCertVerificationError as err:
            return (f"the host's certificate is not trusted by our CA file {ca} ({err.verify_message}): it must be "
                    "signed by our CA (--tls-ca, or [tls] ca in cluster.toml) and made out to this address")
        except ssl.SSLError as err:
            return _client_certificate_refused(cert, key) if err.reason in _CLIENT_CERTIFICATE_ALERTS else None
        except OSError:
            return None
        with tls:
            try:
                first = tls.recv(1)  # a gRPC host that accepted us sends its HTTP/2 settings at once
            except ssl.SSLError as err:
                return _client_certificate_refused(cert, key) if err.reason in _CLIENT_CERTIFICATE_ALERTS else None
            except (ConnectionResetError, BrokenPipeError):
                first = b""
            except OSError:
                return None
    return None if first else _client_certificate_refused(cert, key)


def _client_certificate_refused(cert: Path | None, key: Path | None) -> str:
    if cert is None:
        return ("the host refused our client certificate: it is missing (the host asks for mutual TLS): give "
                "--tls-cert/--tls-key (or [tls] cert/key) signed by the CA of the host's --tls-client-ca")
    return (f"the host refused our client certificate {cert} (key {key}): it is untrusted, not signed by the CA "
            "of the host's --tls-client-ca")
