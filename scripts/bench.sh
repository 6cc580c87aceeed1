#!/usr/bin/env bash
# make bench: microvm, QEMU -M microvm and (when FC_BIN names a Firecracker binary)
# Firecracker side by side, in two configurations, each in ONE nested-rig L1 run (or
# directly on a host with hardware KVM); under TCG nesting only the ratios mean much.
#
# Configurations (BENCH_CONFIGS, default "default pinned"):
#   default  nothing pinned (what users run); in the rig L1 has both CPUs for everything
#   pinned   each VMM's vCPU thread on the last CPU, its other threads on the others; in
#            the rig L1 keeps that CPU for them (isolcpus, docs/RIG.md)
# Same kernel (Debian's bzImage; Firecracker, which takes no bzImage, gets the vmlinux
# unpacked from it here), initrd and command line (microvm's default, given to microvm
# with --cmdline-replace so all see exactly the same string). Sections
# (resources/rig/bench-inner.sh; BENCH_ONLY="hvc" or "boot uart" runs those only):
#   first  BENCH_FIRST_N (10) runs of a minimal ELF kernel (tools/firstinsn.rs): VMM
#          start -> the guest's first instructions' output, wall and CPU ms (no QEMU)
#   boot   BENCH_N (5) boots each: start -> "init reached", -> exit, RSS excl. guest RAM
#   uart   BENCH_TPUT_N (3) runs each: BENCH_UART_BYTES (64 KiB) through ttyS0
#   hvc    BENCH_TPUT_N runs each: BENCH_HVC_BYTES (16 MiB) through hvc0 (no Firecracker),
#          microvm with one backend and with four (sock+stdio+ring+file, a socket reader)
#   rss    microvm's own RSS before/after BENCH_RSS_BYTES (100 MiB) through hvc0
# BENCH_BASELINE_BIN: an earlier microvm build (e.g. the last release), run beside this one
# in the hvc section with one backend and with four, so a change shows as "not slower"
# side by side in the same run. BENCH_MICROVM_ARGS adds microvm options. Times come from
# tools/vmmtime.rs on the VMM's stdout; VM exits per byte from KVM's debugfs counters.
# RSS excl. guest: /proc/PID/smaps Rss of all mappings minus the anonymous mapping(s) at
# least as large as guest memory.
# Prints a markdown snippet on stdout (also in $MICROVM_CACHE/bench/last.md).
set -euo pipefail
LOG_TAG=bench
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

N=${BENCH_N:-5}
MEM=${BENCH_MEM_MIB:-256}
bin=$(microvm_bin)
fc=${FC_BIN:-}
if [ -n "$fc" ]; then
    [ -x "$fc" ] || die "FC_BIN=$fc is not an executable file (a Firecracker binary, built outside this repository)"
else
    log "FC_BIN not set: Firecracker is left out (see docs/BENCHMARKS.md)"
fi
# Everything gets microvm's built-in default command line (bench-inner.sh appends mvcmd).
CMDLINE=${BENCH_CMDLINE:-$("$bin" --print-default-cmdline)}
base=${BENCH_BASELINE_BIN:-}
[ -z "$base" ] || [ -x "$base" ] || die "BENCH_BASELINE_BIN=$base is not an executable file (an earlier microvm build)"
basever=$([ -n "$base" ] && "$base" --version 2>/dev/null | head -n1 || true)
CONFIGS=${BENCH_CONFIGS:-default pinned}

# The helpers (tools/, a workspace member): vmmtime, and firstinsn's ELF written here.
log "building tools/ (cargo build --release -p microvm-tools)"
(cd "$ROOT" && "${CARGO:-cargo}" build --release -p microvm-tools --quiet) \
    || die "cargo build --release -p microvm-tools failed"
tools=${CARGO_TARGET_DIR:-$ROOT/target}/release
first_elf=$MICROVM_CACHE/bench/first.elf; mkdir -p "$(dirname "$first_elf")"
"$tools/firstinsn" "$first_elf"
"$ROOT/scripts/guest.sh" >/dev/null

