#!/usr/bin/env bash
# The whole test suite, from a fresh machine (Debian, Rust toolchain, root):
# installs what the tests need (qemu, nginx, a guest kernel, busybox, ...) when missing,
# then runs the format and lint checks, every Rust test (unit, integration against a real
# nginx, crash tests), a short run of every fuzz target and the VM tests. Exits non-zero
# on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "installing what the tests need (only what is missing)"
bash vm-tests/setup.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo test (workspace)"
cargo test --workspace --locked

step "fuzzing: every cargo-fuzz target for ${FUZZ_SECONDS:-30}s (scripts/fuzz.sh)"
# Installs cargo-fuzz when missing; runs on stable (RUSTC_BOOTSTRAP=1, no sanitizer).
bash scripts/fuzz.sh "${FUZZ_SECONDS:-30}"

step "VM tests: harness smoke test (reference backend)"
bash vm-tests/smoke.sh

step "VM tests: migrations through streamboot serve"
# The binary cargo test just built (never a stale release build).
SB_STREAMBOOT="${CARGO_TARGET_DIR:-$PWD/target}/debug/streamboot" bash vm-tests/scenarios.sh
