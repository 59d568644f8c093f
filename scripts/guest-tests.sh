#!/usr/bin/env bash
# The accuracy subset inside the 6.1 guest kernel. Run it from the host with
#   scripts/guest.sh scripts/guest-tests.sh [pytest args...]
# (.ci/run does). Inside the guest (root, in the repo) it prints the kernel
# version, runs `memtrace doctor` (which names the mechanisms memtrace uses
# here: the fallbacks on 6.1), then the root tests marked `guest`
# (pytest -m guest tests/root/accuracy -v -rA: pass/fail per test).
#
# The tests' scratch files (pytest --basetemp: the compiled workloads and the
# data files the file-mapping scenarios map) go to an ext4 file system on a
# loop device, so file mappings are page cache of a disk file system as on
# the host: the guest's /tmp is an overlay on tmpfs (its file pages would be
# shmem) and the repo is 9p (no shared writable mmap). Without loop or ext4
# the tests fall back to /tmp, with a warning.
#
# Transparent huge pages are set to `madvise`, the host's (and upstream's)
# default, instead of Debian's `always`: 6.1's smaps leaves out a PMD-mapped
# THP in a PROT_NONE mapping (its Rss and AnonHugePages drop by 2 MiB while
# pagemap, /proc/kpageflags and the RSS counters still have the pages;
# 6.18's smaps counts them), so under `always` the mprotect scenario's
# 'protnone-middle' point differs from smaps by exactly that THP, a kernel
# bug rather than memtrace's. The check below prints whether the running
# kernel has it.
#
# Environment: MT_TIMEOUT_SCALE (default 4: qemu TCG is slow) multiplies the
# harness's timeouts; GUEST_SCRATCH_MB (default 512) sizes the ext4 image,
# which lives in the guest's RAM (sparse, on tmpfs); GUEST_THP (default
# madvise) is written to /sys/kernel/mm/transparent_hugepage/enabled (pass
# it with GUEST_ENV=GUEST_THP).
# Exit status: pytest's; 1 if memtrace doctor fails or does not name the
# fallback on a kernel without PAGEMAP_SCAN (before 6.7).
set -uo pipefail

REPO="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd -P)"
cd "$REPO" || exit 1

if [[ $EUID -ne 0 ]]; then
    echo "guest-tests: error: must run as root (scripts/guest.sh runs it as root in the guest)" >&2
    exit 1
fi
export MT_TIMEOUT_SCALE="${MT_TIMEOUT_SCALE:-4}"
PY="$REPO/.venv/bin/python"
[[ -x $PY ]] || {
    echo "guest-tests: error: $REPO/.venv is missing; run: sudo scripts/setup.sh (on the host)" >&2
    exit 1
}
mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing || true

kver="$(uname -r)"
echo "== guest-tests: kernel $kver ($(nproc) CPUs, $(awk '/^MemTotal/ {printf "%d MiB", $2/1024}' /proc/meminfo)), MT_TIMEOUT_SCALE=$MT_TIMEOUT_SCALE"

# --- memtrace doctor: the mechanisms in use on this kernel ---------------------
echo "== guest-tests: memtrace doctor"
t0=$SECONDS
doctor_out="$("$REPO/.venv/bin/memtrace" doctor 2>&1)"
doctor_rc=$?
echo "$doctor_out"
echo "(memtrace doctor exit $doctor_rc, $((SECONDS - t0))s)"
doctor_failed=""
((doctor_rc == 0)) || doctor_failed="memtrace doctor exited $doctor_rc"
# Before 6.7 there is no PAGEMAP_SCAN: doctor must say memtrace falls back.
major=${kver%%.*} rest=${kver#*.}
minor=${rest%%[!0-9]*}
if ((major < 6 || (major == 6 && minor < 7))) &&
    ! grep -q 'mechanisms: resident pages: pagemap read + zero-page PFNs' <<<"$doctor_out"; then
    doctor_failed+="${doctor_failed:+; }memtrace doctor does not name the pagemap-read fallback on $kver"
fi

# --- transparent huge pages ---------------------------------------------------
thp=/sys/kernel/mm/transparent_hugepage/enabled
if [[ -w $thp ]]; then
    echo "== guest-tests: transparent huge pages: was '$(cat "$thp")'"
    echo "${GUEST_THP:-madvise}" >"$thp" || echo "guest-tests: WARNING: could not set $thp" >&2
    echo "== guest-tests: transparent huge pages: now '$(cat "$thp")'"
fi
# Does smaps count a PMD-mapped THP in a PROT_NONE mapping on this kernel?
python3 - <<'EOF' || true
import ctypes, re
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_long]
libc.madvise.argtypes = libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
M = 1 << 20
raw = libc.mmap(None, 4 * M, 3, 0x22, -1, 0)  # PROT_READ|WRITE, MAP_PRIVATE|ANONYMOUS
a = (raw + 2 * M - 1) & ~(2 * M - 1)  # one 2 MiB-aligned PMD inside
libc.madvise(a, 2 * M, 14)  # MADV_HUGEPAGE
ctypes.memset(a, 1, 2 * M)
libc.mprotect(a, 2 * M, 0)  # PROT_NONE


def rss_kb():
    cur = None
    for line in open("/proc/self/smaps"):
        m = re.match(r"([0-9a-f]+)-", line)
        if m:
            cur = int(m.group(1), 16)
        elif cur == a and line.startswith("Rss:"):
            return int(line.split()[1])


def present_kb():
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(a // 4096 * 8)
        data = f.read(512 * 8)
    return sum(data[i + 7] >> 7 for i in range(0, len(data), 8)) * 4


print("== guest-tests: a 2 MiB THP made PROT_NONE: smaps Rss %s kB, pagemap present %d kB (%s)"
      % (rss_kb(), present_kb(), "smaps leaves it out on this kernel" if rss_kb() != present_kb()
         else "smaps counts it"))
EOF

# --- scratch ext4 file system ------------------------------------------------
scratch=""
img=/run/memtrace-scratch.img
mnt=/run/memtrace-scratch
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
    if [[ -n $scratch ]]; then
        umount "$mnt" 2>/dev/null || true
        rm -f "$img"
    fi
}
trap cleanup EXIT
if modprobe loop 2>/dev/null && command -v mkfs.ext4 >/dev/null 2>&1; then
    mkdir -p "$mnt"
    if truncate -s "${GUEST_SCRATCH_MB:-512}M" "$img" &&
        mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$img" &&
        mount -o loop "$img" "$mnt"; then
        scratch="$mnt"
        echo "== guest-tests: scratch: ext4 on $(findmnt -n -o SOURCE "$mnt") at $mnt"
    else
        rm -f "$img"
    fi
fi
basetemp=()
if [[ -n $scratch ]]; then
    basetemp=(--basetemp "$scratch/pytest")
else
    echo "guest-tests: WARNING: no ext4 scratch (loop or mkfs.ext4 missing): tests use /tmp," \
        "an overlay on tmpfs, so file mappings are shmem there" >&2
fi

# --- the accuracy subset ------------------------------------------------------
echo "== guest-tests: pytest -m guest tests/root/accuracy"
t0=$SECONDS
"$PY" -u -m pytest -m guest tests/root/accuracy -v -rA --durations=0 -p no:cacheprovider \
    "${basetemp[@]}" "$@"
rc=$?
echo "== guest-tests: pytest exit $rc after $((SECONDS - t0))s on $kver"
if [[ -n $doctor_failed ]]; then
    echo "guest-tests: FAILED: $doctor_failed" >&2
    ((rc != 0)) || rc=1
fi
exit "$rc"
