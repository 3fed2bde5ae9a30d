#!/bin/bash
# The recovery matrix: real Debian sources backed up with `lifeboat
# mkbackup`, recovered by the rescue image onto blank VMs and checked against
# the source (tests/e2e.rs; the CI tier, scripts/test.sh, runs only the
# rehearsal of the GPT source).
#
#   bash scripts/e2e.sh               every cell
#   bash scripts/e2e.sh CELL...       these cells
#   bash scripts/e2e.sh --list        the cells
#
# Each cell prints one line:
#   CELL: PASS|FAIL <failing phase: why> rto=<s> (backup Xs, rescue boot Ys, restore Zs, first boot Ws)
# RTO is rescue boot + restore + first boot ("not booted": the cell checks
# the recovered disk offline). A run writes target/e2e/results.json and
# target/e2e/results.md. A cell's work directory is removed when it passes
# and kept (its path printed) when it fails; the source systems' directories
# (under target/e2e/work) are removed when every cell passed.
#
# Environment: LIFEBOAT_E2E_JOBS (cells at once, default 2),
# LIFEBOAT_QEMU_ACCEL (tcg, or kvm where it works), LIFEBOAT_FIXTURE_CACHE.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
cargo_e2e=(cargo test -q -p lifeboat --features e2e --test e2e)

cells() {
  "${cargo_e2e[@]}" -- --list 2>/dev/null | sed -n 's/^\([a-z0-9_]*\): test$/\1/p' | tr _ -
}

if [ "${1:-}" = --list ]; then
  cells
  exit 0
fi
case "${1:-}" in -h | --help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac

t0=$(date +%s)
bash scripts/setup.sh
export LIFEBOAT_KERNEL_FIXTURE="$(bash qemu/fixtures/kernel.sh | tail -1)"
cargo build --workspace -q
# The cells' build links lifeboat as their run will (feature e2e, the test
# dependencies' features); the Debian package the sources install is made
# from that binary, so it is not older than the binary the run checks.
"${cargo_e2e[@]}" --no-run
LIFEBOAT_PACKAGE_NO_BUILD=1 bash scripts/package.sh >/dev/null

all=$(cells)
[ -n "$all" ] || { echo "e2e.sh: no cells found (does tests/e2e.rs build?)" >&2; exit 1; }
want=("$@")
[ ${#want[@]} -gt 0 ] || mapfile -t want <<<"$all"
filters=()
for c in "${want[@]}"; do
  grep -qxF -- "$c" <<<"$all" || { echo "e2e.sh: no cell '$c' (scripts/e2e.sh --list names them)" >&2; exit 2; }
  filters+=("$(tr - _ <<<"$c")")
done

out=$repo/target/e2e
rm -rf "$out/cells" "$out/results.json" "$out/results.md"
mkdir -p "$out/work"
export LIFEBOAT_E2E_OUT=$out
# Work directories (VM disks, backups) live under target/e2e/work.
export TMPDIR=$out/work
echo "e2e: ${#want[@]} cell(s), ${LIFEBOAT_E2E_JOBS:-2} at a time: ${want[*]}"
set +e
# The cells' own lines, as they finish; everything else goes to cargo.log.
"${cargo_e2e[@]}" -- --exact --nocapture --test-threads "${LIFEBOAT_E2E_JOBS:-2}" "${filters[@]}" 2>&1 |
  tee "$out/cargo.log" | grep --line-buffered -aE '^[a-z0-9-]+: (PASS|FAIL)|: work directory kept: '
rc=${PIPESTATUS[0]}
set -e
failed=0
for c in "${want[@]}"; do
  if [ ! -f "$out/cells/$c.json" ]; then
    echo "$c: FAIL no result (the test binary stopped; see $out/cargo.log)"
    failed=1
  elif ! grep -q '"pass": true' "$out/cells/$c.json"; then
    failed=1
  fi
done
[ $rc -eq 0 ] || failed=1
echo
cat "$out/results.md" 2>/dev/null || true
echo
if [ $failed -eq 0 ]; then
  rm -rf "$out/work"
  echo "e2e: all ${#want[@]} cell(s) passed in $(( $(date +%s) - t0 )) s; results: $out/results.json"
else
  echo "e2e: FAILED after $(( $(date +%s) - t0 )) s; results: $out/results.json; test output: $out/cargo.log; sources kept in $out/work"
  exit 1
fi
