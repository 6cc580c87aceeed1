#!/usr/bin/env bash
# Installs the Debian packages the build, the reference guest, the nested rig and the
# tests need, when missing (instant when all are present). Run by `make guest` (and so by
# `make run`, `make test`, `.ci/run`).
set -euo pipefail
LOG_TAG=deps
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

pkgs=(qemu-system-x86 busybox-static cpio socat kmod xz-utils zstd gzip make libxml2-utils python3-pip openssl curl)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done

# The JUnit schema --junit's output is checked against (tests/ci.rs): the Jenkins
# xUnit plugin's junit-10.xsd, as shipped in pytest's source distribution on PyPI (its
# own junitxml tests use it). Pinned, fetched once into $MICROVM_CACHE.
junit_xsd() {
    local xsd=$MICROVM_CACHE/junit-10.xsd ver=9.2.0 tmp
    [ -s "$xsd" ] && return 0
    tmp=$(mktemp -d)
    log "fetching junit-10.xsd from pytest $ver's sdist (PyPI)"
    if python3 -m pip download -q --no-deps --no-binary :all: "pytest==$ver" -d "$tmp" >&2 \
        && tar -xzf "$tmp/pytest-$ver.tar.gz" -C "$tmp" "pytest-$ver/testing/example_scripts/junit-10.xsd"; then
        mkdir -p "$MICROVM_CACHE"
        mv "$tmp/pytest-$ver/testing/example_scripts/junit-10.xsd" "$xsd"
    else
        log "warning: could not fetch junit-10.xsd; the JUnit schema test will fail"
    fi
    rm -rf "$tmp"
}

if [ ${#missing[@]} -eq 0 ]; then junit_xsd; exit 0; fi
sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo -n)
log "installing ${missing[*]}"
"${sudo[@]}" apt-get update -qq || die "apt-get update failed (are Debian's package mirrors reachable?)"
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    || die "apt-get install ${missing[*]} failed; install them by hand and retry"
junit_xsd
