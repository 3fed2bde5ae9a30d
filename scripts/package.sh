#!/bin/bash
# Build the Debian package (target/debian/lifeboat_<version>_amd64.deb) from
# the binaries `cargo build` made (the profile: $1, default dev, as the tests
# use; `release` for a real package), with the man pages and shell
# completions generated from the clap definition.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-dev}
command -v cargo-deb >/dev/null || { echo "package.sh: cargo-deb is missing (scripts/setup.sh installs it)" >&2; exit 1; }
dir=debug; [ "$profile" = dev ] || dir=$profile
flag=(); [ "$profile" = dev ] || flag=(--profile "$profile")
# LIFEBOAT_PACKAGE_NO_BUILD=1: package the binaries as they are (scripts/
# e2e.sh builds them exactly as its test run will, so that run does not
# relink lifeboat newer than the package).
[ "${LIFEBOAT_PACKAGE_NO_BUILD:-}" = 1 ] || cargo build --workspace -q "${flag[@]}"
bin=target/x86_64-unknown-linux-gnu/$dir/lifeboat
rm -rf target/dist && mkdir -p target/dist/man target/dist/completions
LIFEBOAT_CONFIG_DIR=/nonexistent "$bin" man --dir target/dist/man
for s in bash zsh fish; do
  case $s in bash) f=lifeboat;; zsh) f=_lifeboat;; fish) f=lifeboat.fish;; esac
  LIFEBOAT_CONFIG_DIR=/nonexistent "$bin" completions "$s" > "target/dist/completions/$f"
done
cargo deb -p lifeboat --no-build --target x86_64-unknown-linux-gnu --profile "$profile" --fast -q
ls target/x86_64-unknown-linux-gnu/debian/*.deb 2>/dev/null || ls target/debian/*.deb
