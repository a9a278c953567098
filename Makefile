# Kinesin developer entry points. `make dev` and `make test` are the README's
# quick start; .ci/run runs `make test`.

# Build outputs live outside the clone so that CI runs and fresh clones on
# the same machine reuse them (RocksDB alone takes ~14 minutes to compile).
CARGO_TARGET_DIR ?= $(shell if [ -w /var/cache ] || [ -w /var/cache/kinesin ]; then echo /var/cache/kinesin/target; else echo $(CURDIR)/target; fi)
export CARGO_TARGET_DIR
KINESIN := $(CARGO_TARGET_DIR)/release/kinesin

.PHONY: setup build dev dev3 test lint fmt unit compat chaos-build chaos-smoke chaos fuzz fuzz-smoke helm-check disk-room

setup:
	@scripts/setup.sh

build: setup
	cargo build --release --locked -p kinesin-server

## Start one node with embedded defaults (data under ./data).
dev: build
	$(KINESIN) dev

## Start three local node processes (ports 7450-7472).
dev3: build
	$(KINESIN) dev --nodes 3

fmt:
	cargo fmt --all

lint: setup
	cargo fmt --all -- --check
	cargo clippy --release --locked --workspace --all-targets -- -D warnings

## AWS client compatibility: boto3 and the AWS CLI against real nodes.
compat: setup
	scripts/compat.sh

## Fault injection (root: network namespaces). Runs land in ./chaos-runs.
CHAOS := $(CARGO_TARGET_DIR)/release/kinesin-chaos
chaos-build: build
	cargo build --release --locked -p kinesin-chaos

## A few scenarios, a few minutes: part of `make test` and CI.
chaos-smoke: chaos-build
	$(CHAOS) matrix smoke --binary $(KINESIN) --out chaos-runs/smoke

## The long matrix: every scenario, several seeds, 3 and 5 nodes.
chaos: chaos-build
	$(CHAOS) matrix long --binary $(KINESIN) --out chaos-runs/long

## Coverage-guided fuzzing (cargo-fuzz, fuzz/): FUZZ_SECONDS per target.
FUZZ_SECONDS ?= 60
fuzz: build
	scripts/fuzz.sh $(FUZZ_SECONDS)

## A short fuzz run, part of `make test`: every target for 10 s from
## libFuzzer's seed 1, so that a clean clone tries the same inputs each time.
fuzz-smoke: build
	FUZZ_ARGS=-seed=1 scripts/fuzz.sh 10

## The Helm chart, offline: lint, render with several value sets, validate.
helm-check: build
	scripts/helm-check.sh

## Below 20 GiB free on the build output's disk, delete build output,
## cheapest to rebuild first (scripts/disk-room.sh): a full disk fails links.
disk-room:
	@scripts/disk-room.sh

## The whole suite: formatting, lints, unit, integration and process tests,
## the AWS client compatibility suite (incl. CLI, metrics, Prometheus), the
## Helm chart check, the chaos smoke matrix, then a short fuzz run.
test: disk-room lint
	cargo nextest run --release --locked --workspace --no-fail-fast
	scripts/compat.sh
	scripts/helm-check.sh
	$(MAKE) chaos-smoke
	$(MAKE) fuzz-smoke