# The vmlinux inside the reference guest's bzImage, for Firecracker (bzImage header:
# setup_sects at 0x1f1, payload_offset/length at 0x248; the compression by its magic).
vmlinux=$GUEST_DIR/vmlinux
unpack_vmlinux() {
    local img=$1 out=$2 sects off len magic
    sects=$(od -An -tu1 -j $((0x1f1)) -N1 "$img" | tr -d ' ')
    [ "$sects" = 0 ] && sects=4
    off=$(od -An -tu4 -j $((0x248)) -N4 "$img" | tr -d ' ')
    len=$(od -An -tu4 -j $((0x24c)) -N4 "$img" | tr -d ' ')
    magic=$(od -An -tx1 -j $(((sects + 1) * 512 + off)) -N4 "$img" | tr -d ' ')
    local payload=(tail -c +$(((sects + 1) * 512 + off + 1)) "$img")
    case "$magic" in
        02214c18) need_pkgs lz4; "${payload[@]}" | head -c "$len" | lz4 -dc >"$out" ;;
        1f8b*) "${payload[@]}" | head -c "$len" | gzip -dc >"$out" 2>/dev/null || [ -s "$out" ] ;;
        fd377a58) need_pkgs xz-utils; "${payload[@]}" | head -c "$len" | xz -dc >"$out" 2>/dev/null || [ -s "$out" ] ;;
        28b52ffd) need_pkgs zstd; "${payload[@]}" | head -c "$len" | zstd -dcq >"$out" ;;
        *) die "cannot unpack $img for Firecracker: unknown payload magic $magic" ;;
    esac
    [ "$(head -c4 "$out" | od -An -c | tr -d ' ')" = '177ELF' ] || die "unpacking $img did not give an ELF vmlinux"
}
if [ -n "$fc" ]; then
    h=$(tree_hash "$GUEST_DIR/vmlinuz")
    if [ "$(cat "$vmlinux.stamp" 2>/dev/null)" != "$h" ] || [ ! -s "$vmlinux" ]; then
        log "unpacking the guest's vmlinux for Firecracker"
        unpack_vmlinux "$GUEST_DIR/vmlinuz" "$vmlinux.tmp" && mv "$vmlinux.tmp" "$vmlinux"
        echo "$h" >"$vmlinux.stamp"
    fi
fi

out=$(mktemp); trap 'rm -f "$out"' EXIT
knobs=(BENCH_N="$N" BENCH_MEM_MIB="$MEM" BENCH_CMDLINE="$CMDLINE" BENCH_ONLY="${BENCH_ONLY:-all}"
       BENCH_FIRST_N="${BENCH_FIRST_N:-10}" BENCH_TPUT_N="${BENCH_TPUT_N:-3}"
       BENCH_HVC_BYTES="${BENCH_HVC_BYTES:-16777216}" BENCH_UART_BYTES="${BENCH_UART_BYTES:-65536}"
       BENCH_RSS_BYTES="${BENCH_RSS_BYTES:-104857600}" BENCH_MICROVM_ARGS="${BENCH_MICROVM_ARGS:-}"
       BENCH_RUN_TIMEOUT="${BENCH_RUN_TIMEOUT:-300}")
