"""Loopback networking in tests: free ports, and JSON over HTTP to the servers a test started (never
through a proxy the developer's environment may name)."""

from __future__ import annotations

import json
import socket
import urllib.request

from .pgcluster import free_port

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def two_ports() -> tuple[int, int]:
    """Two different TCP ports nobody listens on right now."""
    first, second = free_port(), free_port()
    while second == first:
        second = free_port()
    return first, second


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could bind `port` now (nothing listens there)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def http_bytes(
    url: str, body: dict | None = None, *, method: str | None = None, timeout: float = 60
) -> bytes:
    """The body of the answer to GET `url` (POST with `body` as JSON), bypassing any proxy."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"}, method=method
    )
    with _NO_PROXY.open(request, timeout=timeout) as response:
        return response.read()


def http_json(url: str, body: dict | None = None, *, method: str | None = None, timeout: float = 60):
    """http_bytes() parsed as JSON (None for an empty answer)."""
    content = http_bytes(url, body, method=method, timeout=timeout)
    return json.loads(content) if content.strip() else None
