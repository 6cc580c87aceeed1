#!/usr/bin/env bash
# Prints `direct` when the host KVM can boot ordinary kernels (/dev/kvm usable and not
# PVM, i.e. /sys/module/kvm_pvm absent), `nested` otherwise. Override: MICROVM_RIG=direct|nested.
# With -v, also prints the reason on stderr.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
[ "${1:-}" = -v ] && echo "kvm-mode: $(kvm_mode_reason)" >&2
kvm_mode
