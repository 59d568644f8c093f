"""memtrace.exporter.web: web config loading, the /metrics server, basic auth, TLS and
client certificates, and the CLI's log lines about them (no root, no BCC)."""

from __future__ import annotations

import base64
import gzip
import http.client
import re
import socket
import ssl
import textwrap
import time
import types
import zlib

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.process_collector import ProcessCollector

from memtrace.commands import live
from memtrace.commands.run import run
from memtrace.commands.watch import watch
from memtrace.errors import ExitCode, MemtraceError
from memtrace.exporter import web
from memtrace.exporter.collector import MemtraceCollector
from memtrace.exporter.web import (
    DEFAULT_LISTEN,
    TEXT_FORMAT,
    WRITE_BYTES,
    WebConfig,
    is_loopback,
    load_web_config,
    parse_listen,
)
from memtrace.published import StateBox
from memtrace.util.batches import joined

from .helpers import (
    PAGE,
    Scrape,
    get,
    mapping,
    place,
    realistic_process,
    registry_for,
    scrape,
    snapshot,
    state_of,
)

bcrypt = pytest.importorskip("bcrypt", reason="bcrypt is a dependency of memtrace's basic auth")

REFUSED = (OSError, http.client.HTTPException)  # ssl.SSLError and resets are OSErrors


def registry() -> CollectorRegistry:
    return registry_for(state_of(realistic_process(100, "server")))[0]


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def write(tmp_path, text: str, name: str = "web.yml") -> str:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def client_ctx(cafile, cert=None, key=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cafile))
    if cert:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


# ---------------------------------------------------------------------------
# load_web_config


def test_no_config_is_plain_http():
    cfg = load_web_config(None)
    assert not cfg.tls and not cfg.basic_auth_users


def test_full_config_loads(tmp_path, pki):
    path = write(tmp_path, f"""\
        tls_server_config:
          cert_file: {pki.server_cert}
          key_file: {pki.server_key}
          client_auth_type: RequireAndVerifyClientCert
          client_ca_file: {pki.ca}
          min_version: TLS13
        basic_auth_users:
          alice: $2b$04$abcdefghijklmnopqrstuu5Kq4ReDy3AiKK6GWEawBYKJ6ePpHyHy
        """)
    cfg = load_web_config(path)
    assert cfg.tls and cfg.cert_file == str(pki.server_cert)
    assert cfg.client_auth_type == "RequireAndVerifyClientCert"
    assert cfg.client_ca_file == str(pki.ca) and cfg.min_version == "TLS13"
    assert list(cfg.basic_auth_users) == ["alice"]


def test_empty_file_is_the_default_config(tmp_path):
    cfg = load_web_config(write(tmp_path, ""))
    assert cfg == WebConfig()


BAD_CONFIGS = {
    "not-a-mapping": "- a\n- b\n",
    "unknown-top-level-key": "tls_config: {}\n",
    "cert-without-key": "tls_server_config:\n  cert_file: /x.crt\n",
    "key-without-cert": "tls_server_config:\n  key_file: /x.key\n",
    "unknown-client-auth": "tls_server_config:\n  cert_file: /a\n  key_file: /b\n"
                           "  client_auth_type: Sometimes\n",
    "client-auth-without-tls": "tls_server_config:\n  client_auth_type: RequireAnyClientCert\n",
    "unknown-min-version": "tls_server_config:\n  cert_file: /a\n  key_file: /b\n"
                           "  min_version: TLS99\n",
}
_ONE_LINE_BUG = ("BUG: a YAML syntax error is reported with PyYAML's multi-line message "
                 "(problem + 'in \"file\", line N, column M' lines), not one line")
_TYPE_BUG = ("BUG: load_web_config calls .get()/.items() on the section without checking "
             "it is a mapping: AttributeError traceback instead of a MemtraceError")
BAD_CONFIGS_BUGGY = {
    "yaml-syntax-error": ("tls_server_config: {cert_file: [unclosed\n", _ONE_LINE_BUG),
    "yaml-bad-indent": ("a: b\n  c: d\n", _ONE_LINE_BUG),
    "tls-section-not-a-mapping": ("tls_server_config: /etc/cert.pem\n", _TYPE_BUG),
    "users-not-a-mapping": ("basic_auth_users: [alice, bob]\n", _TYPE_BUG),
    "typo-in-tls-key-alone": (
        "tls_server_config:\n  cert_fil: /etc/memtrace/cert.pem\n",
        "BUG: unknown keys inside tls_server_config are ignored (exporter-toolkit rejects "
        "them): a misspelled cert_file leaves memtrace serving plain http"),
}


