"""A fault-injecting HTTP proxy for S3 tests (stdlib only, threaded, 127.0.0.1).

Requests are forwarded to the upstream server with the same method, path, headers (Host included)
and body bytes, so SigV4 signatures stay valid. Per request a seeded RNG picks at most one fault:

    slowdown  answer 503 SlowDown (S3 XML error body) without forwarding
    error500  answer 500 InternalError without forwarding
    reset     reset the connection (TCP RST) without forwarding
    drop      forward, then close without answering: the write happened, the client never heard
    delay     sleep `delay_s`, then forward

and, independently of the RNG, `conflict_once=PREFIX`: the first PUT of every key whose path
contains PREFIX is answered 409 ConditionalRequestConflict (what S3 says to one of two concurrent
conditional writes) without forwarding.

    proxy = FaultProxy(upstream, seed=1, slowdown=0.2, reset=0.05, drop=0.1).start()
    proxy.endpoint; proxy.injected["drop"]; proxy.queue("drop")  # next request: a drop
    proxy.stop()
"""

from __future__ import annotations

import collections
import http.client
import http.server
import random
import socket
import struct
import threading
import time
from urllib.parse import urlsplit

FAULTS = ("slowdown", "error500", "reset", "drop", "delay")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "expect"}
_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "error500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "upstream": (502, "BadGateway", "The fault proxy could not reach the upstream server."),
    "conflict409": (409, "ConditionalRequestConflict", "A conflicting conditional operation is in progress."),
}


class FaultProxy:
    def __init__(self, upstream: str, *, seed: int = 0, delay_s: float = 0.05, conflict_once: str | None = None,
                 **rates: float):
        unknown = set(rates) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {FAULTS}")
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port or 80)
        self.rates = {name: float(rates.get(name, 0.0)) for name in FAULTS}
        self.delay_s = delay_s
        self.conflict_once = conflict_once
        self._conflicted: set[str] = set()
        self.injected: collections.Counter[str] = collections.Counter()
        self.requests = 0  # requests received (faulty or not)
        self._rng = random.Random(seed)
        self._queued: collections.deque[str] = collections.deque()
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "proxy not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultProxy:
        handler = type("Handler", (_Handler,), {"proxy": self})
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def queue(self, *faults: str) -> None:
        """Inject these faults, in order, into the next requests (before any random ones)."""
        for fault in faults:
            if fault not in FAULTS:
                raise ValueError(f"unknown fault {fault!r}; known: {FAULTS}")
        with self._lock:
            self._queued.extend(faults)

    def set_rates(self, **rates: float) -> None:
        with self._lock:
            self.rates.update({name: float(rates[name]) for name in FAULTS if name in rates})

    def _conflict(self, method: str, path: str) -> bool:
        """Whether this request gets its key's one 409 (see conflict_once)."""
        if self.conflict_once is None or method != "PUT" or self.conflict_once not in path:
            return False
        key = path.split("?", 1)[0]
        with self._lock:
            if key in self._conflicted:
                return False
            self._conflicted.add(key)
            self.injected["conflict409"] += 1
            return True

    def _pick(self) -> str | None:
        with self._lock:
            self.requests += 1
            if self._queued:
                fault = self._queued.popleft()
            else:
                draw, fault = self._rng.random(), None
                for name in FAULTS:
                    draw -= self.rates[name]
                    if draw < 0:
                        fault = name
                        break
            if fault:
                self.injected[fault] += 1
            return fault


class _Handler(http.server.BaseHTTPRequestHandler):
    proxy: FaultProxy  # set on the subclass made in FaultProxy.start
    protocol_version = "HTTP/1.1"  # keep-alive, and `Expect: 100-continue` gets a 100 reply
    disable_nagle_algorithm = True  # headers and body go out in separate writes
    timeout = 30
    _upstream: http.client.HTTPConnection | None = None

    def log_message(self, format, *args):  # quiet
        pass

    def do_request(self) -> None:
        body = self._read_body()
        if self.proxy._conflict(self.command, self.path):
            return self._answer_error("conflict409")
        fault = self.proxy._pick()
        if fault in ("slowdown", "error500"):
            return self._answer_error(fault)
        if fault == "reset":
            return self._reset()
        if fault == "delay":
            time.sleep(self.proxy.delay_s)
        try:
            status, reason, headers, data = self._forward(body)
        except (OSError, http.client.HTTPException):
            self._close_upstream()
            return self._answer_error("upstream")
        if fault == "drop":  # the upstream did the work; the client hears nothing
            self.close_connection = True
            return
        self.send_response_only(status, reason)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP | {"transfer-encoding", "content-length"}:
                self.send_header(name, value)
        length = dict((k.lower(), v) for k, v in headers).get("content-length")
        self.send_header("Content-Length", length if self.command == "HEAD" and length else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_request

    def _read_body(self) -> bytes:
        """The request body exactly as sent (chunked framing and trailers kept)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raw = bytearray()
            while True:
                line = self.rfile.readline()
                raw += line
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers, up to the empty line
                        trailer = self.rfile.readline()
                        raw += trailer
                        if trailer in (b"\r\n", b"\n", b""):
                            return bytes(raw)
                raw += self.rfile.read(size + 2)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self, body: bytes):
        if self._upstream is None:
            self._upstream = http.client.HTTPConnection(*self.proxy.upstream, timeout=30)
        conn = self._upstream
        conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for name, value in self.headers.items():
            if name.lower() not in _HOP_BY_HOP:
                conn.putheader(name, value)
        conn.endheaders()
        if body:
            conn.send(body)
        response = conn.getresponse()
        data = response.read()
        if response.will_close:
            self._close_upstream()
        return response.status, response.reason, response.getheaders(), data

    def _close_upstream(self) -> None:
        if self._upstream is not None:
            self._upstream.close()
            self._upstream = None

    def _answer_error(self, kind: str) -> None:
        status, code, message = _ERRORS[kind]
        data = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message><Resource>{self.path}</Resource>"
            f"<RequestId>fault-proxy-{self.proxy.requests}</RequestId></Error>"
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _reset(self) -> None:
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()  # RST instead of FIN
        self.close_connection = True

    def finish(self) -> None:
        self._close_upstream()
        try:
            super().finish()
        except OSError:  # the socket was reset on purpose
            pass
