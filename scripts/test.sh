#!/usr/bin/env bash
# Run the test suite: installs CRIU and the Python dependencies first when missing.
# Extra arguments go to pytest, e.g. scripts/test.sh -k recovery
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-criu.sh
scripts/install-bubblewrap.sh
scripts/install-runsc.sh
# The container and podman runtimes' tests need runc and podman; they build their
# root file system (and import it into podman) on first use.
scripts/install-runc.sh --debootstrap
scripts/install-podman.sh
# The vm runtime's tests boot QEMU microVMs.
scripts/install-qemu.sh
# The state store's PostgreSQL tests run a throwaway cluster from Debian's package.
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
scripts/setup-venv.sh
# The guest image of the vm tests, built from Debian packages on the container
# tests' root file system; rebuilt only when the guest's init changes.
CHECKER_ROOTFS="${CHECKER_TEST_ROOTFS:-/var/cache/checker-tests/rootfs-bookworm}" scripts/build-vm-image.sh
exec .venv/bin/python -m pytest "$@"
