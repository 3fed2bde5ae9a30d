#!/bin/bash
# The CI tier, as CI runs it: dependencies, the kernel fixture, format,
# lints, then every test (unit, integration against GNU cpio,
# unmkinitramfs, chroot, modprobe/modinfo, a QEMU boot of every output,
# serve, and one full recovery: the rehearsal of the GPT source). The
# recovery matrix is scripts/e2e.sh. Budget: 45 minutes on a fresh 2-core
# machine with cold caches; the duration is printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
bash scripts/setup.sh
# The end-to-end tests keep VM disks, backups and images in $TMPDIR (/tmp):
# say up front when that is short, instead of an ENOSPC deep in the suite.
tmp=${TMPDIR:-/tmp}
free_gib=$(( $(df -Pk "$tmp" | awk 'NR==2 {print $4}') / 1048576 ))
echo "disk: ${free_gib} GiB free in $tmp (the suite needs about 10 GiB, target/ about 3)"
[ "$free_gib" -ge 10 ] || echo "test.sh: WARNING: only ${free_gib} GiB free in $tmp; tests may fail with 'No space left on device'" >&2
export LIFEBOAT_KERNEL_FIXTURE="$(bash qemu/fixtures/kernel.sh | tail -1)"
echo "kernel fixture: $LIFEBOAT_KERNEL_FIXTURE"
cargo fmt --all -- --check
# --all-features: the recovery matrix (tests/e2e.rs, feature e2e) is linted
# too, though only scripts/e2e.sh runs it.
cargo clippy --workspace --all-targets --all-features -q -- -D warnings
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
echo "test.sh: $(( ($(date +%s) - t0) / 60 )) min $(( ($(date +%s) - t0) % 60 )) s"
exit "$rc"
