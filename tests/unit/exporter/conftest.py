from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
from prometheus_client import CollectorRegistry

from memtrace.exporter.web import MetricsServer, WebConfig


@dataclass
class Pki:
    """Certificates made with openssl for one test session."""

    dir: Path
    self_signed_cert: Path  # CN=localhost, SAN IP:127.0.0.1, its own CA
    self_signed_key: Path
    ca: Path  # "memtrace test CA"
    server_cert: Path  # signed by ca
    server_key: Path
    client_cert: Path  # signed by ca, clientAuth
    client_key: Path
    other_ca: Path  # an unrelated CA
    other_client_cert: Path  # signed by other_ca
    other_client_key: Path


def _openssl(*args: str | Path) -> None:
    r = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"openssl {' '.join(map(str, args))} failed:\n{r.stderr}")


def _ca(d: Path, name: str) -> tuple[Path, Path]:
    key, cert = d / f"{name}.key", d / f"{name}.crt"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
             "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def _leaf(d: Path, name: str, ca: tuple[Path, Path], usage: str) -> tuple[Path, Path]:
    key, csr, cert, ext = (d / f"{name}.key", d / f"{name}.csr", d / f"{name}.crt",
                           d / f"{name}.ext")
    ext.write_text("basicConstraints=CA:FALSE\n"
                   "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                   f"extendedKeyUsage={usage}\n")
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
             "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
             "-out", cert, "-days", "2", "-extfile", ext)
    return cert, key


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if not shutil.which("openssl"):
        pytest.skip("openssl not installed: cannot make test certificates")
    d = tmp_path_factory.mktemp("pki")
    ss_key, ss_cert = d / "self.key", d / "self.crt"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ss_key, "-out",
             ss_cert, "-days", "2", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost")
    ca = _ca(d, "memtrace-test-ca")
    other = _ca(d, "other-ca")
    server = _leaf(d, "server", ca, "serverAuth")
    client = _leaf(d, "client", ca, "clientAuth")
    other_client = _leaf(d, "other-client", other, "clientAuth")
    return Pki(d, ss_cert, ss_key, ca[0], server[0], server[1], client[0], client[1],
               other[0], other_client[0], other_client[1])


@pytest.fixture
def serve() -> Iterator[Callable[..., MetricsServer]]:
    """serve(registry, cfg=WebConfig(), listen="127.0.0.1:0", fast=None) -> a running
    MetricsServer, closed at the end of the test."""
    servers: list[MetricsServer] = []

    def start(registry: CollectorRegistry, cfg: WebConfig | None = None,
              listen: str = "127.0.0.1:0", fast: Callable[[], Any] | None = None,
              **kw: Any) -> MetricsServer:
        srv = MetricsServer(registry, listen, cfg or WebConfig(**kw), fast=fast)
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.close()
