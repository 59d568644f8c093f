"""The /metrics HTTP endpoint, configured like Prometheus exporters
(exporter-toolkit's --web.listen-address and --web.config.file: TLS with optional
client certificates, basic auth with bcrypt hashes)."""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import ipaddress
import re
import socket
import ssl
import threading
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import generate_latest, make_wsgi_app
from prometheus_client.registry import CollectorRegistry

from memtrace.errors import ExitCode, MemtraceError
from memtrace.exporter.body import WRITE_BYTES as WRITE_BYTES  # re-exported
from memtrace.exporter.body import TickText, gzip_body, plain_body

DEFAULT_PORT = 9877
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"

_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_TLS_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
                 "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}


@dataclass
class WebConfig:
    cert_file: str | None = None
    key_file: str | None = None
    client_auth_type: str = "NoClientCert"
    client_ca_file: str | None = None
    min_version: str = "TLS12"
    basic_auth_users: dict[str, str] = field(default_factory=dict)

    @property
    def tls(self) -> bool:
        return bool(self.cert_file)


def load_web_config(path: str | None) -> WebConfig:
    if not path:
        return WebConfig()
    raw = read_yaml_config(path, "web config")
    if not isinstance(raw, dict):
        raise MemtraceError(f"web config {path}: expected a mapping", ExitCode.USAGE)
    _only_keys(path, "", raw, {"tls_server_config", "basic_auth_users", "http_server_config"})
    tls = _section(path, raw, "tls_server_config")
    _only_keys(path, "tls_server_config", tls, {
        "cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version",
        "max_version", "cipher_suites", "curve_preferences", "prefer_server_cipher_suites",
        "client_allowed_sans"})
    users = _section(path, raw, "basic_auth_users")
    cfg = WebConfig(
        cert_file=tls.get("cert_file"), key_file=tls.get("key_file"),
        client_auth_type=tls.get("client_auth_type", "NoClientCert"),
        client_ca_file=tls.get("client_ca_file"), min_version=tls.get("min_version", "TLS12"),
        basic_auth_users={str(k): str(v) for k, v in users.items()},
    )
    if bool(cfg.cert_file) != bool(cfg.key_file):
        raise MemtraceError(f"web config {path}: cert_file and key_file go together",
                            ExitCode.USAGE)
    if cfg.client_auth_type not in _CLIENT_AUTH:
        raise MemtraceError(f"web config {path}: unknown client_auth_type "
                            f"{cfg.client_auth_type!r}", ExitCode.USAGE)
    if cfg.client_auth_type != "NoClientCert" and not cfg.tls:
        raise MemtraceError(f"web config {path}: client_auth_type needs cert_file",
                            ExitCode.USAGE)
    if cfg.min_version not in _TLS_VERSIONS:
        raise MemtraceError(f"web config {path}: unknown min_version {cfg.min_version!r}",
                            ExitCode.USAGE)
    for user, hashed in cfg.basic_auth_users.items():
        if not _BCRYPT.fullmatch(hashed):
            raise MemtraceError(f"web config {path}: basic_auth_users: the password of "
                                f"{user!r} is not a bcrypt hash (make one with "
                                "htpasswd -nBC 10 USER)",
                                ExitCode.USAGE)
    return cfg


CONFIG_MAX_BYTES = 1 << 20


def read_config_text(path: str, what: str) -> str:
    """A YAML config file's text: UTF-8, at most 1 MiB; MemtraceError (usage)
    with one line otherwise."""
    try:
        with open(path, "rb") as f:
            data = f.read(CONFIG_MAX_BYTES + 1)
    except OSError as e:
        raise MemtraceError(f"cannot read {what} {path}: {e.strerror or e}",
                            ExitCode.USAGE) from None
    if len(data) > CONFIG_MAX_BYTES:
        raise MemtraceError(f"{what} {path}: larger than {CONFIG_MAX_BYTES >> 20} MiB",
                            ExitCode.USAGE)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MemtraceError(f"{what} {path}: not UTF-8 text (byte {e.start})",
                            ExitCode.USAGE) from None
    if "\0" in text:
        raise MemtraceError(f"{what} {path}: not a text file (NUL byte)", ExitCode.USAGE)
    return text


def read_yaml_config(path: str, what: str) -> Any:
    """A YAML config file (read_config_text), parsed; an empty one is {}. Bad
    YAML is one line with where and what (MemtraceError, usage)."""
    import yaml  # type: ignore[import-untyped]

    text = read_config_text(path, what)
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "syntax error"
        raise MemtraceError(f"{what} {path} is not valid YAML{where}: {problem}",
                            ExitCode.USAGE) from None


