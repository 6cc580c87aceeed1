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

# kvm_mode: "direct" when the host /dev/kvm boots ordinary kernels, else "nested".
# Overridable with MICROVM_RIG=direct|nested.
kvm_mode() {
    case "${MICROVM_RIG:-}" in
        direct|nested) echo "$MICROVM_RIG"; return ;;
        inner) echo direct; return ;;
    esac
    if [ -d /sys/module/kvm_pvm ]; then echo nested
    elif [ -c /dev/kvm ] && [ -r /dev/kvm ] && [ -w /dev/kvm ]; then echo direct
    else echo nested
    fi
}

# kvm_mode_reason: one line explaining the choice of kvm_mode.
kvm_mode_reason() {
    case "${MICROVM_RIG:-}" in
        direct|nested|inner) echo "MICROVM_RIG=$MICROVM_RIG"; return ;;
    esac
    if [ -d /sys/module/kvm_pvm ]; then
        echo "the host /dev/kvm is PVM (/sys/module/kvm_pvm), which boots only PVM-enabled kernels"
    elif [ -c /dev/kvm ] && [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
        echo "the host /dev/kvm is hardware KVM"
    else
        echo "the host has no usable /dev/kvm"
    fi
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
