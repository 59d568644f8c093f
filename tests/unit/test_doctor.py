"""memtrace.commands.doctor: output format and the header-tree release detection."""

from __future__ import annotations

import os
from pathlib import Path

from memtrace.commands.doctor import Check, check_headers, headers_release, render


def test_render_marks_and_fixes():
    out = render(
        [
            Check("BCC", True, "bcc importable", fix="never shown when ok"),
            Check(
                "kernel headers",
                False,
                "missing: /lib/modules/x/build does not exist",
                "sudo scripts/setup.sh",
            ),
            Check("BTF", False, "cannot read", "a kernel with BTF", required=False),
            Check("PROCMAP_QUERY", False, "ioctl failed", required=False),
        ]
    )
    assert out.splitlines() == [
        "ok    BCC: bcc importable",
        "FAIL  kernel headers: missing: /lib/modules/x/build does not exist"
        " -- fix: sudo scripts/setup.sh",
        "warn  BTF: cannot read -- fix: a kernel with BTF",
        "warn  PROCMAP_QUERY: ioctl failed",
    ]


def test_render_empty():
    assert render([]) == ""


def test_headers_release_from_kernel_release_file(tmp_path):
    (tmp_path / "include" / "config").mkdir(parents=True)
    (tmp_path / "include" / "config" / "kernel.release").write_text("6.1.0-18-amd64\n")
    assert headers_release(tmp_path) == "6.1.0-18-amd64"


def test_headers_release_from_utsrelease(tmp_path):
    (tmp_path / "include" / "generated").mkdir(parents=True)
    (tmp_path / "include" / "generated" / "utsrelease.h").write_text(
        '#define UTS_RELEASE "6.12.9+bpo-cloud-amd64"\n'
    )
    assert headers_release(tmp_path) == "6.12.9+bpo-cloud-amd64"


def test_headers_release_prefers_utsrelease(tmp_path):
    """Debian's kernel.release holds the upstream version (6.1.192), UTS_RELEASE
    the release uname -r prints (6.1.0-56-amd64)."""
    (tmp_path / "include" / "config").mkdir(parents=True)
    (tmp_path / "include" / "generated").mkdir(parents=True)
    (tmp_path / "include" / "config" / "kernel.release").write_text("A\n")
    (tmp_path / "include" / "generated" / "utsrelease.h").write_text('#define UTS_RELEASE "B"\n')
    assert headers_release(tmp_path) == "B"


def test_headers_release_from_symlinked_directory_name(tmp_path):
    real = tmp_path / "usr" / "src" / "linux-headers-6.1.0-18-amd64"
    real.mkdir(parents=True)
    build = tmp_path / "lib" / "modules" / "6.18.0" / "build"
    build.parent.mkdir(parents=True)
    os.symlink(real, build)
    assert headers_release(build) == "6.1.0-18-amd64"


def test_headers_release_unknown(tmp_path):
    d = tmp_path / "some-tree"
    d.mkdir()
    assert headers_release(d) is None


def test_check_headers_missing_release():
    release = "0.0.0-memtrace-unit-test"
    assert not Path(f"/lib/modules/{release}").exists()
    c = check_headers(release)
    assert not c.ok and c.required
    assert c.name == "kernel headers"
    assert f"/lib/modules/{release}/build" in c.detail
    assert c.fix


def test_tracefs_mounted_but_unreadable_is_a_permission_problem(tmp_path, monkeypatch):
    """Without root, tracefs is mounted (0700) but its events are invisible: doctor
    must say permission, not "not mounted"."""
    import memtrace.commands.doctor as doctor

    mounts = tmp_path / "mounts"
    mounts.write_text("proc /proc proc rw 0 0\ntracefs /sys/kernel/tracing tracefs rw 0 0\n")
    monkeypatch.setattr(doctor, "tracefs_dir", lambda: None)
    check = doctor.check_tracepoints(str(mounts))
    assert not check.ok
    assert "permission" in check.detail and "not mounted" not in check.detail
    assert check.fix == "run with sudo"
    mounts.write_text("proc /proc proc rw 0 0\n")
    check = doctor.check_tracepoints(str(mounts))
    assert check.detail == "tracefs not mounted"
