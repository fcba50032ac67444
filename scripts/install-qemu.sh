#!/usr/bin/env bash
# Install QEMU's x86 system emulator and zstd from the distribution when
# missing. The `vm` runtime runs each job in a QEMU microvm and compresses its
# snapshots with zstd.
set -euo pipefail
if command -v qemu-system-x86_64 >/dev/null && command -v zstd >/dev/null; then
    qemu-system-x86_64 --version | head -n1
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "install-qemu: qemu-system-x86_64 or zstd is missing and there is no apt-get; install the qemu-system-x86 and zstd packages" >&2
    exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-system-x86 zstd >/dev/null
qemu-system-x86_64 --version | head -n1
