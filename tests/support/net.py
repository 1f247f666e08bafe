"""Loopback networking in tests: free ports, and JSON over HTTP to the servers a test started (never
through a proxy the developer's environment may name)."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

from .pgcluster import free_port

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# A busy server answers 503 (Prefect's, when its SQLite database is locked by a concurrent writer) or 502;
# Prefect's own client retries those codes, so the tests' plain HTTP does too: 1, 2, 4, 8 s apart.
BUSY_CODES = (502, 503)
BUSY_RETRIES = 4


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
    """The body of the answer to GET `url` (POST with `body` as JSON), bypassing any proxy; a busy server's
    502/503 is retried (BUSY_RETRIES times)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"}, method=method
    )
    for attempt in range(BUSY_RETRIES + 1):
        try:
            with _NO_PROXY.open(request, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            if exc.code not in BUSY_CODES or attempt == BUSY_RETRIES:
                raise
            time.sleep(2**attempt)
    raise AssertionError("unreachable")


def http_json(url: str, body: dict | None = None, *, method: str | None = None, timeout: float = 60):
    """http_bytes() parsed as JSON (None for an empty answer)."""
    content = http_bytes(url, body, method=method, timeout=timeout)
    return json.loads(content) if content.strip() else None
