#!/usr/bin/env bash
# Build a Debian root file system with python3 for the `container` runtime:
#   scripts/build-rootfs.sh DIR [SUITE]
# SUITE defaults to the host's codename. The mirror is the one this machine's
# apt already uses for that suite (from `apt-get indextargets`), so nothing
# here names a host. DIR is written only when the build succeeds, so an
# interrupted build never leaves a half-made root file system behind.
set -euo pipefail

target="${1:?usage: build-rootfs.sh DIR [SUITE]}"
suite="${2:-$(. /etc/os-release && echo "${VERSION_CODENAME:?}")}"

if [ -x "$target/usr/bin/python3" ]; then
    echo "build-rootfs: $target already has python3; remove it to build again"
    exit 0
fi
"$(dirname "$0")/install-runc.sh" --debootstrap >/dev/null

mirror="$(apt-get indextargets --format '$(REPO_URI) $(CODENAME) $(COMPONENT)' \
    | awk -v suite="$suite" '$2 == suite && $3 == "main" { print $1; exit }')"
if [ -z "$mirror" ]; then
    echo "build-rootfs: this machine's apt sources have no '$suite main' entry to take the mirror from; add one or pass another SUITE" >&2
    exit 1
fi

staging="$target.building"
rm -rf "$staging"
mkdir -p "$(dirname "$target")"
debootstrap --variant=minbase --include=python3 "$suite" "$staging" "$mirror"
rm -rf "$staging"/var/cache/apt/archives/*.deb
mv "$staging" "$target"
"$target/usr/bin/python3" --version