# A bcrypt hash as exporter-toolkit (Go's x/crypto/bcrypt) accepts it:
# $2a$, $2b$ or $2y$, a cost of 04-31, 22 characters of salt and 31 of hash.
_BCRYPT = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")


def _section(path: str, raw: dict[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name) or {}
    if not isinstance(value, dict):
        raise MemtraceError(f"web config {path}: {name} must be a mapping", ExitCode.USAGE)
    return value


def _only_keys(path: str, where: str, section: dict[str, Any], known: set[str]) -> None:
    unknown = set(section) - known
    if unknown:
        place = f" in {where}" if where else ""
        raise MemtraceError(f"web config {path}: unknown keys{place}: "
                            f"{', '.join(sorted(map(str, unknown)))}", ExitCode.USAGE)


def ssl_context(cfg: WebConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _TLS_VERSIONS[cfg.min_version]
    assert cfg.cert_file and cfg.key_file
    ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    ctx.verify_mode = _CLIENT_AUTH[cfg.client_auth_type]
    if cfg.client_ca_file:
        ctx.load_verify_locations(cfg.client_ca_file)
    elif cfg.client_auth_type in ("RequireAndVerifyClientCert", "VerifyClientCertIfGiven"):
        raise MemtraceError("web config: client_auth_type verifies clients but no "
                            "client_ca_file is given", ExitCode.USAGE)
    return ctx


class BasicAuth:
    """WSGI middleware checking bcrypt-hashed passwords. Successful checks are
    cached by a salted digest, so a scrape does not pay bcrypt's cost each time."""

    def __init__(self, app: Callable[..., Iterable[bytes]], users: dict[str, str]) -> None:
        import bcrypt

        self.app = app
        self.users = users
        self._bcrypt = bcrypt
        self._ok: set[bytes] = set()
        self._salt = hashlib.sha256(repr(sorted(users.items())).encode()).digest()
        self._lock = threading.Lock()

    def _check(self, header: str) -> bool:
        if not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        hashed = self.users.get(user)
        if hashed is None:
            return False
        key = hashlib.sha256(self._salt + header.encode()).digest()
        with self._lock:
            if key in self._ok:
                return True
        try:
            ok = self._bcrypt.checkpw(password.encode(), hashed.encode())
        except ValueError:
            ok = False
        if ok:
            with self._lock:
                self._ok.add(key)
        return bool(ok)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if self._check(environ.get("HTTP_AUTHORIZATION", "")):
            return self.app(environ, start_response)
        start_response("401 Unauthorized", [("Content-Type", "text/plain"),
                                            ("WWW-Authenticate", 'Basic realm="memtrace"')])
        return [b"Unauthorized\n"]


TLS_HANDSHAKE_TIMEOUT = 10.0


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    tls: ssl.SSLContext | None = None

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        # The TLS handshake runs here, in the connection's own thread and with a
        # timeout, so a client that connects and says nothing blocks nobody.
        if self.tls is not None:
            try:
                request.settimeout(TLS_HANDSHAKE_TIMEOUT)
                request = self.tls.wrap_socket(request, server_side=True)
                request.settimeout(None)
            except (OSError, ssl.SSLError):
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?")


def listen_problem(address: str) -> str | None:
    """Why `address` is not HOST:PORT (PORT 0-65535; HOST empty, an IP address,
    [IPv6] or a host name), or None."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit():
        return "expected HOST:PORT"
    if len(port) > 5 or int(port) > 65535:
        return f"port {port} is not in the range 0 to 65535"
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host:
        return None
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    if len(host) > 253 or not _HOSTNAME.fullmatch(host):
        return f"{host!r} is not an IP address or host name"
    return None


def parse_listen(address: str) -> tuple[str, int]:
    problem = listen_problem(address)
    if problem:
        raise MemtraceError(f"--web.listen-address {address!r}: {problem}", ExitCode.USAGE)
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    return host or "0.0.0.0", int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _index(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/html")])
    return [b"<html><body><h1>memtrace</h1><a href=\"/metrics\">/metrics</a></body></html>\n"]


TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"
GZIP_LEVEL = 1  # the fastest that still compresses well; prometheus_client uses 9

# The module that gzips /metrics (zlib's interface): ISA-L's deflate where the
# isal package is installed (the same gzip format, ~3.5x faster than zlib at
# level 1; see benchmarks/README.md), else zlib.
GZIP: Any = zlib
with contextlib.suppress(ImportError):  # isal is a dependency where it has wheels
    from isal import isal_zlib as GZIP  # type: ignore[no-redef,import-not-found]

# What fast= returns: the memtrace part of a scrape as a str, as UTF-8 pieces, or
# (as MemtraceCollector.render_scrape) the tick's text and this scrape's own tail.
FastRender = Callable[[], "str | Iterable[bytes] | tuple[TickText, list[bytes]]"]


def _fast_app(render: FastRender, registry: CollectorRegistry) -> Callable[..., Any]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD")])
            return [b""]
        text = render()
        if isinstance(text, tuple):
            head, tail = text[0], list(text[1])
        else:
            head = TickText([text.encode("utf-8")] if isinstance(text, str) else list(text))
            tail = []
        tail.append(generate_latest(registry))
        headers = [("Content-Type", TEXT_FORMAT)]
        if "gzip" in environ.get("HTTP_ACCEPT_ENCODING", ""):
            body = gzip_body(head, tail, GZIP, GZIP_LEVEL)
            headers.append(("Content-Encoding", "gzip"))
        else:
            body = plain_body(head, tail)
        headers.append(("Content-Length", str(sum(map(len, body)))))
        start_response("200 OK", headers)
        return [b""] if environ.get("REQUEST_METHOD") == "HEAD" else body
    return app


def _not_yet(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
    return [b"memtrace is starting\n"]


class MetricsServer:
    """Serves /metrics from `registry` in a daemon thread.

    Binding and serving are two steps so that a command can take its address
    before the seconds of BPF compilation (a busy port is then one line at once):
    MetricsServer(None, listen, cfg) binds and listens (connections wait in the
    backlog), serve(registry, fast) starts answering them."""

    def __init__(self, registry: CollectorRegistry | None, listen: str, cfg: WebConfig,
                 fast: FastRender | None = None, fallback: bool = False) -> None:
        """Bind `listen`; with `registry`, serve it at once (see serve()). With
        `fallback`, a port that is in use is replaced by any free port on the same
        host (self.busy then names the address that was in use)."""
        host, port = parse_listen(listen)

        class Server(_ThreadingServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        self.busy: str | None = None
        try:
            self.httpd = make_server(host, port, _not_yet, Server,
                                     handler_class=_QuietHandler)
        except OSError as e:
            if not (fallback and port != 0 and e.errno == errno.EADDRINUSE):
                hint = (" (another memtrace or exporter holds it: choose another port, "
                        "or port 0 for any free one)" if e.errno == errno.EADDRINUSE else "")
                raise MemtraceError(f"cannot listen on {listen}: {e.strerror}{hint}",
                                    ExitCode.USAGE) from None
            self.busy = listen
            try:
                self.httpd = make_server(host, 0, _not_yet, Server,
                                         handler_class=_QuietHandler)
            except OSError as e2:
                raise MemtraceError(f"cannot listen on {host}:0: {e2.strerror}",
                                    ExitCode.USAGE) from None
        self.cfg = cfg
        if cfg.tls:
            try:
                ctx = ssl_context(cfg)
            except (OSError, ssl.SSLError) as e:
                self.httpd.server_close()
                raise MemtraceError(f"TLS setup failed: {e}", ExitCode.USAGE) from None
            self.httpd.tls = ctx
        shown = f"[{host}]" if ":" in host else host
        self.address = f"{shown}:{self.httpd.server_port}"
        self.exposed = not is_loopback(host)
        self.tls = cfg.tls
        self.protected = cfg.tls or bool(cfg.basic_auth_users)
        self.thread: threading.Thread | None = None
        if registry is not None:
            self.serve(registry, fast)

    def serve(self, registry: CollectorRegistry, fast: FastRender | None = None) -> None:
        """Serve `registry`; with `fast`, serve its text (a str, or UTF-8 pieces as
        MemtraceCollector.render_chunks returns) first and render the registry
        (small: the process collector) after it."""
        metrics = make_wsgi_app(registry) if fast is None else _fast_app(fast, registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            if environ.get("PATH_INFO", "/") in ("/", ""):
                return _index(environ, start_response)
            return metrics(environ, start_response)

        wsgi: Callable[..., Any] = BasicAuth(app, self.cfg.basic_auth_users) \
            if self.cfg.basic_auth_users else app
        self.httpd.set_app(wsgi)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True,
                                       name="metrics-http")
        self.thread.start()

    def close(self) -> None:
        if self.thread is not None:
            self.httpd.shutdown()
        self.httpd.server_close()
