#!/usr/bin/env bash
# Prepare this machine to run commands inside Debian's 6.1 kernel under qemu
# (software emulation, no KVM), for CI:  sudo scripts/guest-setup.sh
#
# Installs qemu and what virtme-ng needs in the guest (apt), the 6.1 kernel
# headers if missing, downloads the matching linux-image .deb and unpacks it
# into <repo>/.guest/kernel (never into /boot or /lib/modules: the host's
# bootloader and module tree are left alone), and installs virtme-ng into its
# own venv <repo>/.guest/venv. The guest sees the unpacked modules at
# /lib/modules/$KVER because virtme-ng exports .guest/kernel/lib/modules/$KVER
# to it; that dir carries `build` and `source` links to the headers in
# /usr/src, so BCC inside the guest compiles against the exact headers.
#
# The kernel ABI ($KVER, e.g. 6.1.0-56-amd64) is the one of the newest
# installed linux-headers-*-amd64 package whose linux-image is still in the
# apt sources at the same version; failing that, the one Debian's
# linux-headers-amd64 points to now (its headers are then installed).
# Override with GUEST_KVER=6.1.0-NN-amd64.
#
# Idempotent: a second run changes nothing and asks no registry. Then run
# commands with scripts/guest.sh.
set -euo pipefail

SCRIPT="$(readlink -f "${BASH_SOURCE[0]}")"
REPO="$(cd "$(dirname "$SCRIPT")/.." && pwd -P)"

