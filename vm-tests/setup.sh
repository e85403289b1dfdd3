#!/bin/bash
# setup.sh [--check] — make sure this Debian (bookworm) machine has what the VM tests need;
# install what is missing (as root, with apt-get). Idempotent: does nothing when all is
# there. --check only reports. Exits non-zero, saying what is missing, on failure.
#
# qemu-system-x86 (7.2) conflicts with a newer qemu-utils (a 10.x backport may be
# preinstalled): both are installed in one apt-get call, with qemu-utils pinned to the
# same 7.2 version as qemu-system-x86 (--allow-downgrades).
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

check_only=0
[[ ${1:-} == --check ]] && check_only=1

log() { echo "setup: $*" >&2; }
die() {
	echo "setup: error: $*" >&2
	exit 1
}

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

# What must work afterwards: "command-or-path package" pairs.
requirements=(
	"qemu-system-x86_64 qemu-system-x86"
	"qemu-storage-daemon qemu-system-x86"
	"qemu-img qemu-utils"
	"qemu-nbd qemu-utils"
	"busybox busybox-static"
	"mkfs.ext4 e2fsprogs"
	"debugfs e2fsprogs"
	"sfdisk fdisk"
	"mkfs.vfat dosfstools"
	"nginx nginx"
	"cpio cpio"
	"xz xz-utils"
	"perl perl-base"
	"timeout coreutils"
	"curl curl"
	"promtool prometheus"
	"openssl openssl"
	"losetup mount"
	"man man-db"
	"/boot/vmlinuz-* linux-image-amd64"
	"systemd-analyze systemd"
	"virt-xml-validate libvirt-clients"
	"xmllint libxml2-utils"
	"/etc/libvirt/qemu.conf libvirt-daemon-system"
)

# Prints the packages whose tool is missing (unique, in order).
missing_packages() {
	local r what pkg seen=" "
	for r in "${requirements[@]}"; do
		read -r what pkg <<<"$r"
		if [[ $what == /* ]]; then
			compgen -G "$what" >/dev/null && continue
		elif command -v "$what" >/dev/null 2>&1 || [[ -x /usr/sbin/$what || -x /sbin/$what ]]; then
			continue
		fi
		[[ $seen == *" $pkg "* ]] || echo "$pkg"
		seen+="$pkg "
	done
	# A dynamically linked busybox cannot run in the initramfs.
	if command -v busybox >/dev/null && ! installed busybox-static && [[ $seen != *" busybox-static "* ]]; then
		echo busybox-static
	fi
	# The guest kernel's modules must match it (linux-image-amd64 brings both).
	if ! compgen -G '/lib/modules/*/modules.dep' >/dev/null && [[ $seen != *" linux-image-amd64 "* ]]; then
		echo linux-image-amd64
	fi
}

# The qemu-utils version to pair with qemu-system-x86: the same version string.
qemu_utils_version() {
	local want
	if installed qemu-system-x86; then
		want=$(dpkg-query -W -f='${Version}' qemu-system-x86)
	else
		want=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ { print $2 }')
	fi
	[[ -n $want && $want != "(none)" ]] || return 1
	if apt-cache madison qemu-utils | awk -F'|' '{ gsub(/ /, "", $2); print $2 }' | grep -qxF "$want"; then
		echo "$want"
	else
		return 1
	fi
}

# moto's S3 server (tests/s3.rs) from PyPI, in its own virtualenv.
MOTO_VENV=/opt/streamboot-test/moto-venv
if [[ ! -x $MOTO_VENV/bin/moto_server ]]; then
	log "missing: $MOTO_VENV (moto[server] from PyPI)"
	((check_only == 0)) || exit 1
	[[ $(id -u) == 0 ]] || die "not root: cannot create $MOTO_VENV"
	if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >&2; } ||
			die "apt-get install python3-venv failed"
	fi
	{ python3 -m venv "$MOTO_VENV" && "$MOTO_VENV/bin/pip" install -q 'moto[server]>=5,<6' >&2; } ||
		die "pip install moto[server] into $MOTO_VENV failed"
fi

mapfile -t missing < <(missing_packages)
if ((${#missing[@]} == 0)); then
	log "all tools present"
	exit 0
fi
log "missing packages: ${missing[*]}"
((check_only == 0)) || exit 1
[[ $(id -u) == 0 ]] || die "not root: install ${missing[*]} as root (or run this as root)"

apt-get update -qq || die "apt-get update failed"
pkgs=()
for p in "${missing[@]}"; do
	case $p in
	qemu-system-x86 | qemu-utils) ;; # handled together below
	*) pkgs+=("$p") ;;
	esac
done
if [[ " ${missing[*]} " == *" qemu-system-x86 "* || " ${missing[*]} " == *" qemu-utils "* ]]; then
	# Installing qemu-system-x86 removes a newer qemu-utils: ask for both, versions paired.
	ver=$(qemu_utils_version) || die "no qemu-utils version matching qemu-system-x86 in the apt sources"
	pkgs+=(qemu-system-x86 "qemu-utils=$ver")
fi
log "installing: ${pkgs[*]}"
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --allow-downgrades \
	"${pkgs[@]}" >&2 || die "apt-get install ${pkgs[*]} failed"

mapfile -t still < <(missing_packages)
((${#still[@]} == 0)) || die "still missing after install: ${still[*]}"
log "done"
