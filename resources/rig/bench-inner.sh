#!/bin/sh
# Runs inside the rig's L1 (see scripts/bench.sh): boots QEMU -M microvm and microvm
# alternately, BENCH_N times each, with the same kernel, initrd and command line, and
# prints one "BENCH <vmm> <i> <vmmtime fields>" line per boot.
mark="microvm-guest: init reached"
VMMTIME=${VMMTIME:-/rig/vmmtime}
mem=${BENCH_MEM_MIB:-256}
i=1
while [ "$i" -le "${BENCH_N:-5}" ]; do
    r=$("$VMMTIME" --mark "$mark" --guest-mem-mib "$mem" --log "/tmp/qemu-$i.log" -- \
        qemu-system-x86_64 -M microvm -accel kvm -cpu host -m "$mem" -smp 1 \
        -nodefaults -no-user-config -display none -no-reboot -serial stdio \
        -kernel "$MICROVM_KERNEL" -initrd "$MICROVM_INITRD" -append "$BENCH_CMDLINE")
    echo "BENCH qemu $i ${r#vmmtime: }"
    if [ "${BENCH_SKIP_MICROVM:-0}" != 1 ]; then
        r=$("$VMMTIME" --mark "$mark" --guest-mem-mib "$mem" --log "/tmp/microvm-$i.log" -- \
            "$MICROVM_BIN" --kernel "$MICROVM_KERNEL" --initrd "$MICROVM_INITRD" \
            --memory "${mem}M" --vcpus 1 --cmdline-replace "$BENCH_CMDLINE")
        echo "BENCH microvm $i ${r#vmmtime: }"
        case "$r" in *init_ms=-*) echo "microvm run $i did not reach init; its log tail:"; tail -n 15 "/tmp/microvm-$i.log";; esac
    fi
    i=$((i + 1))
done
