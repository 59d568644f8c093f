#!/usr/bin/env bash
# Set up this machine to build, run and test memtrace:  sudo scripts/setup.sh
#
# Installs BCC and kernel headers from the distribution (never BCC from PyPI),
# and the real daemons the tests run (nginx, PostgreSQL, wrk, redis; their services
# are not started: scripts/servers.sh runs private instances),
# mounts tracefs/debugfs, creates .venv (with system site packages, so that
# Debian's python3-bpfcc is importable), installs memtrace into it in editable
# mode with the dev tools, and links /usr/local/bin/memtrace. Idempotent: a
# second run installs nothing and takes a second or two.
set -euo pipefail

SCRIPT="$(readlink -f "${BASH_SOURCE[0]}")"
REPO="$(cd "$(dirname "$SCRIPT")/.." && pwd -P)"

if [[ $EUID -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        exec sudo -- bash "$SCRIPT" "$@"
    fi
    echo "error: scripts/setup.sh must run as root (sudo not found); run it as root" >&2
    exit 1
fi

trap 'echo "setup: FAILED (exit $?) at scripts/setup.sh line $LINENO: $BASH_COMMAND" >&2' ERR

cd "$REPO"
export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INPUT=1

START=$SECONDS
KREL="$(uname -r)"
KBUILD="/lib/modules/$KREL/build"
SYSTEM_PYTHON=/usr/bin/python3
changed=()

say() { echo "setup: $*"; }
warn() { echo "setup: WARNING: $*" >&2; }

# --------------------------------------------------------------------------
# (a) distribution packages
# --------------------------------------------------------------------------
if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: apt-get not found; scripts/setup.sh supports Debian and Ubuntu only" >&2
    exit 1
fi

is_installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" == installed ]]
}

# Kernel headers are satisfied when the running kernel has a usable build dir:
# its own headers package, or the symlink this script makes to the nearest ones.
# BCC needs the build tree and, when Debian splits them, the common source
# tree (include/linux/kconfig.h lives there).
headers_ok() {
    [[ -f "$KBUILD/Makefile" ]] &&
        { [[ -f "$KBUILD/include/linux/kconfig.h" ]] ||
          [[ -f "/lib/modules/$KREL/source/include/linux/kconfig.h" ]]; }
}

# Fallback headers meta-package when the exact linux-headers-$(uname -r) is unknown.
generic_headers_pkg() {
    local id="" id_like="" arch
    if [[ -r /etc/os-release ]]; then
        # shellcheck disable=SC1091
        id="$(. /etc/os-release && echo "${ID:-}")"
        # shellcheck disable=SC1091
        id_like="$(. /etc/os-release && echo "${ID_LIKE:-}")"
    fi
    if [[ $id == ubuntu || " $id_like " == *" ubuntu "* ]]; then
        echo linux-headers-generic
        return
    fi
    arch="$(dpkg --print-architecture)"
    case "$arch" in
        amd64 | arm64 | s390x | riscv64 | loong64) echo "linux-headers-$arch" ;;
        i386) echo linux-headers-686-pae ;;
        armhf) echo linux-headers-armmp ;;
        armel) echo linux-headers-marvell ;;
        ppc64el) echo linux-headers-powerpc64le ;;
        mips64el) echo linux-headers-5kc-malta ;;
        *) echo "linux-headers-$arch" ;;
    esac
}

PKGS=(bpfcc-tools python3-bpfcc python3-venv gcc libc6-dev make)
PKGS+=(python3-pyelftools binutils libc6-dbg)  # --stacks: CFI and symbols (pyelftools), c++filt (binutils), libc's local function names (libc6-dbg, by build-id)
PKGS+=(prometheus python3-seccomp)  # tests/unit/deploy: promtool; tests/root/deploy: seccomp for the unit sandbox test (no service left running: deploy/README.md)
PKGS+=(libjemalloc2 musl-tools)  # tests/root/heap: a jemalloc and a musl program are detected as not glibc
PKGS+=(python3.11-dev)  # --stacks Python frames: tests/unit/stacks/test_pyoffsets.py checks the CPython 3.11 offsets against its headers
PKGS+=(chromium golang-go)  # stack views (issue 13): headless Chromium draws the flame graph (tests/root/stacks), `go tool pprof` reads the pprof output (tests/unit/test_stack_pprof_go.py)
PKGS+=(nginx postgresql wrk)  # real forked daemons (scripts/servers.sh, tests/root/accuracy/test_real_servers.py); their services are not started (below)
PKGS+=(nodejs openjdk-17-jdk-headless)  # managed runtimes: test_jit_root.py (V8's frame pointers, node --perf-basic-prof), test_real_runtimes.py (a JVM with ZGC, node)
PKGS+=(redis-server redis-tools)  # issue 14: a real program under load for `memtrace report` (tests/root/reports: redis-server under redis-benchmark); its service is not started (below)
missing=()
for p in "${PKGS[@]}"; do
    is_installed "$p" || missing+=("$p")