kmode=$(kvm_mode)
rig_status=0
for cfg in $CONFIGS; do
    case "$cfg" in default|pinned) ;; *) die "BENCH_CONFIGS: unknown configuration $cfg (default, pinned)" ;; esac
    envs=(); for k in "${knobs[@]}" BENCH_CONFIG="$cfg"; do envs+=(--env "$k"); done
    st=0
    if [ "$kmode" = direct ]; then
        log "direct mode: $(kvm_mode_reason); configuration $cfg"
        env "${knobs[@]}" BENCH_CONFIG="$cfg" MICROVM_BIN="$bin" MICROVM_KERNEL="$GUEST_DIR/vmlinuz" \
            MICROVM_INITRD="$GUEST_DIR/initrd.gz" VMMTIME="$tools/vmmtime" FIRST_ELF="$first_elf" \
            FC="${fc:-/nonexistent}" VMLINUX="$vmlinux" MICROVM_BASELINE="${base:-/nonexistent}" TMPDIR="$(mktemp -d)" \
            sh "$ROOT/resources/rig/bench-inner.sh" | tee -a "$out" >&2 || st=$?
    else
        log "nested mode: $(kvm_mode_reason); configuration $cfg, timing inside the rig's L1 (QEMU TCG)"
        rig=("$ROOT/scripts/rig.sh" --bin "$bin" --with-qemu --payload "$tools/vmmtime"
             --payload "$first_elf" --payload "$ROOT/resources/rig/bench-inner.sh")
        [ -n "$fc" ] && rig+=(--payload "$fc" --payload "$vmlinux")
        [ "$cfg" = default ] && rig+=(--no-isolcpus)
        # A FC_BIN not named "firecracker" still lands at /rig/firecracker's place.
        [ -n "$fc" ] && envs+=(--env "FC=/rig/$(basename "$fc")")
        # The baseline lands in /rig under its own name; a name clash with the VMMs or
        # tools there would replace one of them.
        if [ -n "$base" ]; then
            case "$(basename "$base")" in microvm|firecracker|vmmtime|first.elf|vmlinux|bench-inner.sh)
                die "BENCH_BASELINE_BIN: give the earlier build another file name than $(basename "$base") (e.g. microvm-base)" ;;
            esac
            rig+=(--payload "$base"); envs+=(--env "MICROVM_BASELINE=/rig/$(basename "$base")")
        fi
        "${rig[@]}" "${envs[@]}" --timeout "${BENCH_RIG_TIMEOUT:-5400}" \
            -- sh /rig/bench-inner.sh | tee -a "$out" >&2 || st=$?
    fi
    # A run cut short still reports what it measured (and then fails).
    [ "$st" = 0 ] || { log "configuration $cfg: the rig failed (status $st): its figures are of the runs that finished"; rig_status=$st; }
done

# median of field $3 over the BENCH lines of configuration $1, case $2
med() {
    grep "^BENCH $1 $2 " "$out" | tr ' ' '\n' | sed -n "s/^$3=//p" | grep -v '^-$' | sort -g \
        | awk '{a[NR]=$1} END {if (NR==0) print "-"; else if (NR%2) print a[(NR+1)/2]; else printf "%.1f\n", (a[NR/2]+a[NR/2+1])/2}'
}
# median of at2 - at1 of field $3 (ms, or a KVM counter) over the BENCH lines of $1 $2
med_delta() {
    grep "^BENCH $1 $2 " "$out" | awk -v f="$3" '{
        b = ""; e = ""
        for (i = 1; i <= NF; i++) { split($i, kv, "="); if (kv[1] == "at1_" f) b = kv[2]; if (kv[1] == "at2_" f) e = kv[2] }
        if (b != "" && e != "" && b != "-" && e != "-" && e >= b) print e - b
    }' | sort -g | awk '{a[NR]=$1} END {if (NR==0) print "-"; else if (NR%2) print a[(NR+1)/2]; else printf "%.1f\n", (a[NR/2]+a[NR/2+1])/2}'
}
runs() { grep -c "^BENCH $1 $2 " "$out" || true; }
oks() { echo "$(grep "^BENCH $1 $2 " "$out" | grep -c 'status=0' || true)/$(runs "$1" "$2")"; }
# runs of $1 $2 whose output reached the end marker (a guest that crashed or hung
# mid-flood exits without it; its time is not counted) / all runs
completes() { echo "$(grep "^BENCH $1 $2 " "$out" | grep -c 'at2_ms=[0-9]' || true)/$(runs "$1" "$2")"; }
ratio() { if [ "$1" = - ] || [ "$2" = - ] || [ "$2" = 0 ]; then echo -; else awk "BEGIN{printf \"%.2f\", $1/$2}"; fi; }
per_byte() { if [ "$1" = - ]; then echo -; else awk "BEGIN{printf \"%.3f\", $1/$2}"; fi; }
fmt() { if [ "$1" = - ]; then echo -; else awk "BEGIN{printf \"%.0f\", $1}"; fi; }

