#!/usr/bin/env bash
# make bench: boot time and memory of microvm vs QEMU -M microvm, side by side in ONE
# nested-rig L1 run (or directly on a host with hardware KVM; TCG numbers are only
# meaningful as ratios). N boots each (BENCH_N, default 5), alternating, same kernel,
# initrd and command line (BENCH_CMDLINE + mvcmd="poweroff -f"; microvm gets it with
# --cmdline-replace so both see exactly the same string). Times come from tools/vmmtime.rs:
# process start -> "microvm-guest: init reached" on the console, and -> process exit.
# RSS excl. guest: /proc/PID/smaps Rss summed over all mappings minus the anonymous
# mapping(s) at least as large as guest memory (the guest RAM), sampled at init reached.
# Prints a markdown snippet on stdout.
set -euo pipefail
LOG_TAG=bench
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

N=${BENCH_N:-5}
MEM=${BENCH_MEM_MIB:-256}
bin=${MICROVM_BIN:-$ROOT/target/release/microvm}
[ -x "$bin" ] || die "microvm binary $bin missing (make build, or set MICROVM_BIN)"
# Both VMMs get microvm's built-in default command line.
BASE=${BENCH_CMDLINE:-$("$bin" --print-default-cmdline)}
CMDLINE="$BASE mvcmd=\"poweroff -f\""

tools=$MICROVM_CACHE/tools; mkdir -p "$tools"
h=$(tree_hash "$ROOT/tools/vmmtime.rs")
if [ "$(cat "$tools/vmmtime.stamp" 2>/dev/null)" != "$h" ] || [ ! -x "$tools/vmmtime" ]; then
    log "building tools/vmmtime.rs"
    rustc -O --edition 2021 "$ROOT/tools/vmmtime.rs" -o "$tools/vmmtime"
    echo "$h" >"$tools/vmmtime.stamp"
fi
"$ROOT/scripts/guest.sh" >/dev/null

out=$(mktemp); trap 'rm -f "$out"' EXIT
envs=(--env "BENCH_N=$N" --env "BENCH_MEM_MIB=$MEM" --env "BENCH_CMDLINE=$CMDLINE"
      --env "BENCH_SKIP_MICROVM=${BENCH_SKIP_MICROVM:-0}")
if [ "$(kvm_mode)" = direct ]; then
    log "direct mode: $(kvm_mode_reason)"
    mode="direct (host KVM)"
    env BENCH_N="$N" BENCH_MEM_MIB="$MEM" BENCH_CMDLINE="$CMDLINE" BENCH_SKIP_MICROVM="${BENCH_SKIP_MICROVM:-0}" \
        MICROVM_BIN="$bin" MICROVM_KERNEL="$GUEST_DIR/vmlinuz" MICROVM_INITRD="$GUEST_DIR/initrd.gz" \
        VMMTIME="$tools/vmmtime" sh "$ROOT/resources/rig/bench-inner.sh" | tee "$out" >&2
else
    log "nested mode: $(kvm_mode_reason); timing inside the rig's L1 (QEMU TCG)"
    mode="nested (L1 = QEMU TCG -cpu max, kvm_amd nested=1)"
    "$ROOT/scripts/rig.sh" --bin "$bin" --with-qemu --payload "$tools/vmmtime" \
        --payload "$ROOT/resources/rig/bench-inner.sh" "${envs[@]}" \
        -- sh /rig/bench-inner.sh | tee "$out" >&2
fi

# median of column $3 (field name) for VMM $1
med() {
    grep "^BENCH $1 " "$out" | tr ' ' '\n' | sed -n "s/^$2=//p" | grep -v '^-$' | sort -n \
        | awk '{a[NR]=$1} END {if (NR==0) print "-"; else if (NR%2) print a[(NR+1)/2]; else print int((a[NR/2]+a[NR/2+1])/2)}'
}
ok_count() { grep "^BENCH $1 " "$out" | grep -c 'status=0' || true; }
ratio() { if [ "$1" = - ] || [ "$2" = - ] || [ "$2" = 0 ]; then echo -; else awk "BEGIN{printf \"%.2f\", $1/$2}"; fi; }

qi=$(med qemu init_ms); qe=$(med qemu exit_ms); qr=$(med qemu rss_excl_guest_kib)
mi=$(med microvm init_ms); me=$(med microvm exit_ms); mr=$(med microvm rss_excl_guest_kib)
cat <<MD
### Boot benchmark ($(date -u +%Y-%m-%d), $mode)

Guest: Debian $(cat "$GUEST_DIR/kernel-version"), busybox initramfs, 1 vCPU, ${MEM} MiB,
cmdline \`$CMDLINE\`. Median of $N boots each, alternating, one L1 session.

| | start -> init reached (ms) | start -> exit (ms) | RSS excl. guest RAM (KiB) | runs exit 0 |
|---|---|---|---|---|
| QEMU $(qemu-system-x86_64 --version | sed -n 's/^QEMU emulator version \([^ ]*\).*/\1/p') \`-M microvm\` | $qi | $qe | $qr | $(ok_count qemu)/$N |
| microvm | $mi | $me | $mr | $(ok_count microvm)/$N |
| ratio microvm/QEMU | $(ratio "$mi" "$qi") | $(ratio "$me" "$qe") | $(ratio "$mr" "$qr") | |
MD
