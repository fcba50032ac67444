#!/usr/bin/env bash
# Install runc (the OCI runtime behind the `container` runtime) from the
# distribution when it is missing. With --debootstrap, also install
# debootstrap, which scripts/build-rootfs.sh uses to make a root file system.
set -euo pipefail

packages=()
command -v runc >/dev/null || packages+=(runc)
if [ "${1:-}" = "--debootstrap" ]; then
    command -v debootstrap >/dev/null || packages+=(debootstrap)
fi
if [ "${#packages[@]}" -eq 0 ]; then
    runc --version | head -1
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "install-runc: ${packages[*]} missing and there is no apt-get; install them with the system's package manager" >&2
    exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
runc --version | head -1
