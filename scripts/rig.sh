#!/usr/bin/env bash
# The nested rig: run CMD inside an L1 Linux VM (QEMU TCG, -cpu max, kvm_amd nested=1)
# that gives a hardware-style /dev/kvm, for hosts whose own KVM cannot boot ordinary
# kernels (PVM). See docs/RIG.md.
#
# usage: scripts/rig.sh [options] -- CMD ARGS...
#   --bin FILE        microvm binary (default: $MICROVM_BIN; required unless --no-microvm)
#   --no-microvm      do not put a microvm binary into L1
#   --payload FILE    put FILE into L1 as /rig/<basename> (ELF executables get their libs); repeatable
#   --with-qemu       put qemu-system-x86_64 (+ libs, microvm firmware) into L1
#   --no-isolcpus     let L1 use both CPUs for everything (default: keep the last for
#                     pinned vCPU threads, docs/RIG.md)
#   --env NAME=VALUE  export NAME=VALUE to CMD in L1; repeatable
#   --interactive     console on this terminal (raw, no QEMU monitor mux); CMD gets the tty
#   --timeout SECS    overall safety timeout (default $MICROVM_RIG_TIMEOUT or 1800; none
#                     for --interactive unless given)
# In L1, CMD runs in /rig with MICROVM_BIN=/rig/microvm MICROVM_KERNEL=/rig/vmlinuz
# MICROVM_INITRD=/rig/initrd.gz MICROVM_RIG=inner. L1's console streams to stdout; the
# script exits with CMD's exit status, or 1 with a message if L1 ended without reporting one.
set -euo pipefail
LOG_TAG=rig
trap 'log "error: command failed at line $LINENO: $BASH_COMMAND"' ERR
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

bin=${MICROVM_BIN:-}; no_bin=0; interactive=0; with_qemu=0; isolate=1
payloads=(); envs=(); timeout_s=${MICROVM_RIG_TIMEOUT:-}
while [ $# -gt 0 ]; do
    case "$1" in
        --bin) bin=$2; shift 2 ;;
        --no-microvm) no_bin=1; shift ;;
        --payload) payloads+=("$2"); shift 2 ;;
        --with-qemu) with_qemu=1; shift ;;
        --no-isolcpus) isolate=0; shift ;;
        --env) envs+=("$2"); shift 2 ;;
        --interactive) interactive=1; shift ;;
        --timeout) timeout_s=$2; shift 2 ;;
        --) shift; break ;;
        -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
