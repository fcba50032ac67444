#!/usr/bin/env bash
# Install a CRIU >= 4.2 under a project-owned prefix (default /opt/checker).
#
# Kernel 6.16 changed SO_PASSCRED, and CRIU releases before 4.2 fail to dump a
# process that holds any inet socket on such kernels. Debian 12 ships 3.17,
# which also fails `criu check` on recent kernels, so on Debian 12 this script
# builds Debian unstable's criu source package. On Debian 13 and newer the
# distribution's own package is new enough and is used as it is.
#
# The build is skipped when PREFIX/bin/criu already reports >= 4.2 and passes
# `criu check`. The result is PREFIX/bin/criu; Checker finds it there.
#
# Environment:
#   CHECKER_PREFIX   install prefix (default /opt/checker)
#   CRIU_MIN_VERSION minimum accepted version (default 4.2)
set -euo pipefail

PREFIX="${CHECKER_PREFIX:-/opt/checker}"
MIN_VERSION="${CRIU_MIN_VERSION:-4.2}"
TARGET="$PREFIX/bin/criu"

log() { printf 'install-criu: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Print "X.Y.Z" for a criu binary, or nothing when it does not run.
criu_version() {
    "$1" --version 2>/dev/null | sed -n 's/^Version: *\([0-9.]*\).*/\1/p' | head -n1
}

version_at_least() {
    [ -n "$1" ] && [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]
}

binary_is_good() {
    local binary="$1" version
    [ -x "$binary" ] || return 1
    version="$(criu_version "$binary")"
    version_at_least "$version" "$MIN_VERSION" || return 1
    "$binary" check >/dev/null 2>&1 || return 1
}

if [ "$(id -u)" -ne 0 ]; then
    die "CRIU needs root to install and to run; run this script as root"
fi

if binary_is_good "$TARGET"; then
    log "CRIU $(criu_version "$TARGET") at $TARGET passes 'criu check'; nothing to do"
    exit 0
fi

. /etc/os-release
[ "${ID:-}" = debian ] || die "unsupported distribution '${ID:-unknown}'; install CRIU >= $MIN_VERSION yourself and set CHECKER_CRIU to its path"
DEBIAN_MAJOR="${VERSION_ID%%.*}"
mkdir -p "$PREFIX/bin"

export DEBIAN_FRONTEND=noninteractive
APT_UPDATED="$PREFIX/.apt-updated"
apt_update_once() {
    if [ ! -e "$APT_UPDATED" ] || [ -n "$(find "$APT_UPDATED" -mmin +720 2>/dev/null)" ]; then
        apt-get update -qq
        touch "$APT_UPDATED"
    fi
}

if [ -n "$DEBIAN_MAJOR" ] && [ "$DEBIAN_MAJOR" -ge 13 ]; then
    log "Debian $VERSION_ID: installing the distribution's criu package"
    apt_update_once
    apt-get install -y -qq criu >/dev/null
    ln -sf /usr/sbin/criu "$TARGET"
    binary_is_good "$TARGET" || die "the distribution's criu ($(criu_version /usr/sbin/criu)) is older than $MIN_VERSION or fails 'criu check'"
    log "using /usr/sbin/criu $(criu_version "$TARGET") through $TARGET"
    exit 0
fi

log "Debian ${VERSION_ID:-unknown}: building criu from Debian unstable's source package"

. "$(dirname "$0")/debian-archive.sh"
ARCHIVE="$(archive_uri | head -n1)"
[ -n "$ARCHIVE" ] || die "found no Debian archive for '$VERSION_CODENAME' in /etc/apt; add one, or install CRIU >= $MIN_VERSION and set CHECKER_CRIU"
log "using the archive configured in /etc/apt for unstable's source"

BUILD_DEPS=(build-essential libbsd-dev libcap-dev libgnutls28-dev libnet1-dev libnftables-dev
    libnl-3-dev libprotobuf-c-dev libprotobuf-dev pkgconf protobuf-c-compiler
    protobuf-compiler uuid-dev python3-protobuf xz-utils dpkg-dev)
apt_update_once
apt-get install -y -qq --no-install-recommends "${BUILD_DEPS[@]}" >/dev/null

WORK="$(mktemp -d /tmp/checker-criu-build.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/lists/partial" "$WORK/src"

# A private source list and list directory: the machine's apt configuration is
# left untouched, and nothing needs cleaning up when the build fails.
printf 'deb-src %s unstable main\n' "$ARCHIVE" >"$WORK/unstable.list"
APT_OPTS=(-o "Dir::Etc::SourceList=$WORK/unstable.list" -o "Dir::Etc::SourceParts=-"
    -o "Dir::State::Lists=$WORK/lists" -o "APT::Get::List-Cleanup=0")
apt-get "${APT_OPTS[@]}" update -qq 2>"$WORK/apt.log" || {
    cat "$WORK/apt.log" >&2
    die "could not read Debian unstable's source index from the archive in /etc/apt"
}

# apt-get source verifies each file against the hash in the .dsc. From some
# mirrors the Debian packaging tarball answers 404; only the upstream tarball
# is needed to build, so a non-zero exit is tolerated when that tarball arrived.
# apt's messages go to a log, shown only when the upstream tarball is missing.
(cd "$WORK/src" && apt-get "${APT_OPTS[@]}" source --download-only -qq criu) >>"$WORK/apt.log" 2>&1 || true
ORIG="$(ls "$WORK"/src/criu_*.orig.tar.* 2>/dev/null | head -n1)"
[ -n "$ORIG" ] || { cat "$WORK/apt.log" >&2; die "could not download criu's upstream source from unstable"; }
log "building from $(basename "$ORIG")"

tar -xf "$ORIG" -C "$WORK/src"
SOURCE_DIR="$(find "$WORK/src" -mindepth 1 -maxdepth 1 -type d -name 'criu-*' | head -n1)"
[ -n "$SOURCE_DIR" ] || die "the upstream tarball $ORIG has no criu-* directory"
make -C "$SOURCE_DIR" -j"$(nproc)" criu >"$WORK/build.log" 2>&1 || {
    tail -n 30 "$WORK/build.log" >&2
    die "building criu failed; the last lines of the build log are above"
}

install -m 0755 "$SOURCE_DIR/criu/criu" "$TARGET.new"
mv -f "$TARGET.new" "$TARGET"
binary_is_good "$TARGET" || die "the built criu ($(criu_version "$TARGET")) fails 'criu check' or is older than $MIN_VERSION; run '$TARGET check' for details"
log "installed CRIU $(criu_version "$TARGET") at $TARGET"
