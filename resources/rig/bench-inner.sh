#!/bin/sh
# Runs inside the rig's L1 (see scripts/bench.sh), or directly on a host with hardware KVM.
# Sections (BENCH_ONLY=boot|hvc|uart|rss, default all), each alternating QEMU -M microvm
# and microvm with the same kernel, initrd and command line, printing one line per run:
#   BENCH <case> <i> <vmmtime fields>
# vmmtime (tools/vmmtime.rs) times the VMM's stdout: process start -> "init reached"
# (init_ms) -> the guest's flood begin/end markers (at1_ms, at2_ms) -> exit (exit_ms).
mark="microvm-guest: init reached"
VMMTIME=${VMMTIME:-/rig/vmmtime}
mem=${BENCH_MEM_MIB:-256}
only=${BENCH_ONLY:-all}
want() { [ "$only" = all ] || [ "$only" = "$1" ]; }
tmp=${TMPDIR:-/tmp}

# QEMU -M microvm with the devices microvm has: the UART and a virtio console, both on
# stdout (a mux chardev lets two frontends share stdio). Wrapper scripts, not shell
# functions: vmmtime executes them.
cat >"$tmp/qemu-vc" <<EOF
#!/bin/sh
exec qemu-system-x86_64 -M microvm -accel kvm -cpu host -m "$mem" -smp 1 \\
    -nodefaults -no-user-config -display none -no-reboot \\
    -chardev stdio,mux=on,id=c0 -serial chardev:c0 \\
    -device virtio-serial-device -device virtconsole,chardev=c0 \\
    -kernel "$MICROVM_KERNEL" -initrd "$MICROVM_INITRD" "\$@"
EOF
cat >"$tmp/qemu-uart" <<EOF
#!/bin/sh
exec qemu-system-x86_64 -M microvm -accel kvm -cpu host -m "$mem" -smp 1 \\
    -nodefaults -no-user-config -display none -no-reboot -serial stdio \\
    -kernel "$MICROVM_KERNEL" -initrd "$MICROVM_INITRD" "\$@"
EOF
cat >"$tmp/microvm" <<EOF
#!/bin/sh
exec "$MICROVM_BIN" --kernel "$MICROVM_KERNEL" --initrd "$MICROVM_INITRD" \\
    --memory "${mem}M" --vcpus 1 --boot-timer \${BENCH_MICROVM_ARGS:-} "\$@"
EOF
chmod +x "$tmp/qemu-vc" "$tmp/qemu-uart" "$tmp/microvm"
qemu="$tmp/qemu-vc" microvm="$tmp/microvm"
export BENCH_MICROVM_ARGS

# BENCH_PIN=1: both VMMs run their vCPU thread on the last CPU and every other thread on
# the others (microvm: --vcpu-affinity; QEMU: taskset on its threads once they exist).
# In the nested rig (whose L1 keeps that CPU for vCPUs: isolcpus, scripts/rig.sh) this
# sidesteps TCG's SVM emulation keeping an L1 CPU stuck in an L2 that spins with
# interrupts off (see docs/RIG.md); on real hardware leave it off. `nproc` would count
# only the CPUs this shell may use, which excludes isolated ones.
if [ "${BENCH_PIN:-0}" = 1 ]; then
    last=$(($(grep -c '^processor' /proc/cpuinfo) - 1))
    [ "$last" -ge 1 ] || { echo "BENCH_PIN=1 needs 2 CPUs"; exit 1; }
    vmask=$(printf '%x' $((1 << last))) omask=$(printf '%x' $(((1 << last) - 1)))
    BENCH_MICROVM_ARGS="${BENCH_MICROVM_ARGS:-} --vcpu-affinity $last"
    for w in qemu-vc qemu-uart; do
        mv "$tmp/$w" "$tmp/$w.real"
        cat >"$tmp/$w" <<EOF
#!/bin/sh
# Pins the QEMU started below (exec keeps this pid, which vmmtime watches).
(i=0; while [ \$i -lt 200 ]; do
    for t in /proc/\$\$/task/*; do
        case "\$(cat \$t/comm 2>/dev/null)" in
            "CPU 0/KVM") taskset -p $vmask \${t##*/} >/dev/null && done=1 ;;
            *) taskset -p $omask \${t##*/} >/dev/null ;;
        esac
    done
    [ -n "\${done:-}" ] && break
    sleep 0.05; i=\$((i + 1))
done) &
exec "$tmp/$w.real" "\$@"
EOF
        chmod +x "$tmp/$w"
    done
