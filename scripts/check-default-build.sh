#!/usr/bin/env bash
# Checks that a default build of the library compiles no test-only code: no fuzz harness
# (`*/fuzzing.rs`, `fuzz_input.rs`, feature `fuzzing`) and no test hook
# (`host/test_hooks.rs`, feature `test-hooks`). It reads the source files rustc compiled
# from the build's dep-info (`deps/microvm-HASH.d`), and first proves it can see them by
# building with both features. Run by `make test`.
set -euo pipefail
LOG_TAG=check-default-build
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
CARGO=${CARGO:-cargo}
TEST_ONLY='(/fuzzing\.rs|/fuzz_input\.rs|/test_hooks\.rs)'

# compiled_sources FEATURES: the source files of the library built with FEATURES.
compiled_sources() {
    local meta
    meta=$("$CARGO" build --release --lib --features "$1" --message-format=json 2>/dev/null \
        | grep '"reason":"compiler-artifact"' | grep '"name":"microvm"' \
        | grep -o '"[^"]*/deps/libmicrovm-[0-9a-f]*\.rmeta"' | tr -d '"' | tail -n 1)
    [ -n "$meta" ] || die "cargo build --lib --features '$1' named no deps/libmicrovm-HASH.rmeta"
    local dep=${meta%.rmeta}.d
    dep=${dep/\/libmicrovm-//microvm-}
    [ -s "$dep" ] || die "no dep-info at $dep"
    tr ' ' '\n' <"$dep" | grep '\.rs:\?$' | tr -d ':' | sort -u
}

with=$(compiled_sources "fuzzing,test-hooks")
n=$(grep -cE "$TEST_ONLY" <<<"$with" || true)
[ "$n" -ge 7 ] || die "with --features fuzzing,test-hooks only $n test-only files were compiled (expected the 6 harnesses, fuzz_input.rs and test_hooks.rs): the check cannot see them"
without=$(compiled_sources "")
found=$(grep -E "$TEST_ONLY" <<<"$without" || true)
[ -z "$found" ] || die "a default build compiles test-only code: $(tr '\n' ' ' <<<"$found")"
log "ok: a default build compiles $(wc -l <<<"$without") source files, none test-only ($n with the features)"
