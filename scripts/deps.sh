#!/usr/bin/env bash
# Installs the Debian packages the build, the reference guest, the nested rig and the
# tests need, when missing (instant when all are present). Run by `make guest` (and so by
# `make run`, `make test`, `.ci/run`).
set -euo pipefail
LOG_TAG=deps
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

pkgs=(qemu-system-x86 busybox-static cpio socat kmod xz-utils zstd gzip make openssl curl)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo -n)
log "installing ${missing[*]}"
"${sudo[@]}" apt-get update -qq || die "apt-get update failed (are Debian's package mirrors reachable?)"
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    || die "apt-get install ${missing[*]} failed; install them by hand and retry"
