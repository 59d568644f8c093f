"""deploy/kubernetes and deploy/container: the manifests parse and carry what memtrace
needs (hostPID, the capabilities of the systemd unit, the host mounts BCC needs,
resources, probes, ports, scrape annotations); the image installs memtrace from what
it copies.

Schema validation uses kubernetes-validate (PyPI; it ships the Kubernetes schemas)
when it is installed, and is skipped otherwise. kubeconform is in neither Debian nor
PyPI, and `kubectl apply --dry-run=client` needs a reachable API server, so without
kubernetes-validate the checks here are structural."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from .helpers import DEFAULT_PORT, DEPLOY, REPO, unit_capabilities

MANIFEST = DEPLOY / "kubernetes" / "daemonset.yaml"
CONTAINERFILE = DEPLOY / "container" / "Containerfile"
UNIT = DEPLOY / "systemd" / "memtrace.service"


@pytest.fixture(scope="module")
def docs() -> dict[str, dict[str, Any]]:
    with MANIFEST.open() as f:
        loaded = [d for d in yaml.safe_load_all(f) if d]
    by_kind = {d["kind"]: d for d in loaded}
    assert len(by_kind) == len(loaded), "one object of each kind expected"
    return by_kind


@pytest.fixture(scope="module")
def pod(docs) -> dict[str, Any]:
    return docs["DaemonSet"]["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def container(pod) -> dict[str, Any]:
    (c,) = pod["containers"]
    return c


def test_objects_and_namespace(docs):
    assert set(docs) == {"Namespace", "ServiceAccount", "ConfigMap", "DaemonSet", "Service"}
    ns = docs["Namespace"]["metadata"]["name"]
    for kind in ("ServiceAccount", "ConfigMap", "DaemonSet", "Service"):
        assert docs[kind]["metadata"]["namespace"] == ns, kind
    # hostPID and hostPath are beyond the baseline Pod Security Standard.
    labels = docs["Namespace"]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"


def test_daemonset_selects_its_pods(docs):
    ds = docs["DaemonSet"]
    selector = ds["spec"]["selector"]["matchLabels"]
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    assert docs["Service"]["spec"]["selector"].items() <= labels.items()


def test_host_pid_and_service_account(docs, pod):
    assert pod["hostPID"] is True
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is False


def test_capabilities_match_the_systemd_unit(container):
    sc = container["securityContext"]
    assert sc["runAsUser"] == 0  # memtrace refuses other users
    if sc.get("privileged"):
        return
    caps = sc["capabilities"]
    assert caps["drop"] == ["ALL"]
    assert {f"CAP_{c}" for c in caps["add"]} == unit_capabilities(UNIT)
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True


def test_host_mounts(pod, container):
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    host_paths = {}
    for path, m in mounts.items():
        v = volumes[m["name"]]
        if "hostPath" in v:
            host_paths[path] = v["hostPath"]["path"]
            assert m.get("readOnly") is True, f"{path} is mounted writable"
    # tracefs, where BCC 0.26 (debugfs) or newer BCC and memtrace look for it
    assert {"/sys/kernel/tracing", "/sys/kernel/debug"} & set(host_paths)
    # kernel headers: /lib/modules/$(uname -r)/build links into /usr/src
    assert host_paths.get("/lib/modules") == "/lib/modules"
    assert host_paths.get("/usr/src") == "/usr/src"
    # /proc comes with hostPID, not as a mount
    assert "/proc" not in mounts
    text = MANIFEST.read_text()
    for path in ("/sys/kernel/tracing", "/lib/modules", "/usr/src", "/sys/fs/bpf", "/proc"):
        assert re.search(rf"#.*{re.escape(path)}", text), f"no comment about {path}"


def test_resources(container):
    res = container["resources"]
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(res[part]), part
    # BCC's compile peaks at about 170 MiB resident.
    assert res["limits"]["memory"].endswith("Mi") and int(res["limits"]["memory"][:-2]) >= 256


def test_ports_and_probes(container, docs):
    (port,) = container["ports"]
    assert port["containerPort"] == DEFAULT_PORT and port["name"] == "metrics"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        assert get["port"] in ("metrics", DEFAULT_PORT) and get["path"] == "/metrics", probe
    (svc_port,) = docs["Service"]["spec"]["ports"]
    assert svc_port["port"] == DEFAULT_PORT and svc_port["targetPort"] in ("metrics",
                                                                          DEFAULT_PORT)
    assert docs["Service"]["spec"]["clusterIP"] == "None"  # headless


def test_scrape_annotations(docs):
    a = docs["DaemonSet"]["spec"]["template"]["metadata"]["annotations"]
    assert a["prometheus.io/scrape"] == "true"
    assert a["prometheus.io/port"] == str(DEFAULT_PORT)
    assert a["prometheus.io/path"] == "/metrics"


def test_command_runs_the_agent_with_the_configmap_options(docs, container):
    script = " ".join(container["command"] + container["args"])
    words = shlex.split(script)
    assert words[:2] == ["/bin/sh", "-c"]
    inner = shlex.split(" ".join(words[2:]))
    assert inner[:3] == ["exec", "memtrace", "agent"]
    assert f"--web.listen-address=0.0.0.0:{DEFAULT_PORT}" in inner
    assert inner[-1] == "$MEMTRACE_OPTS"
    assert container["envFrom"] == [{"configMapRef": {"name":
                                                      docs["ConfigMap"]["metadata"]["name"]}}]
    # The same default selection as /etc/default/memtrace.
    default = (DEPLOY / "systemd" / "memtrace.default").read_text()
    m = re.search(r'^MEMTRACE_OPTS="([^"]*)"', default, re.M)
    assert m and docs["ConfigMap"]["data"]["MEMTRACE_OPTS"] == m.group(1)


def test_manifest_validates_against_kubernetes_schemas():
    kv = pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate not installed (pip install kubernetes-validate); "
               "structural checks only")
    with MANIFEST.open() as f:
        objects = [d for d in yaml.safe_load_all(f) if d]
    for version in ("1.30.0", kv.latest_version()):
        for obj in objects:
            kv.validate(obj, version, strict=True)


def containerfile() -> str:
    return CONTAINERFILE.read_text()


def test_containerfile_base_and_packages():
    text = containerfile()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert re.fullmatch(r"(docker\.io/)?(library/)?debian:(12|bookworm)(-slim)?", base), base
    install = " ".join(re.findall(r"apt-get install[^&]*", text.replace("\\\n", " ")))
    for pkg in ("python3-bpfcc", "bpfcc-tools"):
        assert pkg in install.split(), pkg
    assert re.search(r"#.*headers.*\n(#.*\n)*", text, re.I) and "host" in text
    assert re.search(r"^EXPOSE\s+9877\b", text, re.M)
    assert re.search(r'^ENTRYPOINT\s+\["memtrace"\]', text, re.M)


def test_containerfile_copies_enough_to_install(tmp_path):
    """Build a wheel from exactly what the Containerfile copies (offline: no
    dependencies, the venv's setuptools) and check that it carries the CLI and the
    BPF sources."""
    src = tmp_path / "src"
    for line in re.findall(r"^COPY\s+(.+)$", containerfile(), re.M):
        *sources, dest = line.split()
        assert dest.startswith("/src"), line
        target = src / dest[len("/src"):].strip("/")
        for s in sources:
            path = REPO / s
            assert path.exists(), f"COPY {s}: not in the repository"
            if path.is_dir():
                subprocess.run(["cp", "-r", str(path), str(target)], check=True)
            else:
                target.mkdir(parents=True, exist_ok=True)
                subprocess.run(["cp", str(path), str(target)], check=True)
    out = tmp_path / "wheel"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                        "--no-build-isolation", "--no-cache-dir", "-q", "-w", str(out),
                        str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = Path(out).glob("memtrace_ebpf-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "memtrace/commands/main.py" in names
    assert "memtrace/bpf/memtrace.bpf.c" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    entry_text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "memtrace = memtrace.commands.main:main" in entry_text