[ $# -gt 0 ] || die "no command given (usage: rig.sh [options] -- CMD ARGS...)"
if [ "$no_bin" = 0 ]; then
    [ -n "$bin" ] || die "set MICROVM_BIN (or --bin FILE) to the microvm binary, or pass --no-microvm"
    [ -x "$bin" ] || die "MICROVM_BIN=$bin is not an executable file"
fi
[ -z "$timeout_s" ] && { [ "$interactive" = 1 ] && timeout_s=0 || timeout_s=1800; }

need_pkgs qemu-system-x86 busybox-static cpio
"$ROOT/scripts/guest.sh" >/dev/null
for f in vmlinuz initrd.gz modules-l1/order; do [ -s "$GUEST_DIR/$f" ] || die "guest not prepared: $GUEST_DIR/$f"; done

work=$(mktemp -d "${TMPDIR:-/tmp}/microvm-rig.XXXXXX")
trap 'rm -rf "$work"' EXIT
st=$work/root
mkdir -p "$st"/{bin,sbin,dev,proc,sys,tmp,run,root,etc,rig/modules,usr/bin,usr/share/qemu}

# busybox + applet links
cp /bin/busybox "$st/bin/busybox"
for a in $(/bin/busybox --list); do [ -e "$st/bin/$a" ] || ln -s busybox "$st/bin/$a"; done
cp "$ROOT/resources/rig/init" "$st/init"; chmod 755 "$st/init"
cp "$GUEST_DIR"/modules-l1/* "$st/rig/modules/"
cp "$GUEST_DIR/vmlinuz" "$GUEST_DIR/initrd.gz" "$st/rig/"
echo 'root:x:0:0:root:/root:/bin/sh' >"$st/etc/passwd"

is_elf() { [ "$(head -c4 "$1" | od -An -c | tr -d ' ')" = '177ELF' ]; }
if [ "$no_bin" = 0 ]; then
    cp -L "$bin" "$st/rig/microvm"; copy_with_libs "$st" "$bin"
fi
for p in "${payloads[@]}"; do
    [ -e "$p" ] || die "payload $p not found"
    cp -L "$p" "$st/rig/$(basename "$p")"
    is_elf "$p" && copy_with_libs "$st" "$p"
done
if [ "$with_qemu" = 1 ]; then
    q=$(command -v qemu-system-x86_64) || die "qemu-system-x86_64 not found"
    cp -L "$q" "$st/usr/bin/qemu-system-x86_64"; copy_with_libs "$st" "$q"
    # -M microvm boots qboot (bios-microvm.bin -> qboot.rom); the rest are option ROMs
    # QEMU may look for when loading a kernel.
    for f in bios-microvm.bin qboot.rom linuxboot_dma.bin linuxboot.bin kvmvapic.bin pvh.bin; do
        [ -e "/usr/share/qemu/$f" ] && cp -L "/usr/share/qemu/$f" "$st/usr/share/qemu/$f"
    done
fi

{
    echo "export MICROVM_BIN=/rig/microvm MICROVM_KERNEL=/rig/vmlinuz MICROVM_INITRD=/rig/initrd.gz MICROVM_RIG=inner"
    echo "export RIG_INTERACTIVE=$interactive"
    if [ "$interactive" = 1 ] && sz=$(stty size 2>/dev/null); then
        echo "export RIG_ROWS=${sz% *} RIG_COLS=${sz#* }"
        echo "export TERM=$(printf '%q' "${TERM:-linux}")"
    fi
    for e in "${envs[@]}"; do echo "export $(printf '%q' "$e")"; done
} >"$st/rig/env"
{ printf 'exec'; printf ' %q' "$@"; echo; } >"$st/rig/cmd"

(cd "$st" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"$work/l1.cpio"
log "L1 initramfs $(( $(stat -c %s "$work/l1.cpio") / 1048576 )) MiB (uncompressed cpio)"
rm -rf "$st"

# L1's last CPU is kept for L2 vCPU threads (isolcpus: no task, kernel worker or IRQ
# lands there unless pinned; the tests and the bench pin the vCPUs with --vcpu-affinity
# or taskset). TCG's SVM emulation lets an L2 vCPU that spins with interrupts off (the
# guest's hvc write waiting for the device) hold its L1 CPU without taking L1's
# interrupts; anything else queued on that CPU (the pipe reader that would drain the
# console, a serial IRQ, a kworker) then waits for it, and the spin waits for them.
l1_cpus=2
l1_isolate=
[ "$isolate" = 1 ] && l1_isolate=" isolcpus=$((l1_cpus - 1)) irqaffinity=0"
qemu=(qemu-system-x86_64 -M q35 -accel tcg -cpu max -smp "$l1_cpus" -m 2048
      -nodefaults -no-user-config -display none -no-reboot -monitor none
      -kernel "$GUEST_DIR/vmlinuz" -initrd "$work/l1.cpio"
      -append "console=ttyS0 reboot=t panic=-1 quiet loglevel=1 rdinit=/init$l1_isolate")
status_file=$work/status
trap - ERR   # from here on, failures are reported below
if [ "$interactive" = 1 ]; then
    qemu+=(-chardev stdio,id=con,signal=off -serial chardev:con -serial "file:$status_file")
    log "booting L1 (interactive; the console is this terminal, QEMU exits when L1 powers off)"
    set +e
    if [ "$timeout_s" != 0 ]; then timeout --foreground -k 10 "$timeout_s" "${qemu[@]}"; else "${qemu[@]}"; fi
    qs=$?
    set -e
    stty sane 2>/dev/null || true
else
    qemu+=(-chardev stdio,id=con -serial chardev:con -serial "file:$status_file")
    log "booting L1 (timeout ${timeout_s}s)"
    set +e
    timeout -k 10 "$timeout_s" "${qemu[@]}" </dev/null | sed -u 's/\r$//'
    qs=${PIPESTATUS[0]}
    set -e
fi
code=$(tr -d '\r' <"$status_file" 2>/dev/null | sed -n 's/^exit=\([0-9][0-9]*\)$/\1/p' | tail -n1)
if [ -z "$code" ]; then
    if [ "$qs" = 124 ]; then log "error: timed out after ${timeout_s}s; L1 killed before CMD finished"
    else log "error: L1 ended without an exit marker (qemu exit status $qs): L1 kernel panic, crash, or qemu failure"
    fi
    exit 1
fi
exit "$code"
