#!/bin/bash
# Benchmark: lifeboat mkrescue (generic) vs dracut --no-hostonly --zstd on
# the same kernel fixture, in one run. Prints wall time, image size, entry
# count and the ratios. Not a test: it asserts nothing, it measures.
#
# Usage: bench/mkrescue-vs-dracut.sh [RUNS]   (needs: dracut, the fixture)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-3}"
command -v dracut >/dev/null || { echo "dracut is not installed (apt-get install dracut)" >&2; exit 1; }
FIX=$(bash qemu/fixtures/kernel.sh | tail -1)
KV=$(cat "$FIX/kver")
KERNEL="$FIX/boot/vmlinuz-$KV"
MODS="$FIX/lib/modules/$KV"
cargo build --release --workspace -q
LB=target/x86_64-unknown-linux-gnu/release/lifeboat
W=$(mktemp -d /var/tmp/lifeboat-bench.XXXXXX)
trap 'rm -rf "$W"' EXIT
export LIFEBOAT_CONFIG_DIR="$W/etc"   # no host configuration
mkdir -p "$LIFEBOAT_CONFIG_DIR"

now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

lb() { # $1 = cache dir
  printf '[rescue]\ncache_dir = "%s"\n' "$1" > "$W/bench.toml"
  "$LB" -q -c "$W/bench.toml" mkrescue --kernel "$KERNEL" --kver "$KV" --modules-dir "$MODS" --output-dir "$W/lb-out" 2>/dev/null
}

echo "kernel fixture: $KV ($(nproc) CPUs)"
cold=(); noop=()
for i in $(seq "$RUNS"); do
  rm -rf "$W/cache"; sync
  t0=$(now); lb "$W/cache"; t1=$(now); cold+=("$(echo "$t1 - $t0" | bc)")
  t0=$(now); lb "$W/cache"; t1=$(now); noop+=("$(echo "$t1 - $t0" | bc)")
done
lb_cold=$(printf '%s\n' "${cold[@]}" | median)
lb_noop=$(printf '%s\n' "${noop[@]}" | median)
lb_size=$(stat -c %s "$W/lb-out/initrd.img")
lb_files=$("$LB" image ls "$W/lb-out" | wc -l)

dr() { dracut -q --no-hostonly --zstd --kver "$KV" --kmoddir "$MODS" --force "$W/dracut.img" >/dev/null 2>&1; }
t0=$(now); dr; t1=$(now); dr_cold=$(echo "$t1 - $t0" | bc)
t0=$(now); dr; t1=$(now); dr_noop=$(echo "$t1 - $t0" | bc)
dr_size=$(stat -c %s "$W/dracut.img")
dr_files=$(lsinitrd "$W/dracut.img" 2>/dev/null | grep -cE '^[-dlcbps][-rwxsStT]{9} ')

printf '\n%-22s %14s %14s %10s\n' "" "lifeboat" "dracut" "ratio"
printf '%-22s %14.3f %14.3f %9.1fx\n' "cold build (s)" "$lb_cold" "$dr_cold" "$(echo "$dr_cold / $lb_cold" | bc -l)"
printf '%-22s %14.3f %14.3f %9.1fx\n' "no-op rebuild (s)" "$lb_noop" "$dr_noop" "$(echo "$dr_noop / $lb_noop" | bc -l)"
printf '%-22s %14d %14d %9.2fx\n' "initrd size (bytes)" "$lb_size" "$dr_size" "$(echo "$lb_size / $dr_size" | bc -l)"
printf '%-22s %14d %14d\n' "entries" "$lb_files" "$dr_files"
echo
echo "lifeboat cold runs: ${cold[*]}; no-op runs: ${noop[*]}"
echo "targets: cold >= 10x faster than dracut, size <= dracut, no-op < 0.3 s"
echo "layers:"; python3 -c "
import json,sys
m=json.load(open('$W/lb-out/manifest.json'))
for l in m['layers']: print('  %-24s %10d bytes %6d entries' % (l['name'], l['size'], l['files']))"
