"""An HTTP proxy between a client and a real server that carries out a chosen request and then closes the
connection without answering it: what a server killed between its commit and its answer looks like to the
client, made deterministic. The client's own retry then sends the request again. It can also cut an
answer off after its headers (a server killed while it answers), and answer chosen requests "503 Service
Unavailable" without forwarding them, as a busy server does (Prefect's on SQLite's "database is locked").

Real sockets, real HTTP, nothing mocked: every other request is forwarded as it is.
"""

from __future__ import annotations

import http.client
import http.server
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

# Headers of one connection, not of the request: the proxy sets its own for each side.
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "te", "upgrade"}

BUSY_ANSWER = b'{"exception_message": "Service Unavailable"}'  # what Prefect's server answers

# (HTTP method, path, body) -> drop the answer to this request?
DropRule = Callable[[str, str, bytes], bool]


class DroppingProxy:
    """Forwards to `upstream`; the first request each rule matches is carried out upstream, then its
    connection is closed unanswered (each rule fires once), or, for a `cut` rule, closed after the
    answer's headers. The first `times` requests each `busy` rule matches are answered 503 and not
    forwarded. `seen`: every request, as "METHOD path"; `dropped`: the rules that left a request
    unanswered or cut its answer off; `refused`: the busy rule of each 503 answered."""

    def __init__(
        self,
        upstream: str,
        rules: dict[str, DropRule],
        busy: dict[str, tuple[DropRule, int]] | None = None,
        cut: dict[str, DropRule] | None = None,
    ):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.pending = {**rules, **(cut or {})}
        self.cut = set(cut or {})
        self.busy = {name: [rule, times] for name, (rule, times) in (busy or {}).items()}
        self.seen: list[str] = []
        self.dropped: list[str] = []
        self.refused: list[str] = []
        self.lock = threading.Lock()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def drop(self, method: str, path: str, body: bytes) -> str | None:
        """The name of the rule that drops this request's answer (now spent), or None."""
        with self.lock:
            self.seen.append(f"{method} {path}")
            for name, rule in self.pending.items():
                if rule(method, path, body):
                    del self.pending[name]
                    self.dropped.append(name)
                    return name
        return None

    def refuse(self, method: str, path: str, body: bytes) -> bool:
        """Answer this request 503 instead of forwarding it?"""
        with self.lock:
            for name, spec in self.busy.items():
                rule, times = spec
                if times > 0 and rule(method, path, body):
                    spec[1] -= 1
                    self.seen.append(f"{method} {path}")
                    self.refused.append(name)
                    return True
        return False

    def forward(self, method: str, path: str, headers: dict[str, str], body: bytes):
        conn = http.client.HTTPConnection(*self.upstream, timeout=300)
        try:
            conn.request(method, path, body=body or None, headers=headers)
            response = conn.getresponse()
            return response.status, response.reason, response.getheaders(), response.read()
        finally:
            conn.close()

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects

            def relay(self) -> None:
                body = self.read_body()
                if proxy.refuse(self.command, self.path, body):
                    self.answer(503, "Service Unavailable", [], BUSY_ANSWER)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                status, reason, answer_headers, answer = proxy.forward(self.command, self.path, headers, body)
                rule = proxy.drop(self.command, self.path, body)
                if rule in proxy.cut:
                    self.answer(status, reason, answer_headers, answer, body=False)
                if rule:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)  # done upstream, never (fully) answered
                    return
                self.answer(status, reason, answer_headers, answer)

            def answer(
                self, status: int, reason: str, answer_headers: list, answer: bytes, body: bool = True
            ) -> None:
                self.send_response_only(status, reason)
                for key, value in answer_headers:
                    if key.lower() not in _HOP_BY_HOP:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                if body:
                    self.wfile.write(answer)
                self.wfile.flush()

            def read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = relay

            def log_message(self, *args) -> None:  # quiet: `seen` keeps what passed
                pass

        return Handler


@contextmanager
def dropping_proxy(
    upstream: str,
    rules: dict[str, DropRule],
    busy: dict[str, tuple[DropRule, int]] | None = None,
    cut: dict[str, DropRule] | None = None,
) -> Iterator[DroppingProxy]:
    """A DroppingProxy serving for a `with` block."""
    proxy = DroppingProxy(upstream, rules, busy, cut)
    thread = threading.Thread(target=proxy.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.server.shutdown()
        proxy.server.server_close()
