"""Addresses of the servers: can a port be bound, how clients reach a bind address, does a URL answer."""

from __future__ import annotations

import errno
import http.client
import socket
import urllib.request

from flows.ops.errors import ServiceError

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy


def client_url(host: str, port: int) -> str:
    """The URL clients use for a server bound to `host`:`port`: wildcard binds are reached through
    loopback; IPv6 gets brackets."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "[::1]"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def check_port_free(host: str, port: int, option: str) -> None:
    """ServiceError unless `port` can be bound on `host` (as the servers will, with SO_REUSEADDR)."""
    if not 1 <= port <= 65535:
        raise ServiceError(f"{option} must be between 1 and 65535 (got {port})")
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ServiceError(f"--host {host!r} is not a valid address: {exc.strerror}") from None
    family, socktype, proto, _, sockaddr = infos[0]
    with socket.socket(family, socktype, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            raise _bind_error(exc, host, port, option) from None


def _bind_error(exc: OSError, host: str, port: int, option: str) -> ServiceError:
    if exc.errno == errno.EADDRINUSE:
        return ServiceError(f"port {port} is already in use (choose another with {option})")
    return ServiceError(f"cannot listen on {host}:{port} ({exc.strerror}); check --host and {option}")


def answers(url: str, timeout: float = 2.0) -> bool:
    """Whether a GET of `url` (a health endpoint) succeeds."""
    try:
        with _NO_PROXY.open(url, timeout=timeout) as response:
            response.read()
        return True
    except (OSError, ValueError, http.client.HTTPException):
        return False
