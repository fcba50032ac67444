#!/usr/bin/env bash
# Install gVisor's runsc under a project-owned prefix (default /opt/checker),
# for the `gvisor` runtime.
#
# Debian 12's own runsc (a 2022-12 build) is too old for checkpoints of jobs
# that talk to a host unix socket, so this script takes the runsc package from
# bookworm-backports. It fetches the .deb through a temporary source list
# derived from the Debian archive already configured in /etc/apt, extracts
# the binary and leaves /etc/apt and the installed packages unchanged.
#
# The download is skipped when PREFIX/bin/runsc already runs.
#
# Environment:
#   CHECKER_PREFIX   install prefix (default /opt/checker)
set -euo pipefail

PREFIX="${CHECKER_PREFIX:-/opt/checker}"
TARGET="$PREFIX/bin/runsc"

log() { printf 'install-runsc: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

if [ "$(id -u)" -ne 0 ]; then
    die "runsc needs root to run jobs; run this script as root"
fi

if [ -x "$TARGET" ] && "$TARGET" --version >/dev/null 2>&1; then
    log "$("$TARGET" --version | head -n1) at $TARGET; nothing to do"
    exit 0
fi

. /etc/os-release
[ "${ID:-}" = debian ] || die "unsupported distribution '${ID:-unknown}'; install runsc yourself and set CHECKER_RUNSC to its path"
CODENAME="${VERSION_CODENAME:?/etc/os-release has no VERSION_CODENAME}"

. "$(dirname "$0")/debian-archive.sh"
ARCHIVE="$(archive_uri | head -n1)"
[ -n "$ARCHIVE" ] || die "found no Debian archive for '$CODENAME' in /etc/apt; add one, or install runsc and set CHECKER_RUNSC"

WORK="$(mktemp -d /tmp/checker-runsc.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/lists/partial" "$WORK/archives/partial" "$WORK/deb"

# A private source list, list directory and cache: nothing in /etc/apt or
# /var/lib/apt changes, and nothing needs cleaning up when the download fails.
printf 'deb %s %s-backports main\n' "$ARCHIVE" "$CODENAME" >"$WORK/backports.list"
APT_OPTS=(-o "Dir::Etc::SourceList=$WORK/backports.list" -o "Dir::Etc::SourceParts=-"
    -o "Dir::State::Lists=$WORK/lists" -o "Dir::Cache::Archives=$WORK/archives"
    -o "APT::Get::List-Cleanup=0")
log "reading $CODENAME-backports from the archive configured in /etc/apt"
apt-get "${APT_OPTS[@]}" update -qq 2>"$WORK/apt.log" || {
    cat "$WORK/apt.log" >&2
    die "could not read the $CODENAME-backports index"
}
(cd "$WORK/deb" && apt-get "${APT_OPTS[@]}" download -qq "runsc/$CODENAME-backports") >>"$WORK/apt.log" 2>&1 || {
    cat "$WORK/apt.log" >&2
    die "could not download runsc from $CODENAME-backports"
}
PACKAGE="$(ls "$WORK"/deb/runsc_*.deb | head -n1)"
log "extracting $(basename "$PACKAGE")"
dpkg-deb -x "$PACKAGE" "$WORK/root"

BINARY="$(find "$WORK/root" -type f -name runsc -perm -u+x | head -n1)"
[ -n "$BINARY" ] || die "$(basename "$PACKAGE") contains no runsc binary"
mkdir -p "$PREFIX/bin"
install -m 0755 "$BINARY" "$TARGET.new"
mv -f "$TARGET.new" "$TARGET"
"$TARGET" --version >/dev/null || die "the installed $TARGET does not run"
log "installed $("$TARGET" --version | head -n1) at $TARGET"
