#!/usr/bin/env bash
# The whole test suite, from a fresh machine (Debian, Rust toolchain, root):
# installs what the tests need (qemu, nginx, a guest kernel, busybox, man-db, ...) when
# missing, then runs the format and lint checks, the dependency policy (cargo deny), every
# Rust test (unit, integration against a real nginx, crash tests), the Debian package
# (built, installed, run, removed), a short run of every fuzz target and the VM tests.
# Exits non-zero on the first failure. cargo-deny and cargo-deb are installed with
# `cargo install --locked` when missing (once: they stay in ~/.cargo/bin).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "installing what the tests need (only what is missing)"
bash vm-tests/setup.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo clippy without default features (the packaged build: no libblkio client)"
cargo clippy -p streamboot --no-default-features --lib --bins --locked -- -D warnings

step "cargo deny check licenses bans sources (deny.toml)"
# The advisories check needs the RustSec database from GitHub, which the test environment
# cannot reach: run `cargo deny check advisories` where it is reachable.
command -v cargo-deny >/dev/null || cargo install --locked cargo-deny
cargo deny --all-features check licenses bans sources

step "cargo package --workspace (both crates publishable; boot-relocator first)"
cargo package --workspace --no-verify --locked --allow-dirty

step "cargo test (workspace; default features, so the libblkio client tests run)"
cargo test --workspace --locked

step "Debian package: build, install, run, man page, remove (scripts/deb-test.sh)"
SB_DOCS_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/streamboot" bash scripts/deb-test.sh

step "fuzzing: every cargo-fuzz target for ${FUZZ_SECONDS:-30}s (scripts/fuzz.sh)"
# Installs cargo-fuzz when missing; runs on stable (RUSTC_BOOTSTRAP=1, no sanitizer).
bash scripts/fuzz.sh "${FUZZ_SECONDS:-30}"

step "VM tests: harness smoke test (reference backend)"
bash vm-tests/smoke.sh

step "VM tests: migrations through streamboot serve"
# The binary cargo test just built (never a stale release build).
SB_STREAMBOOT="${CARGO_TARGET_DIR:-$PWD/target}/debug/streamboot" bash vm-tests/scenarios.sh
