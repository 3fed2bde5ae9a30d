#!/bin/bash
# Restore throughput of lifeboat's restore path vs a bare `zstd -dc | tar -x`
# on the same data into the same, freshly made ext4 filesystem (a loop
# mounted image under /var/tmp), in one run. Prints figures; asserts
# nothing. Needs root (loop mount, drop_caches).
#
#   bash bench/restore-vs-pipe.sh [SOURCE_DIR (default /usr/share)] [RUNS (default 3)]
set -euo pipefail
cd "$(dirname "$0")/.."
SRC="${1:-/usr/share}"
RUNS="${2:-3}"
cargo build --release -q -p lifeboat --example restore_bench
work=$(mktemp -d /var/tmp/lifeboat-bench-XXXXXX)
cleanup() { umount "$work/mnt" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
size=$(du -sb "$SRC" | cut -f1)
truncate -s $(( size * 3 + (1 << 30) )) "$work/fs.img"
mkfs.ext4 -q -F "$work/fs.img"
mkdir "$work/mnt"
mount -o loop "$work/fs.img" "$work/mnt"
echo "machine: $(nproc) cores, $(uname -r); target: ext4 on a loop device in $work"
target/x86_64-unknown-linux-gnu/release/examples/restore_bench "$SRC" "$work/data" "$work/mnt" "$RUNS"
