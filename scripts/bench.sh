#!/usr/bin/env bash
# make bench: microvm vs QEMU -M microvm side by side in ONE nested-rig L1 run (or
# directly on a host with hardware KVM); under TCG nesting only the ratios mean much.
# Same kernel, initrd and command line for both (microvm's default, given to microvm with
# --cmdline-replace so both see exactly the same string); QEMU gets the same devices (UART
# + virtio-serial-device/virtconsole). Sections (resources/rig/bench-inner.sh):
#   boot  BENCH_N (5) boots each: start -> "init reached", -> exit, RSS excl. guest RAM
#   hvc   BENCH_TPUT_N (3) runs each: BENCH_HVC_BYTES (16 MiB) through hvc0 to stdout,
#         and microvm with sock+stdio+ring+file and a socket reader (fan-out cost)
#   uart  the same through ttyS0 alone (BENCH_UART_BYTES, 256 KiB)
#   rss   microvm's own RSS before/after BENCH_RSS_BYTES (100 MiB) through hvc0
# BENCH_PIN=1 pins both VMMs' vCPU threads away from their other threads: the default in
# the nested rig, whose L1 keeps its last CPU for vCPU threads (scripts/rig.sh), off
# when direct. BENCH_ONLY=boot|hvc|uart|rss runs one section; BENCH_MICROVM_ARGS adds microvm options
# (e.g. --vcpu-affinity 1, see docs/BENCHMARKS.md). Times come from tools/vmmtime.rs on the
# VMM's stdout. RSS excl. guest: /proc/PID/smaps Rss of all mappings minus the anonymous
# mapping(s) at least as large as guest memory (the guest RAM).
# Prints a markdown snippet on stdout.
set -euo pipefail
LOG_TAG=bench
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

N=${BENCH_N:-5}
MEM=${BENCH_MEM_MIB:-256}
bin=${MICROVM_BIN:-$ROOT/target/release/microvm}
[ -x "$bin" ] || die "microvm binary $bin missing (make build, or set MICROVM_BIN)"
# Both VMMs get microvm's built-in default command line (bench-inner.sh appends mvcmd).
CMDLINE=${BENCH_CMDLINE:-$("$bin" --print-default-cmdline)}

tools=$MICROVM_CACHE/tools; mkdir -p "$tools"
h=$(tree_hash "$ROOT/tools/vmmtime.rs")
if [ "$(cat "$tools/vmmtime.stamp" 2>/dev/null)" != "$h" ] || [ ! -x "$tools/vmmtime" ]; then
    log "building tools/vmmtime.rs"
    rustc -O --edition 2021 "$ROOT/tools/vmmtime.rs" -o "$tools/vmmtime"
    echo "$h" >"$tools/vmmtime.stamp"
fi
"$ROOT/scripts/guest.sh" >/dev/null

out=$(mktemp); trap 'rm -f "$out"' EXIT
knobs=(BENCH_N="$N" BENCH_MEM_MIB="$MEM" BENCH_CMDLINE="$CMDLINE" BENCH_ONLY="${BENCH_ONLY:-all}"
       BENCH_TPUT_N="${BENCH_TPUT_N:-3}" BENCH_HVC_BYTES="${BENCH_HVC_BYTES:-16777216}"
       BENCH_UART_BYTES="${BENCH_UART_BYTES:-262144}" BENCH_RSS_BYTES="${BENCH_RSS_BYTES:-104857600}"
       BENCH_MICROVM_ARGS="${BENCH_MICROVM_ARGS:-}"
       BENCH_RUN_TIMEOUT="${BENCH_RUN_TIMEOUT:-240}")
kmode=$(kvm_mode)
if [ "$kmode" != direct ]; then BENCH_PIN=${BENCH_PIN:-1}; fi
knobs+=(BENCH_PIN="${BENCH_PIN:-0}")
envs=()
for k in "${knobs[@]}"; do envs+=(--env "$k"); done
if [ "$kmode" = direct ]; then
    log "direct mode: $(kvm_mode_reason)"
    mode="direct (host KVM)"
    env "${knobs[@]}" MICROVM_BIN="$bin" MICROVM_KERNEL="$GUEST_DIR/vmlinuz" MICROVM_INITRD="$GUEST_DIR/initrd.gz" \
        VMMTIME="$tools/vmmtime" TMPDIR="$(mktemp -d)" sh "$ROOT/resources/rig/bench-inner.sh" | tee "$out" >&2 || rig_status=$?
else
    log "nested mode: $(kvm_mode_reason); timing inside the rig's L1 (QEMU TCG)"
    mode="nested (L1 = QEMU TCG -cpu max, kvm_amd nested=1)"
    # The whole default bench takes ~45 min in L1 on a quiet 2-core host.
    "$ROOT/scripts/rig.sh" --bin "$bin" --with-qemu --payload "$tools/vmmtime" \
        --payload "$ROOT/resources/rig/bench-inner.sh" "${envs[@]}" \
        --timeout "${BENCH_RIG_TIMEOUT:-5400}" \
        -- sh /rig/bench-inner.sh | tee "$out" >&2 || rig_status=$?
fi
# A run cut short still reports what it measured (and then fails).
rig_status=${rig_status:-0}
[ "$rig_status" = 0 ] || log "the rig failed (status $rig_status): the figures below are of the runs that finished"