done

# Packages with services (nginx, postgresql, redis-server) must not start them: their
# postinst calls invoke-rc.d, which asks /usr/sbin/policy-rc.d; exit 101 there
# means "do not start". The tests start private instances (scripts/servers.sh)
# and the system's own ones would hold ports 80 and 5432. An existing
# policy-rc.d is put back afterwards.
POLICY=/usr/sbin/policy-rc.d
POLICY_SAVED=""
deny_service_starts() {
    if [[ -e $POLICY ]]; then
        POLICY_SAVED="$(mktemp)"
        cp -p "$POLICY" "$POLICY_SAVED"
    fi
    trap allow_service_starts EXIT
    printf '#!/bin/sh\n# scripts/setup.sh: no service starts while it installs packages\nexit 101\n' >"$POLICY"
    chmod 755 "$POLICY"
}
allow_service_starts() {
    trap - EXIT
    if [[ -n $POLICY_SAVED ]]; then
        cp -p "$POLICY_SAVED" "$POLICY"
        rm -f "$POLICY_SAVED"
        POLICY_SAVED=""
    else
        rm -f "$POLICY"
    fi
}

if ((${#missing[@]})) || ! headers_ok; then
    say "apt-get update"
    apt-get update -qq
    if ! headers_ok; then
        hdr="linux-headers-$KREL"
        if ! apt-cache show --no-all-versions "$hdr" >/dev/null 2>&1; then
            hdr="$(generic_headers_pkg)"
            say "no package linux-headers-$KREL; using $hdr"
        fi
        is_installed "$hdr" || missing+=("$hdr")
    fi
    if ((${#missing[@]})); then
        say "apt-get install ${missing[*]}"
        deny_service_starts
        apt-get install -y -qq -o Dpkg::Use-Pty=0 "${missing[@]}" >/dev/null
        allow_service_starts
        changed+=("installed ${missing[*]}")
    fi
fi

# Newest /usr/src/linux-headers-* that can build (has a Makefile and generated
# headers): the arch-specific dir (…-amd64), not …-common. Plain flavours first.
pick_headers_dir() {
    local d cands=()
    for d in /usr/src/linux-headers-*; do
        [[ -f "$d/Makefile" ]] || continue
        if [[ -d "$d/include/generated" ]] || compgen -G "$d/arch/*/include/generated" >/dev/null; then
            cands+=("$d")
        fi
    done
    ((${#cands[@]})) || return 1
    local plain
    plain="$(printf '%s\n' "${cands[@]}" | grep -Ev -- '-(rt|cloud)-' | sort -V | tail -n1 || true)"
    if [[ -n $plain ]]; then
        echo "$plain"
    else
        printf '%s\n' "${cands[@]}" | sort -V | tail -n1
    fi
}

if ! headers_ok; then
    if hdir="$(pick_headers_dir)"; then
        hver="${hdir#/usr/src/linux-headers-}"
        if mkdir -p "/lib/modules/$KREL" && ln -sfn "$hdir" "$KBUILD"; then
            changed+=("linked $KBUILD")
            # Debian splits headers into -ARCH and -common: link source too.
            if [[ -e "/lib/modules/$hver/source" ]]; then
                ln -sfn "$(readlink -f "/lib/modules/$hver/source")" "/lib/modules/$KREL/source"
            elif [[ -d "${hdir%-*}-common" ]]; then
                ln -sfn "${hdir%-*}-common" "/lib/modules/$KREL/source"
            fi
            warn "no kernel headers for the running kernel $KREL; linked $KBUILD -> $hdir" \
                "(headers $hver). The headers are mismatched, which works because memtrace" \
                "only reads tracepoint arguments."
        else
            warn "could not create $KBUILD -> $hdir; BCC will not find kernel headers"
        fi
    else
        warn "no usable kernel headers under /usr/src; BCC will not be able to compile"
    fi
elif [[ -L $KBUILD ]]; then
    target="$(readlink -f "$KBUILD")"
    if [[ $target == /usr/src/linux-headers-* && $target != "/usr/src/linux-headers-$KREL" ]]; then
        say "note: kernel $KREL uses mismatched headers ${target#/usr/src/linux-headers-} (fine: tracepoints only)"
    fi
fi

# --------------------------------------------------------------------------
# (b) tracefs and debugfs
# --------------------------------------------------------------------------
if ! mountpoint -q /sys/kernel/tracing; then
    if mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null; then
        changed+=("mounted tracefs")
    else
        warn "could not mount tracefs at /sys/kernel/tracing; BPF tracepoints will not work"
    fi
fi
if ! mountpoint -q /sys/kernel/debug; then
    if mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null; then
        changed+=("mounted debugfs")
    else
        say "note: could not mount debugfs at /sys/kernel/debug (not needed with tracefs)"
    fi
fi

# --------------------------------------------------------------------------
# (c) .venv with system site packages + editable install with dev tools
# --------------------------------------------------------------------------
VENV="$REPO/.venv"
venv_ok() {
    [[ -x "$VENV/bin/python" && -f "$VENV/pyvenv.cfg" ]] &&
        grep -Eq '^include-system-site-packages *= *true' "$VENV/pyvenv.cfg" &&
        "$VENV/bin/python" -c 'import sys; sys.exit(sys.base_prefix != "/usr")' 2>/dev/null
}
if ! venv_ok; then
    if [[ -e $VENV ]]; then
        say "recreating .venv (missing system site packages or broken)"
        rm -rf "$VENV"
    fi
    "$SYSTEM_PYTHON" -m venv --system-site-packages "$VENV"
    changed+=("created .venv")
fi

# Reinstall only when something that shapes the install changed: pyproject.toml,
# setup.py, or the set of packages (an editable install maps packages by name).
stamp_input() {
    cat pyproject.toml setup.py 2>/dev/null
    { find memtrace bpf -name __init__.py 2>/dev/null || true; } | LC_ALL=C sort
}
STAMP="$VENV/.memtrace-install-stamp"
want="$(stamp_input | sha256sum | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"
if [[ $want != "$have" || ! -x "$VENV/bin/memtrace" ]]; then
    say "pip install -e '.[dev]'"
    rm -f "$STAMP"
    # Drop pip's noise about missing local index dirs from machine-wide pip config.
    { "$VENV/bin/pip" install -q -e '.[dev]' 2>&1 1>&3 |
        { grep -v 'is ignored: it is neither a file nor a directory' || true; } >&2; } 3>&1
    echo "$want" >"$STAMP"
    changed+=("installed memtrace into .venv")
fi

# Bytecode for memtrace's own modules: an editable install compiles none, and
# where bytecode is not written at import (PYTHONDONTWRITEBYTECODE, a read-only
# checkout) every start compiled about 60 modules again: 0.45 s to start instead
# of 0.14 s (measured: `memtrace --version`). Only stale files are rewritten, and
# Python ignores a .pyc older than its source.
if ! "$VENV/bin/python" -m compileall -q -j 0 memtrace >/dev/null; then
    warn "could not write bytecode under memtrace/ (each start compiles it again)"
fi

# When run via sudo from a user's checkout, leave .venv owned by that user.
owner="$(stat -c %u "$REPO")"
if [[ $owner != 0 ]] && ((${#changed[@]})); then
    chown -R "$owner:$(stat -c %g "$REPO")" "$VENV"
fi
if [[ $owner != 0 ]]; then
    find memtrace -name __pycache__ -type d -exec chown -R "$owner:$(stat -c %g "$REPO")" {} +
fi

# --------------------------------------------------------------------------
# (d) /usr/local/bin/memtrace
# --------------------------------------------------------------------------
# Linked when missing, dangling (its clone was deleted) or MEMTRACE_RELINK=1; a
# link into another clone that still exists is left alone, so that a throwaway
# clone (a CI run in a temporary folder) does not take the system command.
LINK=/usr/local/bin/memtrace
if [[ "$(readlink "$LINK" 2>/dev/null || true)" != "$VENV/bin/memtrace" ]]; then
    if [[ -e $LINK && ! -L $LINK ]]; then
        warn "$LINK exists and is not a symlink; left alone"
    elif [[ -L $LINK && -e $LINK && ${MEMTRACE_RELINK:-0} != 1 ]]; then
        say "note: $LINK -> $(readlink "$LINK") (another clone) left alone;" \
            "MEMTRACE_RELINK=1 scripts/setup.sh points it here"
    else
        mkdir -p /usr/local/bin
        ln -sfn "$VENV/bin/memtrace" "$LINK"
        changed+=("linked $LINK")
    fi
fi

# --------------------------------------------------------------------------
# (e) verify and summarise
# --------------------------------------------------------------------------
if ! bcc_ver="$("$VENV/bin/python" -c 'import bcc; print(getattr(bcc, "__version__", "?"))' 2>&1)"; then
    echo "error: .venv/bin/python cannot import bcc (Debian package python3-bpfcc):" >&2
    echo "$bcc_ver" >&2
    exit 1
fi

hdr_desc="none"
[[ -e $KBUILD ]] && hdr_desc="$(readlink -f "$KBUILD")"
say "kernel $KREL, headers $hdr_desc"
say "python $("$VENV/bin/python" -c 'import platform; print(platform.python_version())'), bcc $bcc_ver, venv $VENV"
say "command $LINK -> $(readlink "$LINK" 2>/dev/null || echo '(not linked)')"
if ((${#changed[@]})); then
    say "changed: $(IFS=';'; echo "${changed[*]}" | sed 's/;/; /g')"
else
    say "nothing to change"
fi
say "done in $((SECONDS - START))s. Test with: sudo scripts/test.sh"
