#!/bin/bash
# Install what building and testing Lifeboat needs on Debian 12, and check
# the Rust toolchain. Idempotent: when everything is there it does nothing.
set -euo pipefail
PKGS=(
  # archive and module oracles, the peer for benchmarks
  cpio kmod dracut dracut-core initramfs-tools-core binutils bc file gcc libc6-dev
  # compressors
  zstd xz-utils lz4 gzip
  # the recovery toolbox that goes into the image (and is tested in a chroot)
  e2fsprogs xfsprogs btrfs-progs dosfstools lvm2 mdadm cryptsetup-bin parted gdisk fdisk
  rsync openssh-server openssh-client iproute2 grub-pc-bin grub-efi-amd64-bin grub2-common
  efibootmgr nano less tar util-linux udev iputils-ping
  # booting images
  qemu-system-x86 qemu-utils ovmf xorriso mtools
  # outputs: PXE (pxelinux, QEMU's iPXE ROMs), UKI (systemd-boot's stub,
  # objcopy, sbsign/sbverify, openssl for the test key)
  pxelinux syslinux-common ipxe-qemu systemd-boot-efi binutils sbsigntool openssl
  # end-to-end recovery tests: a real Debian source system
  mmdebstrap debian-archive-keyring
  # backup locations tested against real servers on 127.0.0.1
  nginx-light nfs-ganesha nfs-ganesha-vfs samba
  # systemd-analyze checks the packaged units
  systemd
  # HTTP client for the lifeboat serve tests (ranges, headers, TLS)
  curl
  # backup tools whose remote repositories the recipe tests use
  restic borgbackup
)
# Two passes: installing one package can remove another that was there
# (seen: a preinstalled backported qemu-utils removed by Debian's
# qemu-system-x86), so check again after installing.
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
updated=""
for pass in 1 2; do
  missing=()
  for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && break
  echo "setup: installing ${missing[*]}" >&2
  if [ -z "$updated" ]; then $SUDO apt-get update -q >&2; updated=1; fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
done
for c in qemu-img qemu-system-x86_64 xorriso mmdebstrap cpio; do
  command -v "$c" >/dev/null || { echo "setup: $c is still missing after installing the packages; see the apt output above" >&2; exit 1; }
done
if ! command -v cargo >/dev/null; then
  echo "setup: cargo not found. Lifeboat needs Rust >= 1.80 with the x86_64-unknown-linux-gnu target (rustup)." >&2
  exit 1
fi
# The Debian package is built with cargo-deb.
if ! command -v cargo-deb >/dev/null; then
  echo "setup: installing cargo-deb" >&2
  cargo install cargo-deb --locked --version 3.8.0 >&2
fi
