#!/usr/bin/env bash
# Prepare the reference guest (Debian cloud kernel + busybox initramfs) in
# $MICROVM_CACHE/guest (default ~/.cache/microvm/guest), outside git:
#   vmlinuz          L2 guest kernel (bzImage), also booted as the L1 kernel of the rig
#   kernel-version   e.g. 6.1.0-56-cloud-amd64
#   modules-l1/      kvm modules for the rig's L1 (decompressed) + `order` (load order, one per line)
#   modules-l2/      virtio modules for the guest (decompressed) + `order`
#   initrd.gz        L2 initramfs: busybox-static + resources/guest/init + modules-l2
# Idempotent: the kernel step is skipped when kernel.stamp exists (MICROVM_GUEST_REFRESH=1
# re-checks the registry); the initramfs is rebuilt only when its inputs' hash changes.
set -euo pipefail
LOG_TAG=guest
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

L1_MODULES=(irqbypass kvm kvm_amd)
L2_MODULES=(virtio_ring virtio virtio_mmio virtio_console)

mkdir -p "$GUEST_DIR"
need_pkgs busybox-static cpio kmod xz-utils zstd gzip

# --- kernel + modules --------------------------------------------------------
# resolve_order OUTDIR MODULE... : copy MODULE and its depends= closure, decompressed,
# from $MODROOT into OUTDIR and write OUTDIR/order in dependency order.
declare -A MODPATH=()
resolve_order() {
    local out=$1; shift
    local -A seen=()
    local order=()
    visit() {
        local m=$1 d deps f
        [ -n "${seen[$m]:-}" ] && return 0
        seen[$m]=1
        f=${MODPATH[$m]:-}
        [ -n "$f" ] || die "module $m not found in the kernel package"
        deps=$(modinfo -F depends "$f" | tr ',' ' ')
        for d in $deps; do visit "${d//-/_}"; done
        order+=("$m")
    }
    for m in "$@"; do visit "$m"; done
    rm -rf "$out"; mkdir -p "$out"
    for m in "${order[@]}"; do
        f=${MODPATH[$m]}
        case "$f" in
            *.ko.xz) xz -dc "$f" >"$out/$m.ko" ;;
            *.ko.zst) zstd -qdc "$f" >"$out/$m.ko" ;;
            *.ko.gz) gzip -dc "$f" >"$out/$m.ko" ;;
            *.ko) cp "$f" "$out/$m.ko" ;;
        esac
        echo "$m.ko" >>"$out/order"
    done
    log "$(basename "$out"): ${order[*]}"
}

if [ ! -f "$GUEST_DIR/kernel.stamp" ] || [ -n "${MICROVM_GUEST_REFRESH:-}" ] \
   || [ ! -s "$GUEST_DIR/vmlinuz" ] || [ ! -s "$GUEST_DIR/modules-l1/order" ] \
   || [ ! -s "$GUEST_DIR/modules-l2/order" ]; then
    pick_pkg() { apt-cache depends linux-image-cloud-amd64 2>/dev/null \
        | awk '/Depends: linux-image-[0-9]/{print $2; exit}'; }
    pkg=$(pick_pkg || true)
    if [ -z "$pkg" ] || [ -n "${MICROVM_GUEST_REFRESH:-}" ]; then apt_update_once; pkg=$(pick_pkg || true); fi
    [ -n "$pkg" ] || die "apt-cache depends linux-image-cloud-amd64 names no kernel package"
    # Prefer the -unsigned package (same bzImage, no signature); fall back to the signed one.
    cand=$pkg
    if apt-cache show "$pkg-unsigned" >/dev/null 2>&1; then cand=$pkg-unsigned; fi
    ver=$(apt-cache show "$cand" | awk '/^Version:/{print $2; exit}')
    stamp="$cand $ver"
    if [ -f "$GUEST_DIR/kernel.stamp" ] && [ "$(cat "$GUEST_DIR/kernel.stamp")" = "$stamp" ] \
       && [ -s "$GUEST_DIR/vmlinuz" ] && [ -s "$GUEST_DIR/modules-l1/order" ] && [ -s "$GUEST_DIR/modules-l2/order" ]; then
        log "kernel up to date ($stamp)"
    else
        dl=$MICROVM_CACHE/download
        rm -rf "$dl"; mkdir -p "$dl"
        log "downloading $cand $ver"
        (cd "$dl" && apt-get download -q "$cand=$ver" >&2) || {
            apt_update_once
            (cd "$dl" && apt-get download -q "$cand=$ver" >&2) || die "apt-get download $cand failed"
        }
        dpkg-deb -x "$dl"/*.deb "$dl/root"
        kver=$(ls "$dl/root/lib/modules" | head -n1)
        [ -n "$kver" ] || die "no lib/modules in $cand"
        cp "$dl/root/boot/vmlinuz-$kver" "$GUEST_DIR/vmlinuz"
        echo "$kver" >"$GUEST_DIR/kernel-version"
        export MODROOT=$dl/root/lib/modules/$kver
        while IFS= read -r f; do
            b=$(basename "$f"); b=${b%%.ko*}; MODPATH[${b//-/_}]=$f
        done < <(find "$MODROOT" -name '*.ko*')
        resolve_order "$GUEST_DIR/modules-l1" "${L1_MODULES[@]}"
        resolve_order "$GUEST_DIR/modules-l2" "${L2_MODULES[@]}"
        echo "$stamp" >"$GUEST_DIR/kernel.stamp"
        rm -rf "$dl"
        log "kernel $kver ready"
    fi
fi

# --- L2 initramfs ----------------------------------------------------------------
busybox=/bin/busybox
[ -x "$busybox" ] || die "$busybox missing"
hash=$(tree_hash "$ROOT/resources/guest" "$busybox" "$GUEST_DIR/modules-l2" "$0")
if [ -s "$GUEST_DIR/initrd.gz" ] && [ "$(cat "$GUEST_DIR/initrd.stamp" 2>/dev/null)" = "$hash" ]; then
    log "initrd.gz up to date"
else
    tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
    mkdir -p "$tmp"/{bin,sbin,dev,proc,sys,tmp,root,etc,lib/modules}
    cp "$busybox" "$tmp/bin/busybox"
    for a in $("$busybox" --list); do
        [ -e "$tmp/bin/$a" ] || ln -s busybox "$tmp/bin/$a"
    done
    cp "$ROOT/resources/guest/init" "$tmp/init"; chmod 755 "$tmp/init"
    cp "$GUEST_DIR"/modules-l2/* "$tmp/lib/modules/"
    (cd "$tmp" && find . | LC_ALL=C sort | cpio -o -H newc --reproducible -R 0:0 --quiet) \
        | gzip -n -6 >"$GUEST_DIR/initrd.gz.new"
    mv "$GUEST_DIR/initrd.gz.new" "$GUEST_DIR/initrd.gz"
    echo "$hash" >"$GUEST_DIR/initrd.stamp"
    log "initrd.gz built ($(du -k "$GUEST_DIR/initrd.gz" | cut -f1) KiB)"
fi
echo "$GUEST_DIR"