fi
# A socket client that reads and discards everything (our own `microvm attach`).
reader() {
    (n=0; while [ ! -S "$1" ] && [ $n -lt 400 ]; do sleep 0.05; n=$((n + 1)); done
     "$MICROVM_BIN" attach "$1" </dev/null >/dev/null 2>&1) &
}
run() { # case i log -- cmd...
    c=$1 i=$2 log=$3; shift 4
    r=$("$VMMTIME" --mark "$mark" --guest-mem-mib "$mem" --log "$log" \
        --at FLOOD-BEGIN-2 --at FLOOD-END-2 --timeout "${BENCH_RUN_TIMEOUT:-240}" -- "$@")
    # microvm's own boot timer (--boot-timer on stderr, in the log): start -> the guest
    # init's write to the boot-timer register.
    bt=$(sed -n 's/.*boot time: \([0-9.]*\) ms.*/\1/p' "$log" | head -n1)
    echo "BENCH $c $i ${r#vmmtime: } boot_timer_ms=${bt:--}"
    case "$r" in *status=0*) ;; *) echo "$c run $i failed; its log tail:"; tail -n 15 "$log";; esac
}

i=1
while want boot && [ "$i" -le "${BENCH_N:-5}" ]; do
    run qemu "$i" "$tmp/qemu-$i.log" -- "$qemu" -append "$BENCH_CMDLINE mvcmd=\"poweroff -f\""
    run microvm "$i" "$tmp/microvm-$i.log" -- \
        "$microvm" --cmdline-replace "$BENCH_CMDLINE mvcmd=\"poweroff -f\""
    i=$((i + 1))
done

# The guest makes SIZE bytes of random data in tmpfs first (not timed), puts DEV in raw
# mode (no newline translation), then prints the begin marker, the data, the end marker.
# fd 3 holds DEV open throughout: hvc resets a tty's modes when its last opener closes it
# (TTY_DRIVER_RESET_TERMIOS), so without it `cat > DEV` would write in cooked mode, where
# n_tty hands every newline, tab and CR to the driver as a write of its own (and adds CRs).
flood_cmd() { # size dev
    echo "mvcmd=\"head -c $1 /dev/urandom > /tmp/f; exec 3<>$2; stty -F $2 raw -echo; echo; echo FLOOD-BEGIN-\$((1+1)); cat /tmp/f > $2; echo; echo FLOOD-END-\$((1+1))\""
}

hvc_size=${BENCH_HVC_BYTES:-16777216}
i=1
while want hvc && [ "$i" -le "${BENCH_TPUT_N:-3}" ]; do
    cmd=$(flood_cmd "$hvc_size" /dev/hvc0)
    run hvc-qemu "$i" "$tmp/hq-$i.log" -- "$qemu" -append "$BENCH_CMDLINE $cmd"
    run hvc-microvm "$i" "$tmp/hm-$i.log" -- "$microvm" --cmdline-replace "$BENCH_CMDLINE $cmd"
    rm -f "$tmp/b.sock" "$tmp/fan.log"
    reader "$tmp/b.sock"
    run hvc-microvm-fanout "$i" "$tmp/hf-$i.log" -- "$microvm" --cmdline-replace "$BENCH_CMDLINE $cmd" \
        --console "mux:sock=$tmp/b.sock,stdio,ring,file=$tmp/fan.log"
    wait
    i=$((i + 1))
done

# The UART alone (console=ttyS0): QEMU with -serial only, microvm --no-virtio-console.
uart_size=${BENCH_UART_BYTES:-262144}
uart_cmdline=$(echo "$BENCH_CMDLINE" | sed 's/console=hvc0/console=ttyS0/')
i=1
while want uart && [ "$i" -le "${BENCH_TPUT_N:-3}" ]; do
    cmd=$(flood_cmd "$uart_size" /dev/ttyS0)
    run uart-qemu "$i" "$tmp/uq-$i.log" -- "$tmp/qemu-uart" -append "$uart_cmdline $cmd"
    run uart-microvm "$i" "$tmp/um-$i.log" -- \
        "$microvm" --no-virtio-console --cmdline-replace "$uart_cmdline $cmd"
    rm -f "$tmp/b.sock" "$tmp/fan.log"
    reader "$tmp/b.sock"
    run uart-microvm-fanout "$i" "$tmp/uf-$i.log" -- \
        "$microvm" --no-virtio-console --cmdline-replace "$uart_cmdline $cmd" \
        --console "mux:sock=$tmp/b.sock,stdio,ring,file=$tmp/fan.log"
    wait
    i=$((i + 1))
done

# Memory after a long flood: microvm's own RSS (guest RAM excluded) at the begin marker
# and after 100 MiB more of console output through hvc0 to sock+stdio+ring+file.
if want rss; then
    rss_size=${BENCH_RSS_BYTES:-104857600}
    rm -f "$tmp/b.sock" "$tmp/fan.log"
    reader "$tmp/b.sock"
    run rss-microvm 1 "$tmp/rss.log" -- "$microvm" --cmdline-replace \
        "$BENCH_CMDLINE mvcmd=\"exec 3<>/dev/hvc0; stty -F /dev/hvc0 raw -echo; echo; echo FLOOD-BEGIN-\$((1+1)); head -c $rss_size /dev/zero > /dev/hvc0; echo; echo FLOOD-END-\$((1+1))\"" \
        --console "mux:sock=$tmp/b.sock,stdio,ring,file=$tmp/fan.log"
    wait
    rm -f "$tmp/fan.log"
fi
