# microvm: build, guest preparation, tests (incl. the nested Linux-boot rig), run, bench.
CARGO ?= cargo
SHELL := /bin/bash

.PHONY: all deps guest build test run bench fmt clippy fuzz

all: build

# Debian packages the guest, the rig and the tests need (apt-get, only when missing).
deps:
	scripts/deps.sh

# Reference guest (Debian cloud kernel + busybox initramfs) in $${MICROVM_CACHE:-~/.cache/microvm}/guest
guest: deps
	scripts/guest.sh

build:
	$(CARGO) build --release

# All tiers; tests/boot.rs re-runs itself inside the nested rig when the host KVM cannot
# boot ordinary kernels (scripts/kvm-mode.sh).
test: guest
	$(CARGO) test --release

# Guest console on this terminal (direct, or nested with --interactive). MICROVM_ARGS
# overrides the extra microvm arguments (default: --console mux:sock,stdio).
run: build guest
	scripts/run.sh

bench: build guest
	scripts/bench.sh

fmt:
	$(CARGO) fmt --all

clippy:
	$(CARGO) clippy --release --all-targets -- -D warnings

# Every cargo-fuzz target for FUZZ_SECONDS each (default 60); crashes fail the run.
fuzz:
	scripts/fuzz.sh $${FUZZ_SECONDS:-60}