# median of field $2 over the BENCH lines of case $1
med() {
    grep "^BENCH $1 " "$out" | tr ' ' '\n' | sed -n "s/^$2=//p" | grep -v '^-$' | sort -n \
        | awk '{a[NR]=$1} END {if (NR==0) print "-"; else if (NR%2) print a[(NR+1)/2]; else print int((a[NR/2]+a[NR/2+1])/2)}'
}
runs() { grep -c "^BENCH $1 " "$out" || true; }
ok_count() { grep "^BENCH $1 " "$out" | grep -c 'status=0' || true; }
ratio() { if [ "$1" = - ] || [ "$2" = - ] || [ "$2" = 0 ]; then echo -; else awk "BEGIN{printf \"%.2f\", $1/$2}"; fi; }
# median KiB/s of case $1 moving $2 bytes between the FLOOD-BEGIN and FLOOD-END markers
kibps() {
    grep "^BENCH $1 " "$out" | awk -v bytes="$2" '{
        b = ""; e = ""
        for (i = 1; i <= NF; i++) { split($i, kv, "="); if (kv[1] == "at1_ms") b = kv[2]; if (kv[1] == "at2_ms") e = kv[2] }
        if (b != "" && e != "" && b != "-" && e != "-" && e > b) printf "%.1f\n", bytes / 1024 / ((e - b) / 1000)
    }' | sort -n | awk '{a[NR]=$1} END {if (NR==0) print "-"; else if (NR%2) print a[(NR+1)/2]; else printf "%.1f\n", (a[NR/2]+a[NR/2+1])/2}'
}
qver=$(qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([^ ]*\).*/\1/p')
echo "### make bench ($(date -u +%Y-%m-%d), $mode)"
echo
echo "Guest: Debian $(cat "$GUEST_DIR/kernel-version"), busybox initramfs, 1 vCPU, ${MEM} MiB;"
echo "both VMMs get the command line \`$CMDLINE\` (+ mvcmd). QEMU $qver \`-M microvm\`"
echo "with \`-device virtio-serial-device -device virtconsole\` and the UART on one stdio mux."
[ -n "${BENCH_MICROVM_ARGS:-}" ] && echo "microvm also gets \`$BENCH_MICROVM_ARGS\`."
[ "${BENCH_PIN:-0}" = 1 ] && echo "BENCH_PIN=1: each VMM's vCPU thread on the last CPU, its other threads on the rest."
if [ "$(runs qemu)" -gt 0 ]; then
    qi=$(med qemu init_ms); qe=$(med qemu exit_ms); qr=$(med qemu rss_excl_guest_kib)
    mi=$(med microvm init_ms); me=$(med microvm exit_ms); mr=$(med microvm rss_excl_guest_kib)
    cat <<MD

Boot, median of $N runs each, alternating:

| | start -> init reached (ms) | start -> exit (ms) | RSS excl. guest RAM (KiB) | runs exit 0 |
|---|---|---|---|---|
| QEMU | $qi | $qe | $qr | $(ok_count qemu)/$(runs qemu) |
| microvm | $mi | $me | $mr | $(ok_count microvm)/$(runs microvm) |
| ratio microvm/QEMU | $(ratio "$mi" "$qi") | $(ratio "$me" "$qe") | $(ratio "$mr" "$qr") | |

"init reached" is when the VMM's stdout shows the init's marker line. microvm's own boot
timer (\`--boot-timer\`: start -> the init's write to the boot-timer register, no console
in the path), median: $(med microvm boot_timer_ms) ms.
MD
fi
tput_rows() { # prefix bytes label
    local q m f
    q=$(kibps "$1-qemu" "$2"); m=$(kibps "$1-microvm" "$2"); f=$(kibps "$1-microvm-fanout" "$2")
    echo "| $3, QEMU (stdio) | $q | | $(ok_count "$1-qemu")/$(runs "$1-qemu") |"
    echo "| $3, microvm (stdio) | $m | $(ratio "$m" "$q") | $(ok_count "$1-microvm")/$(runs "$1-microvm") |"
    echo "| $3, microvm (sock+stdio+ring+file, a socket reader) | $f | $(ratio "$f" "$q") | $(ok_count "$1-microvm-fanout")/$(runs "$1-microvm-fanout") |"
    echo "| $3, fan-out cost: one backend / four | | $(ratio "$m" "$f") | |"
}
if [ "$(runs hvc-qemu)" -gt 0 ] || [ "$(runs uart-qemu)" -gt 0 ]; then
    cat <<MD

Console throughput: the guest writes random bytes (made beforehand in tmpfs) to the raw
tty; KiB/s between the begin and end markers as seen on the VMM's stdout, median of
${BENCH_TPUT_N:-3} runs each, alternating:

| case | KiB/s | ratio to QEMU | runs exit 0 |
|---|---|---|---|
MD
    [ "$(runs hvc-qemu)" -gt 0 ] && tput_rows hvc "${BENCH_HVC_BYTES:-16777216}" "hvc0 $(( ${BENCH_HVC_BYTES:-16777216} >> 20 )) MiB"
    [ "$(runs uart-qemu)" -gt 0 ] && tput_rows uart "${BENCH_UART_BYTES:-262144}" "ttyS0 $(( ${BENCH_UART_BYTES:-262144} >> 10 )) KiB"
fi
if [ "$(runs rss-microvm)" -gt 0 ]; then
    cat <<MD

Memory under a long flood: microvm's RSS excluding guest RAM, with
sock+stdio+ring+file and a socket reader, when the guest starts writing
$(( ${BENCH_RSS_BYTES:-104857600} >> 20 )) MiB to hvc0 and when it has written them:
$(med rss-microvm at1_rss_excl_guest_kib) KiB -> $(med rss-microvm at2_rss_excl_guest_kib) KiB
($(ok_count rss-microvm)/$(runs rss-microvm) runs exit 0).
MD
fi
exit "$rig_status"
