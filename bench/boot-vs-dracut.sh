#!/bin/bash
# Benchmark: time from kernel start to a usable shell under QEMU TCG, for
# the Lifeboat rescue image (up to `lifeboat: ready`: drivers loaded,
# DHCP address, sshd starting, shell on the serial console) and for
# dracut's generic image of the same kernel (up to its rd.break=pre-mount
# shell: udev settled, root disk found, no network). Measured in the same
# run. Prints the guest uptime when the shell is offered and the host wall
# time from QEMU start to it. Asserts nothing.
#
# Usage: bench/boot-vs-dracut.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-3}"
command -v dracut >/dev/null || { echo "dracut is not installed" >&2; exit 1; }
FIX=$(bash qemu/fixtures/kernel.sh | tail -1)
KV=$(cat "$FIX/kver")
cargo build --release --workspace -q
BIN=target/x86_64-unknown-linux-gnu/release
W=$(mktemp -d /var/tmp/lifeboat-bootbench.XXXXXX)
trap 'rm -rf "$W"' EXIT
export LIFEBOAT_CONFIG_DIR="$W/etc"; mkdir -p "$LIFEBOAT_CONFIG_DIR"
printf '[network]\ncapture = false\n[rescue]\ncache_dir = "%s/cache"\n' "$W" > "$W/lb.toml"
"$BIN/lifeboat" -q -c "$W/lb.toml" mkrescue --kernel "$FIX/boot/vmlinuz-$KV" --kver "$KV" \
  --modules-dir "$FIX/lib/modules/$KV" --output-dir "$W/lb" 2>/dev/null
dracut -q --no-hostonly --zstd --kver "$KV" --kmoddir "$FIX/lib/modules/$KV" --force "$W/dracut.img" >/dev/null 2>&1
truncate -s 64M "$W/disk.img"
mkfs.ext4 -q -F "$W/disk.img"   # dracut waits for a root filesystem before pre-mount

# One boot: prints "<guest uptime at the shell> <host wall seconds>". The
# guest time is read from the console: lifeboat's "ready (uptime X s)", and
# the kernel timestamp of dracut's "Break before pre-mount" (its shell follows).
measure() {
  local out err wall up
  err=$(mktemp)
  out=$("$@" 2>"$err") || { cat "$err" >&2; exit 1; }
  wall=$(sed -n 's/.*after \([0-9.]*\) s (host wall time.*/\1/p' "$err")
  rm -f "$err"
  up=$(echo "$out" | sed -n 's/.*lifeboat: ready (uptime \([0-9.]*\) s).*/\1/p' | head -1)
  if [ -z "$up" ]; then
    up=$(echo "$out" | sed -n 's/^\[ *\([0-9.]*\)\].*Break before pre-mount.*/\1/p' | head -1)
  fi
  echo "$up $wall"
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

lb_up=(); lb_wall=(); dr_up=(); dr_wall=()
for i in $(seq "$RUNS"); do
  read -r u w < <(measure "$BIN/lifeboat-qemu" "$W/lb" --net --disk "$W/disk.img" --append "console=ttyS0")
  lb_up+=("$u"); lb_wall+=("$w")
  read -r u w < <(measure "$BIN/lifeboat-qemu" --kernel "$W/lb/vmlinuz-$KV" --initrd "$W/dracut.img" \
      --disk "$W/disk.img" --expect "Press Enter for maintenance" --append "console=ttyS0 root=/dev/vda rd.break=pre-mount rd.shell")
  dr_up+=("$u"); dr_wall+=("$w")
done
a=$(printf '%s\n' "${lb_up[@]}" | median); b=$(printf '%s\n' "${dr_up[@]}" | median)
c=$(printf '%s\n' "${lb_wall[@]}" | median); d=$(printf '%s\n' "${dr_wall[@]}" | median)
echo "kernel $KV, accel ${LIFEBOAT_QEMU_ACCEL:-tcg}, $RUNS run(s) each, medians:"
printf '%-34s %10s %10s %8s\n' "" "lifeboat" "dracut" "ratio"
printf '%-34s %10.2f %10.2f %7.2fx\n' "kernel start -> shell (guest s)" "$a" "$b" "$(echo "$a / $b" | bc -l)"
printf '%-34s %10.2f %10.2f %7.2fx\n' "QEMU start -> shell (host s)" "$c" "$d" "$(echo "$c / $d" | bc -l)"
echo "lifeboat runs (guest s): ${lb_up[*]}   dracut runs (guest s): ${dr_up[*]}"
echo "goal: lifeboat <= 0.3x dracut's time"