if [[ $EUID -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        exec sudo -- bash "$SCRIPT" "$@"
    fi
    echo "guest-setup: error: must run as root (sudo not found)" >&2
    exit 1
fi

trap 'echo "guest-setup: FAILED (exit $?) at scripts/guest-setup.sh line $LINENO: $BASH_COMMAND" >&2' ERR

die() {
    trap - ERR
    echo "guest-setup: error: $*" >&2
    exit 1
}
say() { echo "guest-setup: $*"; }

VIRTME_NG_VERSION=1.42
GUEST="$REPO/.guest"
KDIR="$GUEST/kernel"
VENV="$GUEST/venv"
SYSTEM_PYTHON=/usr/bin/python3
START=$SECONDS
changed=()

export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INPUT=1

command -v apt-get >/dev/null 2>&1 || die "apt-get not found; the 6.1 guest needs Debian 12 (bookworm) packages"
ARCH="$(dpkg --print-architecture)"
[[ $ARCH == amd64 ]] || die "only amd64 hosts are supported (this is $ARCH)"

is_installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" == installed ]]
}
installed_version() {
    dpkg-query -W -f='${Version}' "$1" 2>/dev/null
}

apt_updated=0
apt_update() {
    if ((!apt_updated)); then
        say "apt-get update"
        apt-get update -qq || die "apt-get update failed"
        apt_updated=1
    fi
}
apt_install() {
    say "apt-get install $*"
    local log
    log="$(mktemp)"
    if ! apt-get install -y -qq --no-install-recommends -o Dpkg::Use-Pty=0 "$@" >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        rm -f "$log"
        die "apt-get install $* failed"
    fi
    rm -f "$log"
    changed+=("installed $*")
}

# --------------------------------------------------------------------------
# (a) host packages: qemu (TCG), busybox and udev/kmod for virtme-ng's init,
#     file (virtme-ng reads the kernel version with it), python3-venv
# --------------------------------------------------------------------------
PKGS=(qemu-system-x86 busybox-static udev kmod file python3-venv)
missing=()
for p in "${PKGS[@]}"; do
    is_installed "$p" || missing+=("$p")
done
if ((${#missing[@]})); then
    apt_update
    apt_install "${missing[@]}"
fi

# --------------------------------------------------------------------------
# (b) choose the kernel ABI and make sure its headers are installed
# --------------------------------------------------------------------------
# Installed linux-headers-<abi>-amd64 packages, newest first, as "abi version".
installed_header_abis() {
    dpkg-query -W -f='${Package} ${Version} ${db:Status-Status}\n' 'linux-headers-*-amd64' 2>/dev/null |
        awk '$3 == "installed" && $1 ~ /^linux-headers-[0-9]/ {sub(/^linux-headers-/, "", $1); print $1, $2}' |
        sort -rV
}
# True when linux-image-$1 version $2 is in the apt sources.
image_available() {
    apt-cache madison "linux-image-$1" 2>/dev/null | awk -F'|' '{gsub(/ /, "", $2); print $2}' | grep -qxF -- "$2"
}

STAMP="$KDIR/STAMP" # "KVER VERSION" of the unpacked image
stamp="$(cat "$STAMP" 2>/dev/null || true)"
KVER="" KVERSION=""
if [[ -n $stamp ]]; then
    read -r s_kver s_ver <<<"$stamp"
    # Fast path: the unpacked image still matches installed headers (or the override).
    if [[ -z ${GUEST_KVER:-} || $GUEST_KVER == "$s_kver" ]] &&
        [[ "$(installed_version "linux-headers-$s_kver")" == "$s_ver" ]] &&
        [[ -f "$KDIR/boot/vmlinuz-$s_kver" && -f "$KDIR/lib/modules/$s_kver/modules.dep" ]]; then
        KVER=$s_kver KVERSION=$s_ver
    fi
fi

if [[ -z $KVER ]]; then
    if [[ -n ${GUEST_KVER:-} ]]; then
        [[ $GUEST_KVER =~ ^[0-9][0-9.]*-[0-9]+-amd64$ ]] || die "GUEST_KVER=$GUEST_KVER is not like 6.1.0-56-amd64"
        KVER=$GUEST_KVER
        KVERSION="$(installed_version "linux-headers-$KVER" || true)"
        if [[ -z $KVERSION ]]; then
            apt_update
            apt-cache show "linux-headers-$KVER" >/dev/null 2>&1 ||
                die "no package linux-headers-$KVER in the apt sources"
            apt_install "linux-headers-$KVER"
            KVERSION="$(installed_version "linux-headers-$KVER")"
        fi
    else
        pick_installed() {
            local abi ver
            while read -r abi ver; do
                [[ -n $abi ]] || continue
                if image_available "$abi" "$ver"; then
                    KVER=$abi KVERSION=$ver
                    return 0
                fi
            done < <(installed_header_abis)
            return 1
        }
        if ! pick_installed; then
            apt_update
            if ! pick_installed; then
                # No installed headers with a downloadable image: take Debian's current ABI.
                abi="$(apt-cache depends linux-headers-amd64 2>/dev/null |
                    sed -n 's/^ *Depends: linux-headers-\([0-9][^ ]*-amd64\)$/\1/p' | head -n1)"
                [[ -n $abi ]] || die "cannot resolve linux-headers-amd64 to a kernel ABI (are Debian 12 sources configured?)"
                [[ -n "$(installed_header_abis)" ]] &&
                    say "installed kernel headers have no matching linux-image in the apt sources; using $abi"
                apt_install "linux-headers-$abi"
                KVER=$abi KVERSION="$(installed_version "linux-headers-$abi")"
            fi
        fi
    fi
fi
[[ -n $KVER && -n $KVERSION ]] || die "could not determine the guest kernel version"
HDR="/usr/src/linux-headers-$KVER"
[[ -f $HDR/Makefile ]] || die "headers $HDR missing although linux-headers-$KVER is installed"

# --------------------------------------------------------------------------
# (c) linux-image-$KVER unpacked into .guest/kernel (not installed)
# --------------------------------------------------------------------------
if [[ "$stamp" != "$KVER $KVERSION" || ! -f "$KDIR/boot/vmlinuz-$KVER" || ! -f "$KDIR/lib/modules/$KVER/modules.dep" ]]; then
    if ! image_available "$KVER" "$KVERSION"; then
        apt_update
        image_available "$KVER" "$KVERSION" ||
            die "linux-image-$KVER=$KVERSION (matching the installed headers) is not in the apt sources; install newer headers (apt-get install linux-headers-amd64) and rerun"
    fi
    mkdir -p "$GUEST"
    NEW="$GUEST/kernel.new"
    DL="$GUEST/download"
    rm -rf "$NEW" "$DL"
    mkdir -p "$NEW" "$DL"
    say "apt-get download linux-image-$KVER=$KVERSION"
    (cd "$DL" && apt-get download -qq -o APT::Sandbox::User=root "linux-image-$KVER=$KVERSION") ||
        die "apt-get download linux-image-$KVER=$KVERSION failed"
    deb="$(compgen -G "$DL/linux-image-${KVER}_*.deb" | head -n1)"
    [[ -n $deb ]] || die "apt-get download left no linux-image-$KVER .deb in $DL"
    dpkg-deb -x "$deb" "$NEW" || die "dpkg-deb -x $deb failed"
    [[ -f "$NEW/boot/vmlinuz-$KVER" && -d "$NEW/lib/modules/$KVER" ]] ||
        die "$deb has no boot/vmlinuz-$KVER or lib/modules/$KVER"
    # The .deb leaves modules.dep & co. to its postinst.
    depmod -b "$NEW" "$KVER" || die "depmod -b $NEW $KVER failed"
    # Headers for BCC inside the guest: the same links linux-headers-$KVER makes.
    src="$(readlink -f "/lib/modules/$KVER/source" 2>/dev/null || true)"
    [[ -n $src && -d $src ]] || src="/usr/src/linux-headers-${KVER%-amd64}-common"
    ln -sfn "$HDR" "$NEW/lib/modules/$KVER/build"
    [[ -d $src ]] && ln -sfn "$src" "$NEW/lib/modules/$KVER/source"
    echo "$KVER $KVERSION" >"$NEW/STAMP"
    rm -rf "$KDIR" "$DL"
    mv "$NEW" "$KDIR"
    changed+=("unpacked linux-image-$KVER $KVERSION into .guest/kernel")
fi

# --------------------------------------------------------------------------
# (d) virtme-ng in its own venv
# --------------------------------------------------------------------------
vng_version() {
    "$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("virtme-ng"))' 2>/dev/null
}
if [[ "$(vng_version || true)" != "$VIRTME_NG_VERSION" || ! -x "$VENV/bin/vng" ]]; then
    if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
        rm -rf "$VENV"
        "$SYSTEM_PYTHON" -m venv "$VENV" || die "$SYSTEM_PYTHON -m venv $VENV failed"
    fi
    say "pip install virtme-ng==$VIRTME_NG_VERSION"
    # Drop pip's noise about missing local index dirs from machine-wide pip config.
    { "$VENV/bin/pip" install -q "virtme-ng==$VIRTME_NG_VERSION" 2>&1 1>&3 |
        { grep -v 'is ignored: it is neither a file nor a directory' || true; } >&2; } 3>&1 ||
        die "pip install virtme-ng==$VIRTME_NG_VERSION into $VENV failed"
    [[ "$(vng_version || true)" == "$VIRTME_NG_VERSION" ]] || die "virtme-ng $VIRTME_NG_VERSION is not importable from $VENV"
    changed+=("installed virtme-ng $VIRTME_NG_VERSION into .guest/venv")
fi

# When run via sudo from a user's checkout, leave .guest owned by that user.
owner="$(stat -c %u "$REPO")"
if [[ $owner != 0 ]] && ((${#changed[@]})); then
    chown -R "$owner:$(stat -c %g "$REPO")" "$GUEST"
fi

# --------------------------------------------------------------------------
# (e) summary
# --------------------------------------------------------------------------
command -v qemu-system-x86_64 >/dev/null 2>&1 || die "qemu-system-x86_64 not found after installing qemu-system-x86"
say "guest kernel $KVER ($KVERSION): .guest/kernel/boot/vmlinuz-$KVER, headers $HDR"
say "virtme-ng $VIRTME_NG_VERSION in .guest/venv, $(qemu-system-x86_64 --version | head -n1)"
if ((${#changed[@]})); then
    printf -v joined '%s; ' "${changed[@]}"
    say "changed: ${joined%; }"
else
    say "nothing to change"
fi
say "done in $((SECONDS - START))s. Run a command in the guest with: scripts/guest.sh 'uname -r'"