qver=$(qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([^ ]*\).*/\1/p')
fcver=$([ -n "$fc" ] && "$fc" --version 2>/dev/null | head -n1 || true)
if [ "$kmode" = direct ]; then mode="direct (host KVM)"; else mode="nested (L1 = QEMU TCG -cpu max -smp 2, kvm_amd nested=1)"; fi
md=$MICROVM_CACHE/bench/last.md; mkdir -p "$(dirname "$md")"
{
echo "### make bench ($(date -u +%Y-%m-%d), $mode)"
echo
echo "Guest: Debian $(cat "$GUEST_DIR/kernel-version"), busybox initramfs, 1 vCPU, ${MEM} MiB; every VMM"
echo "gets the command line \`$CMDLINE\` (+ mvcmd). QEMU $qver \`-M microvm\` with"
echo "\`-device virtio-serial-device -device virtconsole\` and the UART on one stdio mux."
[ -n "$fcver" ] && echo "$fcver (\`--level Error --no-api --config-file\`) boots the vmlinux unpacked from the same bzImage."
[ -n "${BENCH_MICROVM_ARGS:-}" ] && echo "microvm also gets \`$BENCH_MICROVM_ARGS\`."
[ -n "$base" ] && echo "\"baseline\" is an earlier microvm build, \`$(basename "$base")\` ($basever), with the same options."
for cfg in $CONFIGS; do
    case "$cfg" in
        default) desc="nothing pinned" ;;
        pinned) desc="each VMM's vCPU thread on the last CPU, its other threads on the others" ;;
    esac
    echo
    echo "#### Configuration: $cfg ($desc)"
    if [ "$(runs "$cfg" first-microvm)" -gt 0 ]; then
        mw=$(med "$cfg" first-microvm init_ms); mc=$(med "$cfg" first-microvm init_cpu_ms); me=$(med "$cfg" first-microvm exit_ms)
        fw=$(med "$cfg" first-firecracker init_ms); fcpu=$(med "$cfg" first-firecracker init_cpu_ms); fe=$(med "$cfg" first-firecracker exit_ms)
        cat <<MD

VMM start -> first guest instruction ([$cfg], median of ${BENCH_FIRST_N:-10}; a minimal ELF
kernel whose first instructions print a line, then reset; ms):

