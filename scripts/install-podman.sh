#!/usr/bin/env bash
# Install podman and runc from the distribution when missing. The `podman`
# runtime drives podman with runc as its OCI runtime.
set -euo pipefail
"$(dirname "$0")/install-runc.sh" >/dev/null
if command -v podman >/dev/null; then
    podman --version
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "install-podman: podman is missing and there is no apt-get; install the podman package" >&2
    exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends podman >/dev/null
podman --version