def _assert_one_line_usage_error(path: str) -> None:
    with pytest.raises(MemtraceError) as ei:
        load_web_config(path)
    err = ei.value
    assert err.code == ExitCode.USAGE
    assert "\n" not in err.message, f"not one line: {err.message!r}"
    assert path in err.message or "web config" in err.message, err.message


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_is_a_one_line_usage_error(tmp_path, case):
    _assert_one_line_usage_error(write(tmp_path, BAD_CONFIGS[case]))


@pytest.mark.parametrize("case", [
    pytest.param(name) for name in BAD_CONFIGS_BUGGY])
def test_bad_config_is_a_one_line_usage_error_buggy(tmp_path, case):
    _assert_one_line_usage_error(write(tmp_path, BAD_CONFIGS_BUGGY[case][0]))


def test_missing_config_file(tmp_path):
    _assert_one_line_usage_error(str(tmp_path / "nope.yml"))


def test_unreadable_config_is_a_directory(tmp_path):
    (tmp_path / "dir.yml").mkdir()
    _assert_one_line_usage_error(str(tmp_path / "dir.yml"))


# ---------------------------------------------------------------------------
# listen address


def test_default_listen_address_is_loopback():
    host, port = parse_listen(DEFAULT_LISTEN)
    assert is_loopback(host) and port == 9877
    for cmd, argv in ((watch, ["1"]), (run, ["--", "true"])):
        params = cmd.make_context(cmd.name, argv).params
        assert params["listen"] == DEFAULT_LISTEN
        assert params["no_serve"] is False  # serving is the default
        assert params["web_config"] is None
        assert params["max_mapping_series"] == 50


@pytest.mark.parametrize("addr, host, port, loop", [
    ("127.0.0.1:9877", "127.0.0.1", 9877, True),
    ("localhost:1", "localhost", 1, True),
    ("[::1]:9877", "::1", 9877, True),
    ("0.0.0.0:9877", "0.0.0.0", 9877, False),
    (":9877", "0.0.0.0", 9877, False),
    ("[::]:80", "::", 80, False),
    ("10.1.2.3:9877", "10.1.2.3", 9877, False),
])
def test_parse_listen(addr, host, port, loop):
    assert parse_listen(addr) == (host, port)
    assert is_loopback(host) is loop


@pytest.mark.parametrize("addr", ["127.0.0.1", "127.0.0.1:http", "nohost:", "",
                                  "127.0.0.1:99999", "[::1]:65536", "127.0.0.1:-1",
                                  "a b:80", "127.0.0.1:１２"])
def test_bad_listen_address(addr):
    with pytest.raises(MemtraceError) as ei:
        parse_listen(addr)
    assert ei.value.code == ExitCode.USAGE and "\n" not in ei.value.message


@pytest.mark.parametrize("hashed", [
    "plaintext", "$2b$10$short", "$1$abcdefgh$0123456789012345678901",
    "$2b$03$" + "a" * 53,          # cost below 4
    "$2x$10$" + "a" * 53,          # not a prefix Go's bcrypt accepts
])
def test_basic_auth_password_must_be_a_bcrypt_hash(tmp_path, hashed):
    path = write(tmp_path, f"basic_auth_users:\n  alice: '{hashed}'\n")
    with pytest.raises(MemtraceError) as ei:
        load_web_config(path)
    assert ei.value.code == ExitCode.USAGE and "\n" not in ei.value.message
    assert "'alice' is not a bcrypt hash" in ei.value.message


def test_basic_auth_real_hashes_are_accepted(tmp_path, users):
    text = "basic_auth_users:\n" + "".join(f"  {u}: '{h}'\n" for u, h in users.items())
    text += "  carol: '$2y$10$" + "A" * 53 + "'\n"     # htpasswd -B writes $2y$
    assert set(load_web_config(write(tmp_path, text)).basic_auth_users) == \
        {"alice", "bob", "carol"}


