#!/usr/bin/env bash
# Build the guest image of the `vm` runtime from Debian packages:
#   scripts/build-vm-image.sh [DIR]
# DIR (default /opt/checker/vm) gets vmlinuz, initramfs.cpio and image.json.
#
# The kernel is the one Debian's linux-image-cloud-amd64 package depends on,
# downloaded through this machine's apt configuration and extracted, never
# installed. The root file system is a debootstrap minbase with python3 from
# scripts/build-rootfs.sh, cached in CHECKER_ROOTFS. The guest's init is
# checker/runtimes/vmguest.py; the image is built again when that file changes.
#
# Environment:
#   CHECKER_ROOTFS   root file system directory (default /var/cache/checker/rootfs-CODENAME)
set -euo pipefail
cd "$(dirname "$0")/.."

. /etc/os-release
CODENAME="${VERSION_CODENAME:?/etc/os-release has no VERSION_CODENAME}"
OUTPUT="${1:-/opt/checker/vm}"
ROOTFS="${CHECKER_ROOTFS:-/var/cache/checker/rootfs-$CODENAME}"
KERNEL_CACHE=/var/cache/checker/vm-kernel

log() { printf 'build-vm-image: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "debootstrap needs root; run this script as root"

stamp="$(cat checker/runtimes/vmguest.py checker/runtimes/vmimage.py | sha256sum | cut -d' ' -f1)"
if [ -f "$OUTPUT/image.json" ] && [ "$(cat "$OUTPUT/built-from" 2>/dev/null)" = "$stamp" ]; then
    log "$OUTPUT is up to date; nothing to do"
    exit 0
fi

package="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ { print $2; exit }')"
if [ -z "$package" ]; then
    apt-get update -qq
    package="$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ { print $2; exit }')"
fi
[ -n "$package" ] || die "apt knows no linux-image-cloud-amd64 package; add the $CODENAME main archive to /etc/apt"

if [ ! -d "$KERNEL_CACHE/$package/boot" ]; then
    work="$(mktemp -d /tmp/checker-vm-kernel.XXXXXX)"
    trap 'rm -rf "$work"' EXIT
    log "downloading $package"
    (cd "$work" && apt-get download -qq "$package" 2>"$work/apt.log") || { cat "$work/apt.log" >&2; die "could not download $package"; }
    dpkg-deb -x "$work"/"$package"_*.deb "$work/root"
    mkdir -p "$KERNEL_CACHE"
    rm -rf "${KERNEL_CACHE:?}/$package"
    mv "$work/root" "$KERNEL_CACHE/$package"
fi

scripts/build-rootfs.sh "$ROOTFS" "$CODENAME" >/dev/null
PYTHON="$(command -v python3 || echo .venv/bin/python)"
"$PYTHON" -m checker.runtimes.vmimage --kernel-package "$KERNEL_CACHE/$package" --rootfs "$ROOTFS" --output "$OUTPUT"
printf '%s\n' "$stamp" >"$OUTPUT/built-from"
