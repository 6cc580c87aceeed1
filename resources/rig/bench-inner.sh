#!/bin/sh
# Runs inside the rig's L1 (see scripts/bench.sh), or directly on a host with hardware KVM.
# Sections (BENCH_ONLY: a list of first boot uart hvc rss, default all), each alternating
# the VMMs (microvm, QEMU -M microvm, Firecracker when $FC is executable, and in the hvc
# section an earlier microvm build when $MICROVM_BASELINE is executable) with the same
# kernel, initrd and command line, printing one line per run:
#   BENCH <config> <case> <i> <vmmtime fields>
# vmmtime (tools/vmmtime.rs) times the VMM's stdout: process start -> the first line with
# the marker (init_ms, with the CPU time used by then: init_cpu_ms) -> the guest's flood
# begin/end markers (at1_ms, at2_ms, with KVM's exit counters from debugfs) -> exit
# (exit_ms, cpu_ms).
# BENCH_CONFIG: default (nothing pinned: what users run) or pinned (each VMM's vCPU
# thread on the last CPU, its other threads on the others).
mark="microvm-guest: init reached"
VMMTIME=${VMMTIME:-/rig/vmmtime}
FC=${FC:-/rig/firecracker}
VMLINUX=${VMLINUX:-/rig/vmlinux}
FIRST_ELF=${FIRST_ELF:-/rig/first.elf}
mem=${BENCH_MEM_MIB:-256}
only=${BENCH_ONLY:-all}
cfg=${BENCH_CONFIG:-default}
want() { [ "$only" = all ] || case " $only " in *" $1 "*) true ;; *) false ;; esac; }
has_fc() { [ -x "$FC" ] && [ -r "$VMLINUX" ]; }
tmp=${TMPDIR:-/tmp}

# KVM's exit counters (debugfs), for exits per byte of console output.
kstats=
if [ -d /sys/kernel/debug/kvm ] || mount -t debugfs none /sys/kernel/debug 2>/dev/null; then
    [ -r /sys/kernel/debug/kvm/exits ] && kstats="--kvm-stats /sys/kernel/debug/kvm"
fi

# Wrappers, not shell functions: vmmtime executes them.
# QEMU -M microvm with the devices microvm has: the UART and a virtio console, both on
# stdout (a mux chardev lets two frontends share stdio).
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
for w in microvm:"$MICROVM_BIN" microvm-baseline:"${MICROVM_BASELINE:-/nonexistent}"; do
    cat >"$tmp/${w%%:*}" <<EOF
#!/bin/sh
exec "${w#*:}" --memory "${mem}M" --vcpus 1 --boot-timer \${BENCH_MICROVM_ARGS:-} "\$@"
EOF
done
has_baseline() { [ -x "${MICROVM_BASELINE:-/nonexistent}" ]; }
# Firecracker boots the ELF vmlinux (it takes no bzImage) from a config file:
# firecracker-run KERNEL BOOT_ARGS [INITRD]
cat >"$tmp/firecracker-run" <<EOF
#!/bin/sh
args=\$(printf '%s' "\$2" | sed 's/\\\\/\\\\\\\\/g; s/"/\\\\"/g')
initrd=
[ -n "\${3:-}" ] && initrd=",\"initrd_path\":\"\$3\""
cfg=\$(mktemp "$tmp/fc.XXXXXX")
printf '{"boot-source":{"kernel_image_path":"%s","boot_args":"%s"%s},"machine-config":{"vcpu_count":1,"mem_size_mib":$mem},"drives":[]}\\n' "\$1" "\$args" "\$initrd" >"\$cfg"
exec "$FC" --level Error --no-api --config-file "\$cfg"
EOF
chmod +x "$tmp/qemu-vc" "$tmp/qemu-uart" "$tmp/microvm" "$tmp/microvm-baseline" "$tmp/firecracker-run"
export BENCH_MICROVM_ARGS

# pinned: each VMM's vCPU thread on the last CPU, every other thread on the others
# (microvm: --vcpu-affinity; QEMU and Firecracker: taskset on their threads once they
# exist, by name). In the nested rig L1 keeps that CPU for them (isolcpus, scripts/rig.sh).
# `nproc` would count only the CPUs this shell may use, which excludes isolated ones.
if [ "$cfg" = pinned ]; then
    last=$(($(grep -c '^processor' /proc/cpuinfo) - 1))
    [ "$last" -ge 1 ] || { echo "BENCH_CONFIG=pinned needs 2 CPUs"; exit 1; }
    vmask=$(printf '%x' $((1 << last))) omask=$(printf '%x' $(((1 << last) - 1)))
    BENCH_MICROVM_ARGS="${BENCH_MICROVM_ARGS:-} --vcpu-affinity $last"
    for w in qemu-vc qemu-uart firecracker-run; do
        case "$w" in firecracker-run) vname="fc_vcpu 0" ;; *) vname="CPU 0/KVM" ;; esac
        mv "$tmp/$w" "$tmp/$w.real"
        cat >"$tmp/$w" <<EOF
