# microvm: build, guest preparation, tests (incl. the nested Linux-boot rig), run, bench.
CARGO ?= cargo
SHELL := /bin/bash

.PHONY: all deps guest build test run bench fmt clippy fuzz fuzz-smoke

all: build

# Debian packages the guest, the rig and the tests need (apt-get, only when missing).
deps:
	scripts/deps.sh

# Reference guest (Debian cloud kernel + busybox initramfs) in $${MICROVM_CACHE:-~/.cache/microvm}/guest
guest: deps
	scripts/guest.sh

# microvm and the bench helpers in tools/ (the whole workspace; fuzz/ is cargo-fuzz's).
build:
	$(CARGO) build --release --workspace

# All tiers, with the test-only code built in (features fuzzing: the corpus replay;
# test-hooks: the hooks tests drive through the binary); tests/boot/main.rs re-runs itself
# inside the nested rig when the host KVM cannot boot ordinary kernels (docs/RIG.md). The
# fuzz smoke runs first so that cargo test's summary closes the output.
# scripts/check-default-build.sh then shows a default build compiles none of that code.
test: guest fuzz-smoke
	$(CARGO) test --release --features fuzzing,test-hooks
	scripts/check-default-build.sh

# Guest console on this terminal (direct, or nested with --interactive). MICROVM_ARGS
# overrides the extra microvm arguments (default: --console mux:sock,stdio).
run: build guest
	scripts/run.sh

bench: build guest
	scripts/bench.sh

# The workspace (microvm, tools/) and the fuzz targets.
fmt:
	$(CARGO) fmt --all
	$(CARGO) fmt --manifest-path fuzz/Cargo.toml

# Both builds: the default one (what users get) and the one `make test` runs.
clippy:
	$(CARGO) clippy --release --workspace --all-targets --features microvm/fuzzing,microvm/test-hooks -- -D warnings
	$(CARGO) clippy --release --workspace --lib --bins -- -D warnings

# Every cargo-fuzz target for FUZZ_SECONDS each (default 60); crashes fail the run.
fuzz:
	scripts/fuzz.sh $${FUZZ_SECONDS:-60}

# CI smoke: every target, unoptimized build, FUZZ_SMOKE_SECONDS each (default 5), so the
# targets keep building and running (docs/RELIABILITY.md); FUZZ_SMOKE_SECONDS=0 skips it.
fuzz-smoke:
	@if [ "$${FUZZ_SMOKE_SECONDS:-5}" = 0 ]; then echo "fuzz smoke skipped"; \
	else FUZZ_PROFILE=dev scripts/fuzz.sh $${FUZZ_SMOKE_SECONDS:-5}; fi
