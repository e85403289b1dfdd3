#!/usr/bin/env bash
# Builds the .deb (cargo-deb, release, no default features), installs it with dpkg, checks
# the installed binary, man page, units and completions, and removes the package again.
# Needs root and dpkg; installs cargo-deb (cargo install --locked, cached in ~/.cargo/bin)
# when missing. Run from anywhere; used by scripts/test-all.sh.
#   SB_DOCS_BIN: a built streamboot to generate the man pages and completions with
#                (default: a debug build, made when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'deb-test: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $(id -u) == 0 ]] || die "not root: dpkg -i needs root"
command -v dpkg >/dev/null || die "dpkg missing: this test needs a Debian-like system"
if ! command -v cargo-deb >/dev/null; then
	log "installing cargo-deb (once; cached in ~/.cargo/bin)"
	cargo install --locked cargo-deb
fi
# A streamboot installed from somewhere else would be replaced and then removed: refuse.
if dpkg-query -W -f='${Status}' streamboot 2>/dev/null | grep -q 'install ok installed'; then
	die "a streamboot package is already installed: remove it first (dpkg -r streamboot)"
fi

target=${CARGO_TARGET_DIR:-$PWD/target}
bin=${SB_DOCS_BIN:-$target/debug/streamboot}
[[ -x $bin ]] || cargo build --locked --bin streamboot
# The man pages and completions come from the CLI definitions; cargo-deb takes them from
# target/docs (see [package.metadata.deb] in Cargo.toml).
rm -rf target/docs
"$bin" generate-docs target/docs

deb=$target/debian/streamboot-test.deb
rm -f "$deb"
log "building the .deb (release, no default features)"
# --strip: the release profile keeps limited debug info (debug = 1) for backtraces; the package
# ships a stripped binary.
cargo deb --locked -p streamboot --strip --output "$deb" >&2
[[ -s $deb ]] || die "cargo deb made no $deb"
contents=$(dpkg-deb --contents "$deb")
for f in ./usr/bin/streamboot ./usr/share/man/man1/streamboot-serve.1.gz \
	./usr/share/bash-completion/completions/streamboot ./lib/systemd/system/streamboot@.service; do
	grep -qF " $f" <<<"$contents" || die "$deb lacks $f"
done

# The units are new or changed on install/upgrade/remove: the scripts make systemd reread them.
for script in postinst postrm; do
	dpkg-deb --info "$deb" "$script" | grep -q "systemctl --system daemon-reload" ||
		die "$deb: its $script does not run systemctl daemon-reload"
done

cleanup() { dpkg -r streamboot >/dev/null 2>&1 || true; }
trap cleanup EXIT
log "installing $deb"
dpkg -i "$deb" >&2
version=$(/usr/bin/streamboot --version)
pkgid=$(cargo pkgid --locked -p streamboot)
[[ $version == "streamboot ${pkgid##*[#@]}" ]] || die "installed binary says: $version"
MANPAGER=cat MANWIDTH=80 man streamboot-serve | grep -q "vhost-user-blk" ||
	die "man streamboot-serve does not show the page"
# Built without the libblkio client: the binary does not link it.
! grep -q "blkio_connect\|virtio-blk-vhost-user" /usr/bin/streamboot ||
	die "the packaged binary contains the libblkio client"
# The packaged demo has no libblkio client: without a VM it says so in one line.
work=$(mktemp -d)
if out=$(/usr/bin/streamboot demo --no-vm --synthetic --work "$work/demo" 2>&1); then
	rm -rf "$work"
	die "the packaged demo ran a blkio client"
fi
rm -rf "$work"
grep -q "streamboot: error: .*without the \`demo-blkio\` feature" <<<"$out" ||
	die "the packaged demo without a VM failed otherwise: $(tail -n1 <<<"$out")"
dpkg -r streamboot >&2
trap - EXIT
[[ ! -e /usr/bin/streamboot ]] || die "/usr/bin/streamboot left after dpkg -r"
log "ok: $version installed, man streamboot-serve shown, removed again"
