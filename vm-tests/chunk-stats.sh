#!/bin/bash
# chunk-stats.sh SOURCE TARGET [CHUNK_BYTES] — how much of TARGET a migration from SOURCE
# must fetch, at chunk granularity (default 64 KiB): chunks of TARGET equal to SOURCE at the
# same address, found elsewhere in SOURCE (a seed index would find them), all zero, or new.
set -euo pipefail

src=${1:?usage: chunk-stats.sh SOURCE TARGET [CHUNK_BYTES]}
dst=${2:?usage: chunk-stats.sh SOURCE TARGET [CHUNK_BYTES]}
chunk=${3:-65536}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# One sha256 per chunk, in address order (the last chunk may be short). Perl's Digest::SHA
# when present (fast); else one sha256sum per chunk.
hashes() {
	if perl -MDigest::SHA -e 1 2>/dev/null; then
		perl -MDigest::SHA=sha256_hex -e \
			'binmode STDIN; while (read(STDIN, my $b, $ARGV[0])) { print sha256_hex($b), "\n" }' \
			"$chunk" <"$1"
	else
		split -b "$chunk" --filter='sha256sum | cut -c1-64' "$1"
	fi
}
hashes "$src" >"$tmp/src"
hashes "$dst" >"$tmp/dst"
zero=$(head -c "$chunk" /dev/zero | sha256sum | cut -c1-64)

awk -v chunk="$chunk" -v zero="$zero" -v dsize="$(stat -c %s "$dst")" '
	NR == FNR { src[FNR] = $1; have[$1] = 1; next }
	{
		n++
		if ($1 == src[FNR]) same++
		else if ($1 == zero) z++
		else if ($1 in have) moved++
		else fresh++
	}
	END {
		mib = chunk * 1.0 / 1048576
		printf "target %d chunks of %d KiB (%.1f MiB)\n", n, chunk / 1024, dsize / 1048576
		printf "  same as source at the same address: %5d  (%.1f MiB)\n", same, same * mib
		printf "  differing at the same address:      %5d  (%.1f MiB), of which\n", n - same, (n - same) * mib
		printf "    all zero:                         %5d  (%.1f MiB)\n", z, z * mib
		printf "    in the source at another address: %5d  (%.1f MiB)\n", moved, moved * mib
		printf "    not in the source (to fetch):     %5d  (%.1f MiB)\n", fresh, fresh * mib
	}' "$tmp/src" "$tmp/dst"
