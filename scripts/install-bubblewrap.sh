#!/usr/bin/env bash
# Install bubblewrap from the distribution when `bwrap` is missing. Every
# process and sandbox job runs under bwrap, which gives it its own PID and
# mount namespaces. Also install iproute2 and iptables when missing: CRIU
# runs `ip` and `iptables-save`/`iptables-restore` to dump and restore the
# network namespace of a sandbox job with network "none".
set -euo pipefail
packages=()
command -v bwrap >/dev/null || packages+=(bubblewrap)
command -v ip >/dev/null || packages+=(iproute2)
command -v iptables-save >/dev/null || packages+=(iptables)
if [ "${#packages[@]}" -eq 0 ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "install-bubblewrap: missing ${packages[*]} and there is no apt-get; install those packages" >&2
    exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
bwrap --version