@pytest.mark.parametrize("data, words", [
    (b"\x7fELF\x02\x01\x01\x00\xff\xfe", "not UTF-8"),
    (b"basic_auth_users:\x00\n", "NUL"),
    (b"#" * ((1 << 20) + 10), "larger than 1 MiB"),
])
def test_web_config_that_is_not_text(tmp_path, data, words):
    p = tmp_path / "web.yml"
    p.write_bytes(data)
    with pytest.raises(MemtraceError) as ei:
        load_web_config(str(p))
    assert ei.value.code == ExitCode.USAGE and words in ei.value.message


# ---------------------------------------------------------------------------
# MetricsServer, plain


def test_serves_metrics_on_an_ephemeral_port(serve):
    srv = serve(registry())
    port = srv.httpd.server_port
    assert port != 0 and srv.address == f"127.0.0.1:{port}"
    assert not srv.exposed and not srv.protected
    status, headers, body = get(port)
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    s = Scrape(body.decode("utf-8"))
    assert s.value("memtrace_targets") == 1
    assert s.value("memtrace_process_resident_bytes", pid="100", type="anon") > 0
    status, headers, body = get(port, "/")
    assert status == 200 and b"/metrics" in body


def test_each_scrape_sees_the_latest_state(serve):
    reg, box, _ = registry_for(state_of(realistic_process(1), realistic_process(2)))
    port = serve(reg).httpd.server_port
    assert b'pid="1"' in get(port)[2]
    box.set(state_of(realistic_process(2)))
    body = get(port)[2]
    assert b'pid="1"' not in body and b'pid="2"' in body


# ---------------------------------------------------------------------------
# MetricsServer, the text fast path (as `memtrace watch` serves /metrics)


def fast_server(serve, state, render: str = "render_chunks"):
    """memtrace's collector through fast=, the process collector after it."""
    box = StateBox()
    box.set(state)
    collector = MemtraceCollector(box)
    reg = CollectorRegistry()
    reg.register(ProcessCollector(registry=None))
    return serve(reg, fast=getattr(collector, render)), box


def samples_without_build_time(s: Scrape) -> list:
    """The samples that do not change between two scrapes of one state."""
    return [x for x in s.samples if x[0] not in ("memtrace_scrape_build_seconds",
                                                 "memtrace_mapping_series_folded_total")
            and not x[0].startswith("process_")]


