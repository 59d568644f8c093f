#!/usr/bin/env bash
# Run a shell command inside Debian's 6.1 kernel, booted once under qemu:
#   scripts/guest.sh 'CMD'...          (set up first with: sudo scripts/guest-setup.sh)
#
# Boots .guest/kernel (made by scripts/guest-setup.sh) with virtme-ng under
# qemu's software emulation (TCG; this machine's /dev/kvm cannot run stock
# kernels), sharing the host's root filesystem read-only and the repo
# read-write, and runs CMD (the arguments joined by spaces, as with ssh) with
# bash -c as root in the repo. Exits with CMD's status; prints the guest's
# output (stdout and stderr, merged) on stdout.
#
# Environment:
#   GUEST_TIMEOUT  seconds for the whole run, boot included (default 1200);
#                  on expiry the guest is killed and the exit status is 124
#   GUEST_CPUS     guest CPUs (default 2)
#   GUEST_MEMORY   guest memory (default 2G)
#   GUEST_ENV      names of host variables to pass into the guest, space
#                  separated (CI and MEMTRACE_DEBUG always are, when set)
#   GUEST_APPEND   extra kernel command-line arguments
#   GUEST_QEMU_OPTS extra qemu arguments
#   GUEST_VERBOSE  1: show the kernel's boot log
# Exit status: CMD's; 124 on timeout; 125 when the guest did not run CMD to
# the end (setup missing, boot failure, kernel panic, wrong kernel).
set -euo pipefail

SCRIPT="$(readlink -f "${BASH_SOURCE[0]}")"
REPO="$(cd "$(dirname "$SCRIPT")/.." && pwd -P)"