#!/bin/sh
# Pins the VMM started below (exec keeps this pid, which vmmtime watches).
(i=0; while [ \$i -lt 400 ]; do
    for t in /proc/\$\$/task/*; do
        case "\$(cat \$t/comm 2>/dev/null)" in
            "$vname") taskset -p $vmask \${t##*/} >/dev/null && done=1 ;;
            *) taskset -p $omask \${t##*/} >/dev/null ;;
        esac
    done
    [ -n "\${done:-}" ] && break
    sleep 0.02; i=\$((i + 1))
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
    rpid=$!
}
# Ends the reader once its run is over: a VMM stuck in the kernel (vmmtime reports it
# "unkillable") keeps the socket open, and waiting for the reader would hang the bench.
end_reader() { kill "$rpid" 2>/dev/null; wait "$rpid" 2>/dev/null; }
# The last text lines of a run's log (a flood's binary bytes left out).
log_tail() { tail -c 8192 "$1" | strings -n 8 | tail -n 15; }
run() { # case i mark -- cmd...
    c=$1 i=$2 m=$3; shift 4
    log="$tmp/$cfg-$c-$i.log"
    r=$("$VMMTIME" --mark "$m" --guest-mem-mib "$mem" --log "$log" $kstats \
        --at FLOOD-BEGIN-2 --at FLOOD-END-2 --timeout "${BENCH_RUN_TIMEOUT:-300}" -- "$@")
    # microvm's own boot timer (--boot-timer on stderr, in the log): start -> the guest
    # init's write to the boot-timer register.
    bt=$(sed -n 's/.*boot time: \([0-9.]*\) ms.*/\1/p' "$log" | head -n1)
    echo "BENCH $cfg $c $i ${r#vmmtime: } boot_timer_ms=${bt:--}"
    case "$r" in
        *init_ms=-*|*status=[!0]*|*status=0[0-9]*) echo "$c run $i failed or never reached its marker; its log's last text lines:"; log_tail "$log" ;;
        *at1_ms=[0-9]*at2_ms=-*) echo "$c run $i: the end marker never reached stdout (the guest stopped mid-flood); its log's last text lines:"; log_tail "$log" ;;
    esac
}

# First instruction: a minimal ELF "kernel" (tools/firstinsn.rs) whose first
# instructions print MVFIRST on COM1 and reset through the i8042.
i=1
while want first && [ -r "$FIRST_ELF" ] && [ "$i" -le "${BENCH_FIRST_N:-10}" ]; do
    run first-microvm "$i" MVFIRST -- "$tmp/microvm" --kernel "$FIRST_ELF"
    run first-microvm-noseccomp "$i" MVFIRST -- "$tmp/microvm" --no-seccomp --kernel "$FIRST_ELF"
    has_fc && run first-firecracker "$i" MVFIRST -- "$tmp/firecracker-run" "$FIRST_ELF" "console=ttyS0"
    i=$((i + 1))
done

# Boot: init reached, then the guest stops itself. Firecracker has no ACPI power-off
# (reboot=k makes `reboot -f` an i8042 reset, which ends it); QEMU -M microvm has no
# i8042 (a reset there takes ~60 s), so it powers off; microvm takes either, and does
# what Firecracker does.
i=1
while want boot && [ "$i" -le "${BENCH_N:-5}" ]; do
    run boot-qemu "$i" "$mark" -- "$tmp/qemu-vc" -append "$BENCH_CMDLINE mvcmd=\"poweroff -f\""
    has_fc && run boot-firecracker "$i" "$mark" -- "$tmp/firecracker-run" "$VMLINUX" \
        "$BENCH_CMDLINE mvcmd=\"reboot -f\"" "$MICROVM_INITRD"
    run boot-microvm "$i" "$mark" -- "$tmp/microvm" --kernel "$MICROVM_KERNEL" \
        --initrd "$MICROVM_INITRD" --cmdline-replace "$BENCH_CMDLINE mvcmd=\"reboot -f\""
    has_fc && run boot-microvm-vmlinux "$i" "$mark" -- "$tmp/microvm" --kernel "$VMLINUX" \
        --initrd "$MICROVM_INITRD" --cmdline-replace "$BENCH_CMDLINE mvcmd=\"reboot -f\""
    i=$((i + 1))
