#!/usr/bin/env bash
# Builds and runs every cargo-fuzz target for a bounded time (default 60 s each).
#
# usage: scripts/fuzz.sh [SECONDS] [TARGET...]
#
# FUZZ_PROFILE=dev builds the targets unoptimized (with overflow checks): a quicker build
# for the short smoke `make test` runs; the default is cargo-fuzz's optimized build.
#
# Only the stable toolchain exists on the project's machines: cargo-fuzz needs nightly
# flags (-Zsanitizer=address, -Cpasses=sancov-module), which stable rustc accepts with
# RUSTC_BOOTSTRAP=1. cargo-fuzz itself is installed from crates.io when missing.
# New inputs go to a scratch corpus (the committed seeds in fuzz/corpus/<target> are only
# read); crashes land in fuzz/artifacts/<target>/ and make the script fail. Once a crash is
# fixed, commit its input into the corpus: tests/fuzz_corpus.rs replays it in `cargo test`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
secs=${1:-60}
shift || true
case "$secs" in ''|*[!0-9]*) echo "fuzz.sh: SECONDS must be a number, got '$secs'" >&2; exit 2 ;; esac

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz from crates.io" >&2
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1

profile=()
case "${FUZZ_PROFILE:-release}" in
    dev) profile=(--dev) ;;
    release) ;;
    *) echo "fuzz.sh: FUZZ_PROFILE must be dev or release, got '$FUZZ_PROFILE'" >&2; exit 2 ;;
esac

targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo fuzz list)
scratch=$(mktemp -d "${TMPDIR:-/tmp}/microvm-fuzz.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

status=0
for t in "${targets[@]}"; do
    echo "fuzz.sh: $t for ${secs}s" >&2
    cargo fuzz build "${profile[@]}" "$t"
    mkdir -p "$scratch/$t"
    if ! cargo fuzz run "${profile[@]}" "$t" "$scratch/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -max_len=4096 -print_final_stats=1; then
        echo "fuzz.sh: $t FAILED; reproducer(s) in fuzz/artifacts/$t/" >&2
        status=1
    fi
done
exit $status