| | wall, to the line | CPU, to the line | wall, start -> exit | runs exit 0 |
|---|---|---|---|---|
| Firecracker | $(fmt "$fw") | $(fmt "$fcpu") | $(fmt "$fe") | $(oks "$cfg" first-firecracker) |
| microvm | $(fmt "$mw") | $(fmt "$mc") | $(fmt "$me") | $(oks "$cfg" first-microvm) |
| microvm \`--no-seccomp\` | $(fmt "$(med "$cfg" first-microvm-noseccomp init_ms)") | $(fmt "$(med "$cfg" first-microvm-noseccomp init_cpu_ms)") | $(fmt "$(med "$cfg" first-microvm-noseccomp exit_ms)") | $(oks "$cfg" first-microvm-noseccomp) |
| ratio microvm/Firecracker | **$(ratio "$mw" "$fw")** | **$(ratio "$mc" "$fcpu")** | $(ratio "$me" "$fe") | |

Firecracker runs without seccomp filters here (its build for the GNU target has none; the
filter it ships for musl stops a glibc build); microvm with its filters, and without.
MD
    fi
    if [ "$(runs "$cfg" boot-microvm)" -gt 0 ]; then
        row() { # label case
            echo "| $1 | $(fmt "$(med "$cfg" "$2" init_ms)") | $(fmt "$(med "$cfg" "$2" exit_ms)") | $(fmt "$(med "$cfg" "$2" rss_excl_guest_kib)") | $(oks "$cfg" "$2") |"
        }
        mi=$(med "$cfg" boot-microvm init_ms); me=$(med "$cfg" boot-microvm exit_ms)
        ei=$(med "$cfg" boot-microvm-vmlinux init_ms); ee=$(med "$cfg" boot-microvm-vmlinux exit_ms)
        fi_=$(med "$cfg" boot-firecracker init_ms); fe=$(med "$cfg" boot-firecracker exit_ms)
        qi=$(med "$cfg" boot-qemu init_ms); qe=$(med "$cfg" boot-qemu exit_ms)
        cat <<MD

Boot ([$cfg], median of $N runs each, alternating; ms, KiB):

| | start -> init reached | start -> exit | RSS excl. guest RAM | runs exit 0 |
|---|---|---|---|---|
$(row "QEMU (bzImage)" boot-qemu)
$(row "Firecracker (vmlinux)" boot-firecracker)
$(row "microvm (bzImage)" boot-microvm)
$(row "microvm (vmlinux)" boot-microvm-vmlinux)
| ratio microvm (bzImage)/Firecracker | $(ratio "$mi" "$fi_") | **$(ratio "$me" "$fe")** | | |
| ratio microvm (vmlinux)/Firecracker | $(ratio "$ei" "$fi_") | $(ratio "$ee" "$fe") | | |
| ratio microvm (bzImage)/QEMU | $(ratio "$mi" "$qi") | $(ratio "$me" "$qe") | | |

microvm's boot timer (\`--boot-timer\`: start -> the init's write to the boot-timer register),
median: $(med "$cfg" boot-microvm boot_timer_ms) ms.
MD
    fi
    tput_row() { # label case bytes
        local t x
        t=$(med_delta "$cfg" "$2" ms); x=$(med_delta "$cfg" "$2" kvm_exits)
        echo "| $1 | $(fmt "$t") | $(per_byte "$x" "$3") | $(completes "$cfg" "$2") |"
    }
    ub=${BENCH_UART_BYTES:-65536}
    if [ "$(runs "$cfg" uart-microvm)" -gt 0 ]; then
        um=$(med_delta "$cfg" uart-microvm ms); uf=$(med_delta "$cfg" uart-firecracker ms); uq=$(med_delta "$cfg" uart-qemu ms)
        cat <<MD

$((ub >> 10)) KiB through ttyS0 ([$cfg], median of ${BENCH_TPUT_N:-3}; the guest writes random bytes to the raw
tty; ms between its begin and end markers on the VMM's stdout; VM exits per byte from KVM's
counters over the same span):

| | ms | VM exits per byte | runs complete |
|---|---|---|---|
$(tput_row QEMU uart-qemu "$ub")
$(tput_row Firecracker uart-firecracker "$ub")
$(tput_row microvm uart-microvm "$ub")
| ratio microvm/Firecracker | **$(ratio "$um" "$uf")** | | |
| ratio microvm/QEMU | $(ratio "$um" "$uq") | | |
MD
    fi
    hb=${BENCH_HVC_BYTES:-16777216}
    if [ "$(runs "$cfg" hvc-microvm)" -gt 0 ]; then
        hm=$(med_delta "$cfg" hvc-microvm ms); hf=$(med_delta "$cfg" hvc-microvm-fanout ms); hq=$(med_delta "$cfg" hvc-qemu ms)
        cat <<MD

$((hb >> 20)) MiB through hvc0 ([$cfg], median of ${BENCH_TPUT_N:-3}; as above; Firecracker has no virtio
console):

| | ms | VM exits per byte | runs complete |
|---|---|---|---|
$(tput_row "QEMU (stdio)" hvc-qemu "$hb")
$(tput_row "microvm (stdio)" hvc-microvm "$hb")
$(tput_row "microvm (sock+stdio+ring+file, a socket reader)" hvc-microvm-fanout "$hb")
| ratio microvm (one backend)/QEMU | **$(ratio "$hm" "$hq")** | | |
| ratio microvm (four backends)/QEMU | **$(ratio "$hf" "$hq")** | | |
MD
        if [ "$(runs "$cfg" hvc-baseline)" -gt 0 ]; then
            bm=$(med_delta "$cfg" hvc-baseline ms); bf=$(med_delta "$cfg" hvc-baseline-fanout ms)
            cat <<MD

The same run, this microvm against the baseline build ([$cfg]):

| | ms | VM exits per byte | runs complete |
|---|---|---|---|
$(tput_row "baseline (stdio)" hvc-baseline "$hb")
$(tput_row "baseline (sock+stdio+ring+file, a socket reader)" hvc-baseline-fanout "$hb")
| ratio microvm/baseline, one backend | **$(ratio "$hm" "$bm")** | | |
| ratio microvm/baseline, four backends | **$(ratio "$hf" "$bf")** | | |
MD
        fi
    fi
    if [ "$(runs "$cfg" rss-microvm)" -gt 0 ]; then
        cat <<MD

Memory under a long flood ([$cfg]): microvm's RSS excluding guest RAM, with sock+stdio+ring+file
and a socket reader, when the guest starts writing $(( ${BENCH_RSS_BYTES:-104857600} >> 20 )) MiB to hvc0 and when it
has written them: $(med "$cfg" rss-microvm at1_rss_excl_guest_kib) KiB -> $(med "$cfg" rss-microvm at2_rss_excl_guest_kib) KiB ($(oks "$cfg" rss-microvm) runs exit 0).
MD
    fi
done
} | tee "$md"
exit "$rig_status"