@pytest.mark.parametrize("render", ["render_scrape", "render_chunks", "render_text"])
@pytest.mark.parametrize("gzip_module", ["zlib", "isal"])
def test_fast_path_plain_and_gzip_serve_the_same_samples(serve, render, gzip_module,
                                                         monkeypatch):
    module = pytest.importorskip("isal.isal_zlib") if gzip_module == "isal" else zlib
    monkeypatch.setattr(web, "GZIP", module)
    state = state_of(realistic_process(100, "server"),
                     *(many_identities_snapshot(p) for p in range(1, 40)))
    srv, _ = fast_server(serve, state, render)
    port = srv.httpd.server_port
    status, headers, plain = get(port)
    assert status == 200 and headers["content-type"] == TEXT_FORMAT
    assert "content-encoding" not in headers
    assert int(headers["content-length"]) == len(plain) > 2 * WRITE_BYTES
    status, headers, packed = get(port, headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers["content-encoding"] == "gzip"
    assert int(headers["content-length"]) == len(packed) < len(plain) / 4
    unpacked = gzip.decompress(packed)
    one = zlib.decompressobj(31)  # one gzip member, as clients that read only one expect
    assert one.decompress(packed) == unpacked and one.eof and not one.unused_data
    # a second scrape of the tick (its deflate blocks kept): the same samples
    again = gzip.decompress(get(port, headers={"Accept-Encoding": "gzip"})[2])
    assert samples_without_build_time(Scrape(again.decode("utf-8"))) \
        == samples_without_build_time(Scrape(unpacked.decode("utf-8")))
    a, b = Scrape(plain.decode("utf-8")), Scrape(unpacked.decode("utf-8"))
    assert samples_without_build_time(a) == samples_without_build_time(b)
    assert a.value("memtrace_targets") == 40
    assert a.series("process_cpu_seconds_total") and b.series("process_cpu_seconds_total")
    # the same samples as prometheus_client renders from collect()
    want = scrape(registry_for(state)[0])
    assert samples_without_build_time(a) == samples_without_build_time(want)


def test_fast_path_head_and_post(serve):
    srv, _ = fast_server(serve, state_of(realistic_process(100)))
    port = srv.httpd.server_port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("HEAD", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 200 and int(resp.getheader("Content-Length")) > 0
        assert resp.read() == b""
    finally:
        conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("POST", "/metrics", body=b"x")
        resp = conn.getresponse()
        assert resp.status == 405 and resp.getheader("Allow") == "GET, HEAD"
        resp.read()
    finally:
        conn.close()


def test_fast_path_each_scrape_sees_the_latest_state(serve):
    srv, box = fast_server(serve, state_of(realistic_process(1), realistic_process(2)))
    port = srv.httpd.server_port
    assert b'pid="1"' in get(port)[2]
    box.set(state_of(realistic_process(2)))
    body = get(port)[2]
    assert b'pid="1"' not in body and b'pid="2"' in body


def test_render_chunks_is_render_text_in_pieces_joined_lazily_for_writes():
    state = state_of(*(many_identities_snapshot(p) for p in range(1, 40)))
    box = StateBox()
    box.set(state)
    collector = MemtraceCollector(box)
    chunks = collector.render_chunks()
    text = collector.render_text()
    assert len(chunks) > 2
    assert max(map(len, chunks)) < WRITE_BYTES
    writes = list(joined(chunks, WRITE_BYTES))
    assert len(writes) > 1 and b"".join(writes) == b"".join(chunks)
    assert all(len(w) >= WRITE_BYTES for w in writes[:-1])
    strip = re.compile(rb"^memtrace_(scrape_build_seconds|mapping_series_folded_total) .*$",
                       re.M)
    assert strip.sub(b"", b"".join(chunks)) == strip.sub(b"", text.encode("utf-8"))


def many_identities_snapshot(pid: int) -> dict:
    maps = [mapping(f"/usr/lib/x/lib{i:03d}.so", "library", size=4 * PAGE, file=(i + 1) * PAGE)
            for i in range(70)]
    return snapshot(pid, f"w{pid}", place(maps),
                    faults_by_mapping={f"/usr/lib/x/lib{i:03d}.so": i for i in range(70)})


def test_port_in_use_is_a_one_line_usage_error(serve):
    srv = serve(registry())
    with pytest.raises(MemtraceError) as ei:
        serve(registry(), listen=srv.address)
    assert ei.value.code == ExitCode.USAGE and "\n" not in ei.value.message
    assert srv.address in ei.value.message


def test_close_releases_the_port(serve):
    srv = serve(registry())
    port = srv.httpd.server_port
    srv.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_ipv6_loopback(serve):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        srv = serve(registry(), listen="[::1]:0")
    except MemtraceError as e:
        pytest.skip(f"cannot bind ::1 here: {e.message}")
    assert not srv.exposed
    assert get(srv.httpd.server_port, host="::1")[0] == 200


# ---------------------------------------------------------------------------
# basic auth


@pytest.fixture(scope="module")
def users() -> dict[str, str]:
    return {"alice": bcrypt.hashpw(b"s3cret:with colon", bcrypt.gensalt(rounds=4)).decode(),
            "bob": bcrypt.hashpw("pässwörd".encode(), bcrypt.gensalt(rounds=4)).decode()}


def test_basic_auth(serve, users):
    srv = serve(registry(), basic_auth_users=users)
    port = srv.httpd.server_port
    assert srv.protected
    status, _, body = get(port, headers=basic("alice", "s3cret:with colon"))
    assert status == 200 and b"memtrace_targets" in body
    # again: the cached check must give the same answer
    assert get(port, headers=basic("alice", "s3cret:with colon"))[0] == 200
    assert get(port, headers=basic("bob", "pässwörd"))[0] == 200


@pytest.mark.parametrize("headers", [
    {},
    basic("alice", "wrong"),
    basic("alice", ""),
    basic("alice", "s3cret"),  # a prefix of the password
    basic("mallory", "s3cret:with colon"),  # alice's password, unknown user
    basic("bob", "s3cret:with colon"),  # alice's password, other user
    {"Authorization": "Bearer abc"},
    {"Authorization": "Basic !!!notbase64"},
    {"Authorization": "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode()},
])
def test_basic_auth_refuses(serve, users, headers):
    port = serve(registry(), basic_auth_users=users).httpd.server_port
    # a good login first, so the cache of successful checks is not empty
    assert get(port, headers=basic("alice", "s3cret:with colon"))[0] == 200
    status, h, body = get(port, headers=headers)
    assert status == 401
    assert h.get("www-authenticate", "").startswith("Basic")
    assert b"memtrace_" not in body
    # the index page is protected too
    assert get(port, "/", headers=headers)[0] == 401


def test_basic_auth_with_a_non_bcrypt_hash_refuses(serve):
    port = serve(registry(), basic_auth_users={"alice": "plaintext"}).httpd.server_port
    assert get(port, headers=basic("alice", "plaintext"))[0] == 401


# ---------------------------------------------------------------------------
# TLS


def test_tls_self_signed(serve, pki):
    srv = serve(registry(), cert_file=str(pki.self_signed_cert),
                key_file=str(pki.self_signed_key))
    port = srv.httpd.server_port
    assert srv.protected
    status, _, body = get(port, tls=client_ctx(pki.self_signed_cert))
    assert status == 200 and b"memtrace_targets" in body
    # an unverified client is refused by the client itself (unknown CA)
    with pytest.raises(ssl.SSLError):
        get(port, tls=ssl.create_default_context())
    # plain http on the TLS port gets no metrics
    try:
        status, _, body = get(port)
    except REFUSED:
        pass
    else:
        assert status != 200 and b"memtrace_" not in body
    # and the server still works afterwards
    assert get(port, tls=client_ctx(pki.self_signed_cert))[0] == 200


def test_tls_min_version(serve, pki):
    port = serve(registry(), cert_file=str(pki.self_signed_cert),
                 key_file=str(pki.self_signed_key), min_version="TLS13").httpd.server_port
    old = client_ctx(pki.self_signed_cert)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(REFUSED):
        get(port, tls=old)
    assert get(port, tls=client_ctx(pki.self_signed_cert))[0] == 200


def test_tls_and_basic_auth(serve, pki, users):
    port = serve(registry(), cert_file=str(pki.self_signed_cert),
                 key_file=str(pki.self_signed_key), basic_auth_users=users).httpd.server_port
    ctx = client_ctx(pki.self_signed_cert)
    assert get(port, tls=ctx)[0] == 401
    assert get(port, tls=ctx, headers=basic("alice", "s3cret:with colon"))[0] == 200


def test_tls_setup_failure_is_one_line_and_frees_the_port(serve, tmp_path, pki):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(MemtraceError) as ei:
        serve(registry(), listen=f"127.0.0.1:{port}", cert_file=str(tmp_path / "no.crt"),
              key_file=str(pki.self_signed_key))
    assert ei.value.code == ExitCode.USAGE and "\n" not in ei.value.message
    with pytest.raises(MemtraceError):  # a key that does not match the certificate
        serve(registry(), listen=f"127.0.0.1:{port}", cert_file=str(pki.self_signed_cert),
              key_file=str(pki.server_key))
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_tls_idle_connection_does_not_block_scrapes(serve, pki):
    port = serve(registry(), cert_file=str(pki.self_signed_cert),
                 key_file=str(pki.self_signed_key)).httpd.server_port
    ctx = client_ctx(pki.self_signed_cert)
    assert get(port, tls=ctx)[0] == 200
    with socket.create_connection(("127.0.0.1", port)):
        time.sleep(0.2)
        assert get(port, tls=ctx, timeout=3)[0] == 200


def test_plain_idle_connection_does_not_block_scrapes(serve):
    port = serve(registry()).httpd.server_port
    with socket.create_connection(("127.0.0.1", port)):
        time.sleep(0.2)
        assert get(port, timeout=3)[0] == 200


# ---------------------------------------------------------------------------
# client certificates


@pytest.fixture
def mtls(serve, pki):
    return serve(registry(), cert_file=str(pki.server_cert), key_file=str(pki.server_key),
                 client_auth_type="RequireAndVerifyClientCert",
                 client_ca_file=str(pki.ca)).httpd.server_port


def test_client_cert_signed_by_the_ca_is_accepted(mtls, pki):
    status, _, body = get(mtls, tls=client_ctx(pki.ca, pki.client_cert, pki.client_key))
    assert status == 200 and b"memtrace_targets" in body


@pytest.mark.parametrize("which", ["no-cert", "other-ca", "server-cert-as-client"])
def test_client_without_a_valid_cert_is_refused(mtls, pki, which):
    ctx = {
        "no-cert": lambda: client_ctx(pki.ca),
        "other-ca": lambda: client_ctx(pki.ca, pki.other_client_cert, pki.other_client_key),
        # signed by the right CA but for serverAuth only
        "server-cert-as-client": lambda: client_ctx(pki.ca, pki.server_cert, pki.server_key),
    }[which]()
    with pytest.raises(REFUSED):
        status, _, body = get(mtls, tls=ctx)
        # if a response came back, it must not be the metrics
        assert status != 200 and b"memtrace_" not in body, "served without a valid cert"
        raise OSError(f"refused with HTTP {status}")
    # the server keeps serving good clients
    assert get(mtls, tls=client_ctx(pki.ca, pki.client_cert, pki.client_key))[0] == 200


def test_verifying_client_auth_without_a_ca_is_a_one_line_error(serve, pki):
    with pytest.raises(MemtraceError) as ei:
        serve(registry(), cert_file=str(pki.server_cert), key_file=str(pki.server_key),
              client_auth_type="RequireAndVerifyClientCert")
    assert ei.value.code == ExitCode.USAGE and "\n" not in ei.value.message


def test_require_any_client_cert(serve, pki):
    port = serve(registry(), cert_file=str(pki.server_cert), key_file=str(pki.server_key),
                 client_auth_type="RequireAnyClientCert",
                 client_ca_file=str(pki.ca)).httpd.server_port
    with pytest.raises(REFUSED):
        get(port, tls=client_ctx(pki.ca))
    assert get(port, tls=client_ctx(pki.ca, pki.client_cert, pki.client_key))[0] == 200


# ---------------------------------------------------------------------------
# the CLI's log lines (memtrace.commands.live.serve_metrics, without probes)


def _serve_log(capsys, listen: str, web_config: str | None) -> list[str]:
    session = types.SimpleNamespace(exporter_box=StateBox())
    server = live.serve_metrics(session,  # type: ignore[arg-type]
                                live.bind_metrics(False, listen, web_config), 50)
    try:
        assert server is not None
        port = server.httpd.server_port
        lines = capsys.readouterr().err.splitlines()
        return [line.replace(f":{port}/", ":PORT/").replace(f":{port} ", ":PORT ")
                for line in lines]
    finally:
        server.close()


def test_no_serve(capsys):
    session = types.SimpleNamespace(exporter_box=StateBox())
    assert live.bind_metrics(True, "0.0.0.0:0", None) is None
    assert live.serve_metrics(session, None, 50) is None  # type: ignore[arg-type]
    assert capsys.readouterr().err == ""


def test_loopback_without_protection_logs_no_warning(capsys):
    lines = _serve_log(capsys, "127.0.0.1:0", None)
    assert lines == ["memtrace: serving metrics on http://127.0.0.1:PORT/metrics"]


def test_exposed_without_protection_logs_a_warning(capsys):
    lines = _serve_log(capsys, "0.0.0.0:0", None)
    assert lines[0] == "memtrace: serving metrics on http://0.0.0.0:PORT/metrics"
    warnings = [line for line in lines if "warning" in line]
    assert len(warnings) == 1 and "0.0.0.0:PORT" in warnings[0], lines


def test_exposed_with_tls_logs_no_warning(capsys, tmp_path, pki):
    path = write(tmp_path, f"""\
        tls_server_config:
          cert_file: {pki.self_signed_cert}
          key_file: {pki.self_signed_key}
        """)
    lines = _serve_log(capsys, "0.0.0.0:0", path)
    assert lines == ["memtrace: serving metrics on https://0.0.0.0:PORT/metrics"]


def test_exposed_with_basic_auth_logs_no_warning(capsys, tmp_path, users):
    path = write(tmp_path, f"basic_auth_users:\n  alice: '{users['alice']}'\n")
    lines = _serve_log(capsys, "0.0.0.0:0", path)
    assert not [line for line in lines if "warning" in line], lines


def test_basic_auth_only_logs_http(capsys, tmp_path, users):
    path = write(tmp_path, f"basic_auth_users:\n  alice: '{users['alice']}'\n")
    lines = _serve_log(capsys, "127.0.0.1:0", path)
    assert lines == ["memtrace: serving metrics on http://127.0.0.1:PORT/metrics"]


# ---------------------------------------------------------------------------
# binding before serving; a port that is in use


@pytest.fixture
def held_port():
    """A loopback port some other process could hold: bound and listening."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s.getsockname()[1]
    s.close()


def test_bind_first_serve_later(held_port):
    srv = web.MetricsServer(None, "127.0.0.1:0", WebConfig())
    try:
        assert srv.thread is None and srv.busy is None
        port = srv.httpd.server_port
        c = socket.create_connection(("127.0.0.1", port), timeout=5)  # queued: bound already
        c.close()
        srv.serve(registry())
        status, _, body = get(port)
        assert status == 200 and b"# TYPE" in body
    finally:
        srv.close()
    unserved = web.MetricsServer(None, "127.0.0.1:0", WebConfig())
    unserved.close()          # closing a server that never served does not hang


def test_busy_port_is_one_line_usage_error(held_port):
    with pytest.raises(MemtraceError) as ei:
        web.MetricsServer(None, f"127.0.0.1:{held_port}", WebConfig())
    msg = ei.value.message
    assert ei.value.code == ExitCode.USAGE and "\n" not in msg
    assert msg.startswith(f"cannot listen on 127.0.0.1:{held_port}: Address already in use")


def test_busy_port_with_fallback_takes_a_free_port(held_port, capsys):
    listen = f"127.0.0.1:{held_port}"
    server = live.bind_metrics(False, listen, None, fallback=True)
    assert server is not None
    try:
        assert server.busy == listen and server.httpd.server_port != held_port
        live.serve_metrics(types.SimpleNamespace(exporter_box=StateBox()), server, 50)  # type: ignore[arg-type]
        err = capsys.readouterr().err.splitlines()
        assert err == [f"memtrace: {listen} is in use (another memtrace?): serving metrics on "
                       f"http://{server.address}/metrics instead (--web.listen-address "
                       "chooses; --no-serve turns it off)"]
        assert get(server.httpd.server_port)[0] == 200
    finally:
        server.close()


def _memtrace(*argv: str) -> tuple[int, str, float]:
    import subprocess
    import sys

    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "memtrace", *argv], capture_output=True,
                       text=True, timeout=60)
    return p.returncode, p.stderr, time.monotonic() - t0


@pytest.mark.parametrize("command", [
    ["watch", "--web.listen-address", "127.0.0.1:{port}", "1"],
    ["run", "--web.listen-address", "127.0.0.1:{port}", "--", "touch", "{file}"],
    ["agent", "--comm", "^nothing$", "--web.listen-address", "127.0.0.1:{port}"],
])
def test_given_busy_port_fails_before_anything_starts(held_port, tmp_path, command):
    """A --web.listen-address that is in use: one line, exit 2, at once (bound
    before the probes compile; run does not start the command)."""
    marker = tmp_path / "ran"
    argv = [a.format(port=held_port, file=marker) for a in command]
    code, err, seconds = _memtrace(*argv)
    assert code == ExitCode.USAGE
    assert err.splitlines() == [f"memtrace: error: cannot listen on 127.0.0.1:{held_port}: Address "
                                "already in use (another memtrace or exporter holds it: "
                                "choose another port, or port 0 for any free one)"], err
    assert not marker.exists()
    assert seconds < 2.0, seconds   # ~0.3 s; compiling the probes takes 2-5 s


def test_agent_never_falls_back_from_its_default_port():
    """Prometheus scrapes the agent at a fixed port: when the default port is in
    use the agent fails (exit 2) instead of serving elsewhere."""
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        holder.bind(parse_listen(DEFAULT_LISTEN))
        holder.listen()
    except OSError:
        pass    # in use already (another memtrace on this machine): busy all the same
    try:
        code, err, seconds = _memtrace("agent", "--comm", "^nothing$")
    finally:
        holder.close()
    assert code == ExitCode.USAGE, err
    assert f"cannot listen on {DEFAULT_LISTEN}: Address already in use" in err
    assert seconds < 2.0, seconds