# ---------------------------------------------------------------------------
# Guest side: scripts/guest.sh --inside RUNDIR (run by the guest's init)
# ---------------------------------------------------------------------------
if [[ ${1:-} == --inside ]]; then
    run=$2
    [[ $run == /* ]] || run="$REPO/$run"
    want="$(cat "$run/kver")"
    got="$(uname -r)"
    if [[ $got != "$want" ]]; then
        echo "guest.sh: error: the guest runs kernel $got, expected $want" >&2
        echo 125 >"$run/status"
        exit 125
    fi
    if ! mountpoint -q /sys/kernel/tracing; then
        mount -t tracefs tracefs /sys/kernel/tracing ||
            echo "guest.sh: WARNING: could not mount tracefs at /sys/kernel/tracing" >&2
    fi
    read -r up _ </proc/uptime
    echo "guest.sh: kernel $got up ${up}s, $(nproc) CPUs, $(awk '/^MemTotal/ {printf "%d MiB", $2/1024}' /proc/meminfo)" >&2
    # shellcheck disable=SC1091
    source "$run/env"
    export PYTHONUNBUFFERED=1
    cd "$REPO"
    rc=0
    bash -c "$(cat "$run/cmd")" || rc=$?
    echo "$rc" >"$run/status"
    exit "$rc"
fi

# ---------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------
die() {
    echo "guest.sh: error: $*" >&2
    exit 125
}

if (($# == 0)) || [[ $1 == -h || $1 == --help ]]; then
    echo "usage: scripts/guest.sh 'CMD'...   (runs CMD in the 6.1 guest kernel; see the script's header)" >&2
    exit 2
fi

GUEST="$REPO/.guest"
KDIR="$GUEST/kernel"
VENV="$GUEST/venv"
TIMEOUT="${GUEST_TIMEOUT:-1200}"
CPUS="${GUEST_CPUS:-2}"
MEMORY="${GUEST_MEMORY:-2G}"
[[ $TIMEOUT =~ ^[0-9]+$ && $TIMEOUT -gt 0 ]] || die "GUEST_TIMEOUT=$TIMEOUT is not a positive number of seconds"

[[ -r "$KDIR/STAMP" && -x "$VENV/bin/vng" ]] || die "the guest is not set up; run: sudo scripts/guest-setup.sh"
read -r KVER _ <"$KDIR/STAMP"
KIMG="$KDIR/boot/vmlinuz-$KVER"
[[ -r $KIMG ]] || die "$KIMG is missing; run: sudo scripts/guest-setup.sh"
command -v qemu-system-x86_64 >/dev/null 2>&1 || die "qemu-system-x86_64 not found; run: sudo scripts/guest-setup.sh"
command -v timeout >/dev/null 2>&1 || die "timeout (coreutils) not found"

# Devices qemu's q35 machine and its emulated CPU offer, whose modules udev
# would load at boot (about 25 s under TCG, kvm alone 12 s) though nothing in
# the guest uses them. modprobe.blacklist only stops loading by alias (udev);
# `modprobe NAME` still works.
BLACKLIST=kvm_amd,kvm_intel,kvm,ccp,irqbypass,crct10dif_pclmul,crc32_pclmul,crc32c_intel
BLACKLIST+=,ghash_clmulni_intel,sha512_ssse3,sha256_ssse3,sha1_ssse3,aesni_intel,sr_mod,cdrom,sg
BLACKLIST+=,ahci,libahci,libata,iTCO_wdt,intel_pmc_bxt,i6300esb,evdev,psmouse,i2c_i801,serio_raw
BLACKLIST+=,pcspkr,qemu_fw_cfg,lpc_ich,button

# Per-run dir on the shared, writable repo: the command, its environment, and
# the status the guest writes back (so a boot failure is told from CMD's own).
mkdir -p "$GUEST/runs"
RUN="$(mktemp -d "$GUEST/runs/run.XXXXXX")"
trap 'rm -rf "$RUN"' EXIT
printf '%s' "$*" >"$RUN/cmd"
echo "$KVER" >"$RUN/kver"
: >"$RUN/env"
for name in CI MEMTRACE_DEBUG ${GUEST_ENV:-}; do
    [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "GUEST_ENV: '$name' is not a variable name"
    if [[ -n ${!name+set} ]]; then
        printf 'export %s=%q\n' "$name" "${!name}" >>"$RUN/env"
    fi
done

vng_args=(
    --run "$KIMG"
    --disable-kvm # the paravirtual /dev/kvm here hangs on stock kernels
    --force-9p    # virtiofsd is unusable here; trying it costs 3 s
    --user root
    --cpus "$CPUS"
    --memory "$MEMORY"
    --rwdir "$REPO"
    --cwd "$REPO"
    --append "modprobe.blacklist=$BLACKLIST"
)
[[ -n ${GUEST_APPEND:-} ]] && vng_args+=(--append "$GUEST_APPEND")
[[ ${GUEST_VERBOSE:-0} == 1 ]] && vng_args+=(--verbose)
[[ -n ${GUEST_QEMU_OPTS:-} ]] && vng_args+=("--qemu-opts=$GUEST_QEMU_OPTS")

export PATH="$VENV/bin:$PATH"
start=$SECONDS
# qemu reopens its stdout/stderr with O_TRUNC, which would wipe a log file the
# caller redirected us to: give it a pipe. timeout signals its whole process
# group (vng, its shell, qemu) on expiry.
set +e
# Paths relative to the repo (the guest's cwd) keep the kernel command line,
# which carries this command, well under its 2048 bytes.
timeout -k 15 "$TIMEOUT" vng "${vng_args[@]}" -- \
    "bash scripts/guest.sh --inside $(printf '%q' "${RUN#"$REPO"/}")" </dev/null 2>&1 | cat
rcs=("${PIPESTATUS[@]}")
set -e
vng_rc=${rcs[0]}
elapsed=$((SECONDS - start))

if [[ -s "$RUN/status" ]]; then
    rc="$(cat "$RUN/status")"
    echo "guest.sh: exit $rc after ${elapsed}s" >&2
    exit "$rc"
fi
if ((vng_rc == 124 || vng_rc == 137)); then
    echo "guest.sh: error: timed out after ${TIMEOUT}s (GUEST_TIMEOUT); the guest was killed" >&2
    exit 124
fi
echo "guest.sh: error: the guest did not run the command to the end (vng exit $vng_rc after ${elapsed}s);" \
    "rerun with GUEST_VERBOSE=1 to see the kernel log" >&2
exit 125
