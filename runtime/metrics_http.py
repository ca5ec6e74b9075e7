"""A tiny, bounded, GET-only HTTP server for /metrics (and the hub's status page), stdlib only.

    server = HttpServer("127.0.0.1:9464", {"/metrics": lambda: (CONTENT_TYPE, registry.render().encode())})
    server.start()          # binds now (ConfigError naming the field if it can't), serves in a thread
    server.port             # the bound port (listen "127.0.0.1:0" picks a free one)
    server.stop()

Loopback only unless `allow_remote` (the page has no authentication): `parse_listen` refuses any
other host. Bounded: at most MAX_CONNECTIONS connections at once (more are closed unanswered),
a request (line + headers) of at most MAX_REQUEST_BYTES, SOCKET_TIMEOUT_S per connection, one
request per connection, GET and HEAD only, and only the paths in `routes` (404 otherwise). A
route that raises answers 500 and is logged; nothing a client sends ends the server thread.
"""

from __future__ import annotations

import http.server
import ipaddress
import logging
import socket
import threading
from collections.abc import Callable

from .errors import ConfigError

log = logging.getLogger("kaizen.metrics")

MAX_CONNECTIONS = 8
MAX_REQUEST_BYTES = 8192
SOCKET_TIMEOUT_S = 5.0
Route = Callable[[], tuple[str, bytes]]   # -> (content type, body)
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                               "frame-ancestors 'none'",
}


def parse_listen(value: str, allow_remote: bool = False, *, source: str = "<config>",
                 field: str = "metrics_listen") -> tuple[str, int] | None:
    """"HOST:PORT" (or "[::1]:PORT") -> (host, port); "" -> None (off). ConfigError naming
    `source` and `field` when malformed, or when HOST is not loopback and not allow_remote."""
    if not isinstance(value, str):
        raise ConfigError(f"{source}: field {field!r}: {value!r} must be a string \"HOST:PORT\" or \"\" (off)")
    if value == "":
        return None
    host, sep, port_text = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{source}: field {field!r}: {value!r} is not HOST:PORT such as \"127.0.0.1:9464\" "
                          "(\"\" turns it off)")
    if host == "localhost":
        loopback = True
    else:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            raise ConfigError(f"{source}: field {field!r}: host {host!r} is not an IP address "
                              "(use 127.0.0.1, ::1 or an interface address)") from None
    if not loopback and not allow_remote:
        allow = field.rsplit("_", 1)[0] + "_allow_remote"
        raise ConfigError(f"{source}: field {field!r}: {value!r} is not a loopback address; this page has no "
                          f"authentication, so only 127.0.0.1 / ::1 are allowed unless {allow} = true")
    return host, int(port_text)


class _TooLarge(Exception):
    pass


class _CappedReader:
    """The request stream, cut off after MAX_REQUEST_BYTES (request line + headers)."""

    def __init__(self, raw, budget: int):
        self.raw, self.left = raw, budget

    def _take(self, data: bytes) -> bytes:
        self.left -= len(data)
        if self.left < 0:
            raise _TooLarge()
        return data

    def readline(self, limit: int = -1) -> bytes:
        cap = self.left + 1 if limit < 0 else min(limit, self.left + 1)
        return self._take(self.raw.readline(cap))

    def read(self, n: int = -1) -> bytes:
        return self._take(self.raw.read(min(n, self.left + 1) if n >= 0 else self.left + 1))

    def close(self) -> None:
        self.raw.close()


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "kaizen"
    sys_version = ""
    timeout = SOCKET_TIMEOUT_S

    def setup(self) -> None:
        super().setup()
        self.rfile = _CappedReader(self.rfile, MAX_REQUEST_BYTES)
        self.command, self.requestline, self.request_version = None, "", "HTTP/1.0"   # for send_error

    def handle(self) -> None:
        try:
            self.close_connection = True
            self.handle_one_request()
        except _TooLarge:
            self.close_connection = True
            try:
                self.send_error(431, "request too large")
            except OSError:
                pass
        except OSError:
            pass   # the client went away or was too slow (timeout): nothing to answer

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, send_body: bool) -> None:
        route = self.server.routes.get(self.path.split("?", 1)[0])
        if route is None:
            self.send_error(404, "not found")
            return
        try:
            content_type, body = route()
            status = 200
        except Exception:   # a failing page answers 500, the server keeps serving
            log.exception("%s: %s failed", self.server.name, self.path[:100])
            content_type, body, status = "text/plain; charset=utf-8", b"internal error (see the log)\n", 500
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in SECURITY_HEADERS.items():
            self.send_header(k, v)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        log.debug("%s: %s %s", self.server.name, self.address_string(), format % args)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address, routes: dict[str, Route], name: str):
        self.routes, self.name = dict(routes), name
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.refused = 0
        super().__init__(address, _Handler)

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:   # e.g. no thread could be started: give the slot back
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address) -> None:
        log.exception("%s: a request from %s failed", self.name, client_address)   # called inside an except


class _Server6(_Server):
    address_family = socket.AF_INET6


class HttpServer:
    """`routes` {path: () -> (content type, body bytes)} served on `listen` in a daemon thread."""

    def __init__(self, listen: str, routes: dict[str, Route], *, allow_remote: bool = False,
                 name: str = "kaizen-metrics", source: str = "<config>", field: str = "metrics_listen"):
        address = parse_listen(listen, allow_remote, source=source, field=field)
        if address is None:
            raise ConfigError(f"{source}: field {field!r} is empty (off): nothing to serve")
        self.address, self.routes, self.name = address, routes, name
        self.source, self.field = source, field
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        host = self.address[0]
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"

    def start(self) -> HttpServer:
        cls = _Server6 if ":" in self.address[0] else _Server
        try:
            self._server = cls(self.address, self.routes, self.name)
        except OSError as err:
            raise ConfigError(f"{self.source}: field {self.field!r}: cannot listen on "
                              f"{self.address[0]}:{self.address[1]} ({err.strerror or err}): pick a free port, "
                              "or \"\" to turn it off") from None
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=self.name, daemon=True)
        self._thread.start()
        log.info("%s: serving %s on %s", self.name, ", ".join(sorted(self.routes)), self.url)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout)
        self._server = None

    def __enter__(self) -> HttpServer:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def check_listen_fields(source: str, config, *names: str) -> None:
    """Config check of `<name>_listen` / `<name>_allow_remote` pairs and `log_format` (if present):
    ConfigError naming the file and the field."""
    from .logs import check_log_format

    for name in names:
        allow = getattr(config, f"{name}_allow_remote")
        if not isinstance(allow, bool):
            raise ConfigError(f"{source}: field '{name}_allow_remote': {allow!r} must be true or false")
        parse_listen(getattr(config, f"{name}_listen"), allow, source=source, field=f"{name}_listen")
    if hasattr(config, "log_format"):
        check_log_format(source, "log_format", config.log_format)
