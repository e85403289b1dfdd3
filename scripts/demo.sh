#!/bin/bash
# demo.sh — the one-command streamboot demo, on a fresh Debian (bookworm) machine, as root:
#
#   bash scripts/demo.sh [DEMO-ARGS...]
#
# Does the set-up only: installs what is missing (vm-tests/setup.sh: qemu, busybox, a guest
# kernel, mkfs.ext4, ...), builds streamboot (cargo build --release), then runs the real
# demo, `streamboot demo`, which does everything else in one process:
#   builds a bootable v1/v2 image pair and the guest (embedded vm-tests/build-images.sh and
#   build-guest.sh, cached in $XDG_CACHE_HOME/streamboot-demo) → serves v2.img from a
#   built-in loopback HTTP server → prepare (a copy of v1 is the VM's disk) → serve, and
#   QEMU boots v2 through vhost-user-blk while it streams (TCG) → confirm while the VM runs
#   → hydration finishes → commit → the disk is v2.img byte for byte → it boots plain.
# Without QEMU, `streamboot demo` drives the disk with a blkio client instead of a VM.
# DEMO-ARGS go to `streamboot demo` (e.g. --no-vm, --work DIR, --json); see
# `streamboot demo --help`. A few minutes the first time (guest and images are built), then
# about a minute under TCG.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

say() { printf '\n==> %s\n' "$*"; }
die() {
	echo "demo: error: $*" >&2
	exit 1
}

say "packages (vm-tests/setup.sh)"
bash vm-tests/setup.sh

say "build streamboot (cargo build --release)"
export PATH="$PATH:$HOME/.cargo/bin"
command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs), then run this again"
cargo build --release
sb=${CARGO_TARGET_DIR:-$repo/target}/release/streamboot
[[ -x $sb ]] || die "no $sb after the build"

say "streamboot demo $*"
exec "$sb" demo "$@"
