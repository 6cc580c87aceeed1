# Shared helpers for the rig scripts (sourced, not executed).
# shellcheck shell=bash

ROOT=${ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
MICROVM_CACHE=${MICROVM_CACHE:-${HOME:-/root}/.cache/microvm}
GUEST_DIR=$MICROVM_CACHE/guest

log() { printf '%s: %s\n' "${LOG_TAG:-rig}" "$*" >&2; }
die() { log "error: $*"; exit 1; }

_apt_updated=
apt_update_once() {
    [ -n "$_apt_updated" ] && return 0
    log "apt-get update"
    apt-get update -qq >&2 || die "apt-get update failed"
    _apt_updated=1
}

# need_pkgs PKG... : install the Debian packages that are not installed yet.
need_pkgs() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "missing packages (${missing[*]}); install them as root"
    apt_update_once
    log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2 \
        || die "apt-get install ${missing[*]} failed"
}

# microvm_bin: the microvm binary the scripts run: $MICROVM_BIN, else the release build
# (target/release/microvm, which `make build` makes; `make run` and `make bench` build it
# first). Dies with the fix when it is missing.
microvm_bin() {
    local bin=${MICROVM_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/microvm}
    [ -x "$bin" ] || die "microvm binary $bin missing (make build, or set MICROVM_BIN)"
    echo "$bin"
}

# kvm_mode: "direct" when the host /dev/kvm boots ordinary kernels, else "nested" (the
# Linux guest then runs inside the rig, scripts/rig.sh). MICROVM_RIG=direct|nested
# overrides it, MICROVM_RIG=inner (inside the rig's L1) means direct; otherwise the binary
# decides (`microvm kvm-mode`), so that the scripts, the tests and microvm itself share
# one detection. Callers run it once microvm is built (microvm_bin).
kvm_mode() {
    case "${MICROVM_RIG:-}" in
        direct|nested) echo "$MICROVM_RIG"; return ;;
        inner) echo direct; return ;;
    esac
    _kvm_mode_ask mode
}

# kvm_mode_reason: one line explaining the choice of kvm_mode.
kvm_mode_reason() {
    case "${MICROVM_RIG:-}" in
        direct|nested|inner) echo "MICROVM_RIG=$MICROVM_RIG"; return ;;
    esac
    _kvm_mode_ask reason
}

# _kvm_mode_ask mode|reason: runs `microvm kvm-mode`, which prints direct or nested on
# stdout and `microvm: kvm-mode: REASON` on stderr; echoes the mode or the REASON.
_kvm_mode_ask() {
    local bin out err st=0
    bin=$(microvm_bin) || exit 1
    err=$(mktemp)
    out=$("$bin" kvm-mode 2>"$err") || st=$?
    if [ "$st" != 0 ] || { [ "$out" != direct ] && [ "$out" != nested ]; }; then
        local what; what=$(head -n1 "$err"); rm -f "$err"
        die "$bin kvm-mode gave status $st, stdout '$out' (${what:-no message}): rebuild microvm (make build), or set MICROVM_RIG=direct|nested"
    fi
    case "$1" in
        mode) echo "$out" ;;
        reason) local r; r=$(sed -n '1s/^microvm: kvm-mode: //p' "$err"); echo "${r:-$bin kvm-mode gave no reason}" ;;
    esac
    rm -f "$err"
}

# copy_with_libs DEST FILE... : copy executables into DEST (same absolute path)
# together with every shared library ldd finds and the dynamic loader.
copy_with_libs() {
    local dest=$1; shift
    local f lib
    for f in "$@"; do
        { ldd "$f" 2>/dev/null || true; } | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | while read -r lib; do
            [ -e "$dest$lib" ] && continue
            mkdir -p "$dest$(dirname "$lib")"
            cp -L "$lib" "$dest$lib"
        done
    done
}

# sha of a list of files/dirs (content + names), for stamps.
tree_hash() {
    local p
    for p in "$@"; do
        if [ -d "$p" ]; then (cd "$p" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
        elif [ -e "$p" ]; then sha256sum <"$p"
        else echo "missing $p"
        fi
    done | sha256sum | cut -c1-16
}
