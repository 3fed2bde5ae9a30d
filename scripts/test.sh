#!/bin/bash
# The whole test suite, as CI runs it: dependencies, the kernel fixture,
# format, lints, then every test (unit, integration against GNU cpio,
# unmkinitramfs, chroot, modprobe/modinfo, and a QEMU boot).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The end-to-end tests keep VM disks, backups and images in $TMPDIR (/tmp):
# say up front when that is short, instead of an ENOSPC deep in the suite.
tmp=${TMPDIR:-/tmp}
free_gib=$(( $(df -Pk "$tmp" | awk 'NR==2 {print $4}') / 1048576 ))
echo "disk: ${free_gib} GiB free in $tmp (the suite needs about 25 GiB, target/ about 2)"
[ "$free_gib" -ge 25 ] || echo "test.sh: WARNING: only ${free_gib} GiB free in $tmp; tests may fail with 'No space left on device'" >&2
export LIFEBOAT_KERNEL_FIXTURE="$(bash qemu/fixtures/kernel.sh | tail -1)"
echo "kernel fixture: $LIFEBOAT_KERNEL_FIXTURE"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -q -- -D warnings
# lifeboat-init lives in its own crate: build every binary before the tests use them.
cargo build --workspace -q
# The Debian package of those binaries (installed in a test VM).
bash scripts/package.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --no-fail-fast 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
# One closing line for the whole suite (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?$/) p += $i; if ($(i+1) ~ /^failed;?$/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$rc"
