#!/bin/bash
# The main job, end to end: install dependencies, fetch the kernel fixture,
# build Lifeboat, build a rescue image from that kernel and this machine's
# tools, and boot it in QEMU (TCG unless LIFEBOAT_QEMU_ACCEL=kvm), running a
# few commands in its shell. `--interactive` leaves you at the console
# (quit QEMU with Ctrl-A X).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
FIX=$(bash qemu/fixtures/kernel.sh | tail -1)
KV=$(cat "$FIX/kver")
cargo build --release --workspace -q
BIN=target/x86_64-unknown-linux-gnu/release
OUT="${LIFEBOAT_DEMO_OUT:-/var/tmp/lifeboat-demo}"
"$BIN/lifeboat" mkrescue --kernel "$FIX/boot/vmlinuz-$KV" --kver "$KV" \
  --modules-dir "$FIX/lib/modules/$KV" --output-dir "$OUT"
"$BIN/lifeboat" image verify "$OUT"
if [ "${1:-}" = "--interactive" ]; then
  exec "$BIN/lifeboat-qemu" "$OUT" --interactive
fi
"$BIN/lifeboat-qemu" "$OUT" --log "$OUT/console.log" \
  --run 'uname -r' --run 'lifeboat --version' --run 'lvm version | head -1' \
  --run 'modprobe virtio_blk && lsmod | head -5'
echo
echo "demo: the rescue image in $OUT booted to 'lifeboat: ready'; console log in $OUT/console.log"
