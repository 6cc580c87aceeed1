#!/usr/bin/env bash
# make run: boot the reference guest with its console on this terminal.
# Direct on a host whose KVM boots ordinary kernels; otherwise inside the nested rig
# (scripts/rig.sh --interactive), saying so. Extra microvm args: $MICROVM_ARGS
# (default `--console mux:sock,stdio`) and this script's own arguments.
set -euo pipefail
LOG_TAG=run
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MICROVM_ARGS=${MICROVM_ARGS---console mux:sock,stdio}
bin=$(microvm_bin)
"$ROOT/scripts/guest.sh" >/dev/null
# shellcheck disable=SC2206
extra=($MICROVM_ARGS)

mode=$(kvm_mode)
if [ "$mode" = direct ]; then
    exec "$bin" --kernel "$GUEST_DIR/vmlinuz" --initrd "$GUEST_DIR/initrd.gz" "${extra[@]}" "$@"
fi
log "nesting: $(kvm_mode_reason)."
log "running microvm inside an L1 VM (QEMU TCG -cpu max, kvm_amd nested=1): expect ~15-30 s to the guest shell."
log "L1 powers off when microvm exits (guest 'poweroff -f')."
# L1 keeps CPU 1 for vCPU threads (isolcpus; TCG's nested SVM can wedge an L1 CPU
# running an L2 that spins with interrupts off; see docs/RIG.md).
exec "$ROOT/scripts/rig.sh" --interactive --bin "$bin" -- \
    /rig/microvm --kernel /rig/vmlinuz --initrd /rig/initrd.gz --vcpu-affinity 1 "${extra[@]}" "$@"
