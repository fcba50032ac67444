#!/usr/bin/env bash
# Install bubblewrap from the distribution when `bwrap` is missing. Every job
# runs under bwrap, which gives it its own PID and mount namespaces.
set -euo pipefail
if command -v bwrap >/dev/null; then
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "install-bubblewrap: bwrap is missing and there is no apt-get; install the bubblewrap package" >&2
    exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null
bwrap --version