done

# The guest makes SIZE bytes of random data in tmpfs first (not timed), puts DEV in raw
# mode (no newline translation), then prints the begin marker, the data, the end marker.
# fd 3 holds DEV open throughout: hvc resets a tty's modes when its last opener closes it
# (TTY_DRIVER_RESET_TERMIOS), so without it `cat > DEV` would write in cooked mode, where
# n_tty hands every newline, tab and CR to the driver as a write of its own (and adds CRs).
flood_cmd() { # size dev then
    echo "mvcmd=\"head -c $1 /dev/urandom > /tmp/f; exec 3<>$2; stty -F $2 raw -echo; echo; echo FLOOD-BEGIN-\$((1+1)); cat /tmp/f > $2; echo; echo FLOOD-END-\$((1+1)); $3\""
}

# ttyS0 alone (console=ttyS0): QEMU with -serial only, microvm --no-virtio-console,
# Firecracker as it is (its only console is the UART).
uart_size=${BENCH_UART_BYTES:-65536}
uart_cmdline=$(echo "$BENCH_CMDLINE" | sed 's/console=hvc0/console=ttyS0/')
i=1
while want uart && [ "$i" -le "${BENCH_TPUT_N:-3}" ]; do
    run uart-qemu "$i" "$mark" -- "$tmp/qemu-uart" -append "$uart_cmdline $(flood_cmd "$uart_size" /dev/ttyS0 "poweroff -f")"
    has_fc && run uart-firecracker "$i" "$mark" -- "$tmp/firecracker-run" "$VMLINUX" \
        "$uart_cmdline $(flood_cmd "$uart_size" /dev/ttyS0 "reboot -f")" "$MICROVM_INITRD"
    run uart-microvm "$i" "$mark" -- "$tmp/microvm" --kernel "$MICROVM_KERNEL" --initrd "$MICROVM_INITRD" \
        --no-virtio-console --cmdline-replace "$uart_cmdline $(flood_cmd "$uart_size" /dev/ttyS0 "reboot -f")"
    i=$((i + 1))
done

# hvc0 (Firecracker has no virtio console): one backend (stdio), then four (a socket
# with a reader, stdio, the ring, a log file).
hvc_size=${BENCH_HVC_BYTES:-16777216}
i=1
while want hvc && [ "$i" -le "${BENCH_TPUT_N:-3}" ]; do
    cmd=$(flood_cmd "$hvc_size" /dev/hvc0 "poweroff -f")
    run hvc-qemu "$i" "$mark" -- "$tmp/qemu-vc" -append "$BENCH_CMDLINE $cmd"
    for v in microvm baseline; do
        [ "$v" = microvm ] || has_baseline || continue
        w=$tmp/microvm; [ "$v" = microvm ] || w=$tmp/microvm-baseline
        run "hvc-$v" "$i" "$mark" -- "$w" --kernel "$MICROVM_KERNEL" \
            --initrd "$MICROVM_INITRD" --cmdline-replace "$BENCH_CMDLINE $cmd"
        rm -f "$tmp/b.sock" "$tmp/fan.log"
        reader "$tmp/b.sock"
        run "hvc-$v-fanout" "$i" "$mark" -- "$w" --kernel "$MICROVM_KERNEL" \
            --initrd "$MICROVM_INITRD" --cmdline-replace "$BENCH_CMDLINE $cmd" \
            --console "mux:sock=$tmp/b.sock,stdio,ring,file=$tmp/fan.log"
        end_reader
        rm -f "$tmp/fan.log"
    done
    i=$((i + 1))
done

# Memory after a long flood: microvm's own RSS (guest RAM excluded) at the begin marker
# and after BENCH_RSS_BYTES more of console output through hvc0 to sock+stdio+ring+file.
if want rss; then
    rss_size=${BENCH_RSS_BYTES:-104857600}
    rm -f "$tmp/b.sock" "$tmp/fan.log"
    reader "$tmp/b.sock"
    run rss-microvm 1 "$mark" -- "$tmp/microvm" --kernel "$MICROVM_KERNEL" --initrd "$MICROVM_INITRD" \
        --cmdline-replace "$BENCH_CMDLINE mvcmd=\"exec 3<>/dev/hvc0; stty -F /dev/hvc0 raw -echo; echo; echo FLOOD-BEGIN-\$((1+1)); head -c $rss_size /dev/zero > /dev/hvc0; echo; echo FLOOD-END-\$((1+1))\"" \
        --console "mux:sock=$tmp/b.sock,stdio,ring,file=$tmp/fan.log"
    end_reader
    rm -f "$tmp/fan.log"
fi
