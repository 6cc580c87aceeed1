# microvm: build, guest preparation, tests (incl. the nested Linux-boot rig), run, bench.
CARGO ?= cargo
SHELL := /bin/bash

.PHONY: all guest build test run bench fmt clippy

all: build

# Reference guest (Debian cloud kernel + busybox initramfs) in $${MICROVM_CACHE:-~/.cache/microvm}/guest
guest:
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
