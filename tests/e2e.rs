//! The recovery matrix (`scripts/e2e.sh`; built only with the `e2e`
//! feature, so `scripts/test.sh` leaves it out). Each test is a cell: a
//! real Debian source system is backed up with `lifeboat mkbackup`, a blank
//! VM boots the rescue image and recovers it, and the result is checked
//! against the source (booted through its own bootloader, or read offline
//! where the cell is about how the data got there). A cell's name is its
//! function name with `-` for `_`. Every cell records its phases and
//! verdict (`matrix::Cell`); `scripts/e2e.sh` prints the table.

mod common;
mod matrix;

use common::*;
use lifeboat_qemu::{BootSpec, Vm};
use matrix::*;
use serde_json::Value;
use std::time::Duration;

#[test]
fn bigger_disk_others_untouched() {
    let _cell = Cell::start("bigger-disk-others-untouched");
    let src = gpt_media_source();
    let target = here(src).join("target-c.raw");
    blank(&target, "4608M");
    // A disk that is not in the mapping: its bytes must not change.
    let other = here(src).join("other-c.raw");
    blank(&other, "2G");
    sh_ok(&format!(
        "head -c 4M /dev/urandom | dd of={} conv=notrunc status=none",
        other.display()
    ));
    let before = sha(&other);
    let console = recover(
        src,
        &[(&target, Some("NEWDISK")), (&other, Some("OTHER"))],
        "lifeboat.map=vda:vda",
        "recover-c.log",
    );
    assert!(
        console.contains("[mapping file]"),
        "explicit mapping expected"
    );
    // Its identity was pinned at pre-flight and compared again right
    // before the first write.
    assert!(
        console
            .contains("checked /dev/vda again before writing: serial NEWDISK, no partition table"),
        "no re-check before the first write"
    );
    // The rescue system's own files were checked against its layers' lists.
    assert!(
        console.contains("lifeboat: rescue system checked: ")
            && console.contains("files match the lists of layers base, modules-"),
        "no integrity check of the rescue system"
    );
    assert_eq!(sha(&other), before, "an unmapped disk was written");
    // The root partition grew by the extra 1.5 GiB.
    let t = sh_ok(&format!("sfdisk --json {}", target.display()));
    let t: Value = serde_json::from_str(&t).unwrap();
    let parts = t["partitiontable"]["partitions"].as_array().unwrap();
    let last = parts.last().unwrap()["size"].as_u64().unwrap();
    assert!(
        last * 512 > (3 << 30) + (1 << 29),
        "root partition not grown: {last} sectors"
    );
    check_offline(src, &target, "c");
}

#[test]
fn bios_mbr_lvm() {
    let _cell = Cell::start("bios-mbr-lvm");
    let src = lvm_source();
    let target = here(src).join("target-b.raw");
    blank(&target, "4G");
    assert_eq!(
        src.lvm_ids.len(),
        3,
        "root, home and swap LVs expected: {:?}",
        src.lvm_ids
    );
    let console = recover(src, &[(&target, None)], "", "recover-b.log");
    assert!(
        console.contains("vgcfgrestore"),
        "the VG should be restored with its UUIDs"
    );
    assert!(
        console.contains("[same name and size]"),
        "mapping by name and size expected"
    );
    check_recovered(src, &target, "boot-b.log");
}

#[test]
fn interrupted_restore() {
    let _cell = Cell::start("interrupted-restore");
    let src = gpt_media_source();
    let target = here(src).join("target-i.raw");
    blank(&target, "3G");
    let mut vm = rescue_vm(
        src,
        &[(&target, Some("LBSRC0"))],
        "lifeboat.recover=auto",
        "recover-i1.log",
    );
    vm.wait_for("lifeboat: restoring / from set", 20 * MIN)
        .unwrap();
    std::thread::sleep(Duration::from_secs(8));
    drop(vm); // power cut in the middle of the restore
    let console = recover(src, &[(&target, Some("LBSRC0"))], "", "recover-i2.log");
    assert!(
        console.contains("partition table on /dev/vda: already there"),
        "the second run should keep the partition table"
    );
    assert!(console.contains("already there (from an earlier run), kept"));
    check_offline(src, &target, "i");
}

#[test]
fn dry_run_and_refusals() {
    let _cell = Cell::start("dry-run-and-refusals");
    let src = gpt_media_source();
    let target = here(src).join("target-d.raw");
    blank(&target, "3G");
    let small = here(src).join("small-d.raw");
    blank(&small, "512M");
    let (t0, s0) = (sha(&target), sha(&small));
    let mut vm = rescue_vm(
        src,
        &[(&target, Some("LBSRC0")), (&small, Some("SMALL"))],
        "",
        "rescue-d.log",
    );
    let mut pos = vm.wait_for("lifeboat: ready", 5 * MIN).unwrap();
    let out = run(
        &mut vm,
        &mut pos,
        "lifeboat recover --dry-run 2>&1",
        5 * MIN,
    );
    let order = [
        "wipefs --all --force /dev/vda",
        "sfdisk --no-reread --no-tell-kernel -q /dev/vda",
        "mkswap -f -U",
        "mke2fs -F -q -t ext4 -U",
        "mount -t ext4 -o defaults /dev/vda3 /run/lifeboat/restore",
        "tar --extract",
        "umount /run/lifeboat/restore",
        "mount -t ext4 -o defaults /dev/vda3 /mnt/local",
        "grub-install --target=i386-pc --recheck /dev/vda",
        "update-grub",
        "umount --recursive /mnt/local",
        "dry run finished; nothing was written",
    ];
    let mut at = 0;
    for o in order {
        let i = out[at..]
            .find(o)
            .unwrap_or_else(|| panic!("{o:?} missing or out of order in:\n{out}"));
        at += i + o.len();
    }
    let r = vm
        .run_command(
            pos,
            "echo '/dev/vda /dev/vdb' > /tmp/map; lifeboat recover --auto --map /tmp/map 2>&1",
            5 * MIN,
        )
        .unwrap();
    pos = r.end;
    assert_ne!(
        r.status, 0,
        "recovery onto a 512 MiB disk must fail:\n{}",
        r.output
    );
    assert!(
        r.output.contains("too small for the data") && r.output.contains("Nothing was written"),
        "{}",
        r.output
    );
    // The plan's disk write-protected by serial: it is refused as a target
    // with the reason, so the expected disk is missing and nothing is done.
    let r = vm
        .run_command(
            pos,
            "printf '[recover]\\nprotect = [\"SERIAL=LBSRC0\"]\\n' > /tmp/protect.toml; \
             lifeboat -c /tmp/protect.toml recover --auto 2>&1",
            5 * MIN,
        )
        .unwrap();
    pos = r.end;
    assert_ne!(r.status, 0, "a protected disk was accepted:\n{}", r.output);
    for want in [
        "not a target: /dev/vda: /dev/vda matches the write-protected identity SERIAL=LBSRC0",
        "no target disk for /dev/vda",
        "serial LBSRC0",
        "Nothing was written",
    ] {
        assert!(r.output.contains(want), "{want:?} missing:\n{}", r.output);
    }
    let _ = pos;
    drop(vm);
    assert_eq!(sha(&target), t0, "dry run wrote the disk");
    assert_eq!(sha(&small), s0, "refused recovery wrote the disk");
}

#[test]
fn encrypted_incremental() {
    let _cell = Cell::start("encrypted-incremental");
    let src = enc_source();
    let target = here(src).join("target-e.raw");
    blank(&target, "3G");
    let t0 = sha(&target);
    // The key is nowhere in the rescue image.
    let rescue = here(src).join("rescue-dir");
    sh_ok(&format!(
        "mkdir -p {r} && debugfs -R 'rdump /rescue {r}' {b} 2>/dev/null",
        r = rescue.display(),
        b = src.backup.display()
    ));
    let tree = here(src).join("rescue-tree");
    unpack(&rescue.join("rescue"), &tree);
    let leak = sh_ok(&format!(
        "grep -rlF '{PASSPHRASE}' {} || echo no-leak",
        tree.display()
    ));
    assert!(
        leak.contains("no-leak"),
        "the passphrase is in the rescue image: {leak}"
    );
    // 1. A flipped byte in the first volume: the pre-flight stops, nothing written.
    let bad = here(src).join("backup-bad.img");
    std::fs::copy(&src.backup, &bad).unwrap();
    let sets = sh_ok(&format!(
        "debugfs -R 'ls -p /store/lbsrc' {} 2>/dev/null",
        bad.display()
    ));
    let full = sets
        .split('/')
        .find(|f| f.ends_with("-full"))
        .expect("no full set on the backup disk")
        .to_string();
    let vol = format!("/store/lbsrc/{full}/root.tar.zst.000");
    let blk = sh_ok(&format!(
        "debugfs -R 'bmap {vol} 3' {} 2>/dev/null",
        bad.display()
    ));
    let blk: u64 = blk
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("bmap said {blk:?}"));
    sh_ok(&format!(
        "printf '\\x5a\\x5a\\x5a\\x5a' | dd of={} bs=1 seek={} conv=notrunc status=none",
        bad.display(),
        blk * 4096 + 100
    ));
    let mut vm = rescue_vm_with(
        src,
        &bad,
        &[(&target, Some("LBSRC0"))],
        "lifeboat.recover=auto",
        "recover-e1.log",
    );
    vm.wait_for("recovery failed", 10 * MIN).unwrap();
    let c = vm.console();
    assert!(
        c.contains("root.tar.zst.000 is damaged"),
        "{}",
        &c[c.len().saturating_sub(3000)..]
    );
    drop(vm);
    assert_eq!(sha(&target), t0, "a damaged backup led to writes");
    // 1b. A truncated last volume: the pre-flight stops, nothing written.
    let cut = here(src).join("backup-cut.img");
    std::fs::copy(&src.backup, &cut).unwrap();
    let files = sh_ok(&format!(
        "debugfs -R 'ls -p /store/lbsrc/{full}' {} 2>/dev/null",
        cut.display()
    ));
    let last = files
        .split('/')
        .filter(|f| f.starts_with("root.tar"))
        .max()
        .expect("no root volumes")
        .to_string();
    assert!(
        files
            .split('/')
            .filter(|f| f.starts_with("root.tar"))
            .count()
            > 1,
        "split volumes expected: {files}"
    );
    sh_ok(&format!(
        "debugfs -w -R 'sif /store/lbsrc/{full}/{last} size 1000' {} 2>&1",
        cut.display()
    ));
    let mut vm = rescue_vm_with(
        src,
        &cut,
        &[(&target, Some("LBSRC0"))],
        "lifeboat.recover=auto",
        "recover-e1b.log",
    );
    vm.wait_for("recovery failed", 10 * MIN).unwrap();
    let c = vm.console();
    assert!(
        c.contains(&format!("{last} has 1000 bytes")) && c.contains("truncated"),
        "{}",
        &c[c.len().saturating_sub(3000)..]
    );
    drop(vm);
    assert_eq!(sha(&target), t0, "a truncated backup led to writes");
    // 2. Unattended without the key: refused; 3. a wrong key: refused;
    // 4. the right key: the chain (full + incremental, split, encrypted) restores.
    let mut vm = rescue_vm(
        src,
        &[(&target, Some("LBSRC0"))],
        "lifeboat.recover=auto",
        "recover-e2.log",
    );
    let mut pos = vm.wait_for("recovery failed", 10 * MIN).unwrap();
    assert!(vm.console().contains("is encrypted and no key was given"));
    pos = vm.wait_for_from("lifeboat:~#", pos, MIN).unwrap();
    let r = vm
        .run_command(
            pos,
            "echo wrong > /tmp/k; lifeboat recover --auto --backup-key /tmp/k 2>&1 | tail -5",
            10 * MIN,
        )
        .unwrap();
    pos = r.end;
    assert!(
        r.output.contains("does not open this backup"),
        "{}",
        r.output
    );
    assert_eq!(sha(&target), t0, "a wrong key led to writes");
    let r = vm
        .run_command(
            pos,
            &format!("echo '{PASSPHRASE}' > /tmp/k; lifeboat recover --auto --backup-key /tmp/k > /tmp/r.log 2>&1; s=$?; tail -8 /tmp/r.log; test $s = 0"),
            30 * MIN,
        )
        .unwrap();
    assert_eq!(r.status, 0, "{}", r.output);
    assert!(
        r.output.contains("lifeboat: recovery finished"),
        "{}",
        r.output
    );
    // Both sets of the chain were applied to the root filesystem.
    let mut pos = r.end;
    let n = run(
        &mut vm,
        &mut pos,
        "echo sets=$(grep -c 'lifeboat: restoring / from set' /tmp/r.log)",
        MIN,
    );
    assert!(n.contains("sets=2"), "{n}");
    drop(vm);
    check_offline(src, &target, "e");
}

#[test]
fn restic() {
    let _cell = Cell::start("restic");
    let src = restic_source();
    let target = here(src).join("target-r.raw");
    blank(&target, "3G");
    let console = recover(src, &[(&target, Some("LBSRC0"))], "", "recover-r.log");
    assert!(
        console.contains("checking the backup with restic"),
        "the recipe's check must run first"
    );
    assert!(console.contains("lifeboat: restoring with restic"));
    check_offline(src, &target, "restic");
}

#[test]
fn borg() {
    let _cell = Cell::start("borg");
    let src = borg_source();
    let target = here(src).join("target-borg.raw");
    blank(&target, "3G");
    let console = recover(src, &[(&target, Some("LBSRC0"))], "", "recover-borg.log");
    assert!(
        console.contains("checking the backup with borg"),
        "the recipe's check must run first"
    );
    assert!(console.contains("lifeboat: restoring with borg"));
    check_offline(src, &target, "borg");
}

#[test]
fn nfs() {
    let _cell = Cell::start("nfs");
    recover_from_server("nfs", "/run/lifeboat/net/nfs-10.0.2.2_backup/lbsrc");
}

#[test]
fn cifs() {
    let _cell = Cell::start("cifs");
    recover_from_server(
        "cifs",
        "/run/lifeboat/net/cifs-10.0.2.2_backup_lifeboat/lifeboat/lbsrc",
    );
}

/// The GPT source (BIOS, ext4 root last, swap) recovered unattended onto a
/// blank disk of the same size and serial, booted through its own GRUB:
/// markers, partition and filesystem UUIDs and labels, fstab, the kernel
/// command line, the hooks' traces.
#[test]
fn bios_gpt_ext4() {
    let _cell = Cell::start("bios-gpt-ext4");
    let src = gpt_media_source();
    let target = here(src).join("target.raw");
    blank(&target, "3G");
    let console = recover(src, &[(&target, Some("LBSRC0"))], "", "recover.log");
    assert!(
        console.contains("[same serial]"),
        "mapping by serial expected"
    );
    check_recovered(src, &target, "boot.log");
}

/// The GPT source onto a new machine whose only disk is NVMe and 50%
/// bigger, with no mapping: `--auto` maps the one source disk onto the
/// only disk big enough, the root partition grows, the device names
/// change (vda3 is nvme0n1p3), the target boots from it.
#[test]
fn nvme_grow() {
    let _cell = Cell::start("nvme-grow");
    let src = gpt_media_source();
    let target = here(src).join("target-nvme.raw");
    blank(&target, "4608M");
    let serial = "NVME-GROW";
    let console = recover(src, &[(&target, Some(serial))], "", "recover.log");
    assert!(
        console.contains("-> /dev/nvme0n1")
            && console.contains("[automatic: the plan has one disk and this is the only disk here big enough for it]"),
        "the one disk should be mapped onto the NVMe disk automatically:\n{console}"
    );
    let t = sh_ok(&format!("sfdisk --json {}", target.display()));
    let t: Value = serde_json::from_str(&t).unwrap();
    let last = t["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()["size"]
        .as_u64()
        .unwrap();
    assert!(
        last * 512 > (3 << 30) + (1 << 29),
        "root partition not grown: {last} sectors"
    );
    check_recovered_on(src, &target, Some(serial), "boot.log");
}

/// A Debian 12 whose initramfs generator is dracut (dracut-host) onto a
/// new machine whose only disk is NVMe: mapped automatically, the names
/// change, and the recovery rebuilds the initramfs with dracut (as on
/// RHEL, Fedora and SUSE hosts), which then boots the NVMe disk.
#[test]
fn dracut_host() {
    let _cell = Cell::start("dracut-host");
    let src = dracut_source();
    let target = here(src).join("target-nvme.raw");
    blank(&target, "3G");
    let serial = "NVME-DRACUT";
    let console = recover(src, &[(&target, Some(serial))], "", "recover.log");
    assert!(
        console.contains("-> /dev/nvme0n1"),
        "the one disk should be mapped onto the NVMe disk:\n{console}"
    );
    assert!(
        console.contains("dracut --force --regenerate-all")
            && !console.contains("update-initramfs"),
        "the initramfs should be rebuilt with dracut:\n{console}"
    );
    check_recovered_on(src, &target, Some(serial), "boot.log");
}

/// The GPT source onto a disk 30% smaller, named in a mapping: the data
/// fits, the partitions shrink, UUIDs and the boot path stay.
#[test]
fn shrink() {
    let _cell = Cell::start("shrink");
    let src = gpt_media_source();
    let target = here(src).join("target-small.raw");
    blank(&target, "2150M");
    // A smaller disk is never taken automatically: the mapping says so.
    let console = recover(
        src,
        &[(&target, Some("SMALLER"))],
        "lifeboat.map=vda:vda",
        "recover.log",
    );
    assert!(
        console.contains("[mapping file]"),
        "the smaller disk should be mapped by the mapping:\n{console}"
    );
    let t = sh_ok(&format!("sfdisk --json {}", target.display()));
    let t: Value = serde_json::from_str(&t).unwrap();
    let end = t["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .last()
        .map(|p| p["start"].as_u64().unwrap() + p["size"].as_u64().unwrap());
    assert!(
        end.unwrap() * 512 <= 2150 << 20,
        "the partitions do not fit the smaller disk"
    );
    check_recovered(src, &target, "boot.log");
}

/// Root straight on LUKS2 on a partition (no LVM), /boot beside it, the
/// key file in crypttab and in the initramfs: captured, recreated with its
/// UUID from `recover.keyfile` (put into the rescue image with
/// `expose_secrets`), unlocked, restored, and booted unattended through
/// GRUB and the restored initramfs; crypttab survives and the new
/// container opens with the source's passphrase.
#[test]
fn luks_root() {
    let _cell = Cell::start("luks-root");
    let src = luks_root_source();
    let target = here(src).join("target.raw");
    blank(&target, "3G");
    let console = recover(src, &[(&target, Some("LBSRC0"))], "", "recover.log");
    assert!(
        console.contains("luksFormat") && console.contains("cryptsetup open"),
        "the LUKS container should be recreated and opened:\n{console}"
    );
    check_recovered(src, &target, "boot.log");
}

/// LUKS2 on a partition holding an LVM PV with root and home LVs, /boot
/// beside it, the key file in crypttab and in the initramfs: the container
/// recreated with its UUID from `recover.keyfile` and unlocked, the PV, VG
/// and LVs recreated inside with their UUIDs, restored and booted
/// unattended; crypttab survives and the new container opens with the
/// source's passphrase.
#[test]
fn luks_lvm() {
    let _cell = Cell::start("luks-lvm");
    let src = luks_lvm_source();
    let target = here(src).join("target.raw");
    blank(&target, "3G");
    let console = recover(src, &[(&target, Some("LBSRC0"))], "", "recover.log");
    assert!(
        console.contains("luksFormat") && console.contains("/dev/mapper/cryptlvm"),
        "the LUKS container should be recreated and hold the PV:\n{console}"
    );
    check_recovered(src, &target, "boot.log");
}

/// md RAID1 across two disks (BIOS, GPT): / on md0, swap on md1, GRUB in
/// both MBRs. Both disks recovered (the arrays with their UUIDs, GRUB on
/// each disk), the machine boots with both; then each disk alone (on an
/// overlay, so the two boots do not disturb each other) boots through its
/// own GRUB onto the degraded arrays.
#[test]
fn bios_md_raid1() {
    let _cell = Cell::start("bios-md-raid1");
    let src = md_raid1_source();
    assert_eq!(src.disks, 2);
    let d = here(src);
    let (t0, t1) = (d.join("target0.raw"), d.join("target1.raw"));
    blank(&t0, "3G");
    blank(&t1, "3G");
    let console = recover(
        src,
        &[(&t0, Some("LBSRC0")), (&t1, Some("LBSRC1"))],
        "",
        "recover.log",
    );
    assert!(
        console.contains("mdadm --create"),
        "the arrays should be recreated:\n{console}"
    );
    check_recovered_disks(
        src,
        &[(&t0, Some("LBSRC0")), (&t1, Some("LBSRC1"))],
        "boot.log",
    );
    for (i, t) in [&t0, &t1].into_iter().enumerate() {
        let o = d.join(format!("alone{i}.qcow2"));
        sh_ok(&format!(
            "qemu-img create -q -f qcow2 -F raw -b {} {}",
            t.display(),
            o.display()
        ));
        let spec_disk = o.clone();
        check_boots_alone(
            src,
            &spec_disk,
            &format!("LBSRC{i}"),
            &format!("alone{i}.log"),
        );
    }
}

/// Debian 11 (bullseye) on the gpt-bios layout: its own kernel and tools
/// in the rescue image, recovered and booted through GRUB.
#[test]
fn debian11_bios() {
    let _cell = Cell::start("debian11-bios");
    let src = debian11_source();
    assert!(
        src.kver.starts_with("5.10."),
        "bullseye's kernel is 5.10; the source runs {}",
        src.kver
    );
    assert_rescue_kernel_is_the_sources(src);
    let target = here(src).join("target.raw");
    blank(&target, "3G");
    recover(src, &[(&target, Some("LBSRC0"))], "", "recover.log");
    check_recovered(src, &target, "boot.log");
}

/// Debian 13 (trixie) under UEFI (the uefi-gpt-ext4 layout): the rescue
/// image carries trixie's own kernel (6.12), and the recovery reinstalls
/// GRUB for x86_64-efi with an NVRAM entry that the recovered disk boots
/// through.
#[test]
fn debian13_uefi() {
    let _cell = Cell::start("debian13-uefi");
    let src = debian13_source();
    assert!(
        src.kver.starts_with("6.12."),
        "trixie's kernel is 6.12; the source runs {}",
        src.kver
    );
    assert_rescue_kernel_is_the_sources(src);
    let target = here(src).join("target.raw");
    blank(&target, "3G");
    let console = recover(src, &[(&target, Some("LBSRC0"))], "", "recover.log");
    assert!(
        console.contains("--target=x86_64-efi") && !console.contains("--no-nvram"),
        "GRUB for x86_64-efi should be installed with an NVRAM entry:\n{console}"
    );
    check_recovered(src, &target, "boot.log");
    check_boots_with_fresh_nvram(src, &target, "fresh-nvram.log");
}

/// The rescue image's kernel is the one the source runs: its file is named
/// for the source's `uname -r`, and the bzImage's version string (in the
/// uncompressed setup code) is that release.
fn assert_rescue_kernel_is_the_sources(src: &Source) {
    let name = src
        .kernel
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_string();
    assert!(
        name.ends_with(&format!("vmlinuz-{}", src.kver)),
        "the rescue kernel {name} is not the source's {}",
        src.kver
    );
    let k = std::fs::read(&src.kernel).unwrap();
    let v = format!("{} (", src.kver);
    assert!(
        k.windows(v.len()).any(|w| w == v.as_bytes()),
        "{} holds no version string {v:?}",
        src.kernel.display()
    );
}

/// btrfs root on GPT (BIOS): subvolumes @ (mounted at /, the default
/// subvolume) and @home, mounted by UUID= with subvol= in fstab, GRUB
/// booting with rootflags=subvol=@: recreated with the same UUID, the
/// subvolumes and the default (the layout probe compares them and the
/// subvol= of each mount), booted through GRUB.
#[test]
fn btrfs_subvol() {
    let _cell = Cell::start("btrfs-subvol");
    let src = btrfs_subvol_source();
    let target = here(src).join("target.raw");
    blank(&target, "3G");
    let console = recover(src, &[(&target, Some("LBSRC0"))], "", "recover.log");
    assert!(
        console.contains("subvolume create") && console.contains("set-default"),
        "the subvolumes and the default should be recreated:\n{console}"
    );
    check_recovered(src, &target, "boot.log");
}

/// LVM thin provisioning (BIOS, MBR, ext4 /boot): xfs root and /srv on
/// thin LVs of one thin pool, activated by the initramfs: the pool and its
/// thin volumes recreated (the layout probe compares `lvs -o
/// lv_name,segtype,pool_lv`), VG/LV UUIDs kept, booted through GRUB.
#[test]
fn thin_xfs() {
    let _cell = Cell::start("thin-xfs");
    let src = thin_xfs_source();
    let target = here(src).join("target.raw");
    blank(&target, "4G");
    recover(src, &[(&target, Some("LBSRC0"))], "", "recover.log");
    check_recovered(src, &target, "boot.log");
}

/// UEFI (OVMF): ESP at /boot/efi, ext4 root, GRUB as \EFI\debian with an
/// NVRAM boot entry. The source boots with the entry its install made; the
/// rescue OS boots under OVMF on a machine with blank NVRAM, reinstalls
/// GRUB for x86_64-efi and writes the entry; the recovered disk boots with
/// that NVRAM, through the entry (the layout probe compares `efibootmgr
/// -v`'s OS entries and the entry that booted).
#[test]
fn uefi_gpt_ext4() {
    let _cell = Cell::start("uefi-gpt-ext4");
    let src = uefi_gpt_ext4_source();
    let target = here(src).join("target.raw");
    blank(&target, "3G");
    let console = recover(src, &[(&target, Some("LBSRC0"))], "", "recover.log");
    assert!(
        console.contains("--target=x86_64-efi") && !console.contains("--no-nvram"),
        "GRUB for x86_64-efi should be installed with an NVRAM entry:\n{console}"
    );
    check_recovered(src, &target, "boot.log");
    check_boots_with_fresh_nvram(src, &target, "fresh-nvram.log");
}

/// A fleet machine with a blank disk boots QEMU's iPXE from lifeboat
/// serve (its DHCP boot file names its script and token, as a per-host
/// DHCP entry would), gets its personal layer and recovers unattended,
/// streaming the backup from the web server (the http:// recovery test:
/// the same plan as mkbackup's own http image, which is built alike).
#[test]
fn fleet_serve_http() {
    let _cell = Cell::start("fleet-serve-http");
    let src = net_source();
    let token = src
        .serve_token
        .clone()
        .expect("the source did not register");
    let port = servers().serve.port;
    let target = here(src).join("target-serve.raw");
    blank(&target, "3G");
    let t0 = sha(&target);
    let mut spec = BootSpec {
        memory_mb: 1536,
        log: Some(here(src).join("recover-serve.log")),
        ..BootSpec::from_disks()
    }
    .with_disk(&target, "raw", Some("LBSRC0"))
    .with_user_net(&format!(
        "bootfile=http://10.0.2.2:{port}/hosts/lbsrc/boot.ipxe?token={token}"
    ));
    spec.extra_args
        .extend(["-boot".to_string(), "n".to_string()]);
    phase("rescue boot");
    let mut vm = Vm::boot(&spec).unwrap();
    let console = await_recovery(&mut vm);
    assert_ne!(sha(&target), t0);
    for want in [
        "lifeboat: tools (",
        "lifeboat: personal (",
        "chained layers loaded",
        &format!(
            "backup found in http://10.0.2.2:{}/backups/lbsrc/",
            servers().http.port
        ),
    ] {
        assert!(console.contains(want), "{want:?} missing:\n{console}");
    }
    assert!(
        !console.contains(SMB_PASSWORD),
        "the share password is on the console"
    );
    let log = std::fs::read_to_string(servers().serve.root.join("access.log")).unwrap();
    assert!(
        log.contains("\"GET /hosts/lbsrc/personal.cpio.zst\" 200"),
        "{log}"
    );
    assert!(!log.contains(&token), "the token is in the access log");
    check_offline(src, &target, "serve");
}

/// PORTABLE: another live Linux (the LVM test system, booted from its own
/// disk) recovers the GPT source onto a blank disk by running the
/// extracted `./lifeboat recover`; its own disk is left alone.
#[test]
fn portable() {
    let _cell = Cell::start("portable");
    let src = gpt_media_source();
    let live_disk = debian_disk("mbr-lvm");
    let work = &here(src);
    let live = work.join("live.qcow2");
    sh_ok(&format!(
        "rm -f {o} && qemu-img create -q -f qcow2 -F raw -b {} {o}",
        live_disk.display(),
        o = live.display()
    ));
    // The tarball travels on a disk of its own.
    let carry = work.join("carry");
    std::fs::create_dir_all(&carry).unwrap();
    sh_ok(&format!(
        "debugfs -R 'dump /portable/lifeboat-portable-lbsrc.tar.gz {}/lifeboat-portable-lbsrc.tar.gz' {} 2>/dev/null && \
         printf '[recover]\\nrebuild_initramfs = \"never\"\\n' > {}/fast.toml && \
         rm -f {c}.img && truncate -s 256M {c}.img && mkfs.ext4 -q -F -d {c} {c}.img",
        carry.display(),
        src.backup.display(),
        carry.display(),
        c = carry.display()
    ));
    let target = work.join("target-portable.raw");
    blank(&target, "3G");
    let spec = BootSpec {
        memory_mb: 1536,
        log: Some(work.join("portable-live.log")),
        ..BootSpec::from_disks()
    }
    .with_disk(&live, "qcow2", Some("LBLIVE"))
    .with_disk(&target, "raw", Some("LBSRC0"))
    .with_disk(&work.join("carry.img"), "raw", None)
    .with_disk(&src.backup, "raw,readonly=on", None);
    phase("rescue boot");
    let mut vm = Vm::boot(&spec).unwrap();
    let mut pos = vm.wait_for(PROMPT, 10 * MIN).unwrap();
    phase("restore");
    run(&mut vm, &mut pos, "dmesg -n 1", MIN);
    let before = run(
        &mut vm,
        &mut pos,
        "echo live: $(lsblk -no UUID /dev/vda | sort | tr '\\n' ' ')",
        MIN,
    );
    let out = run(
        &mut vm,
        &mut pos,
        "mkdir -p /carry && mount /dev/vdc /carry && cd /root && tar xzf /carry/lifeboat-portable-lbsrc.tar.gz && \
         cd lifeboat-portable-lbsrc && ./lifeboat -c /carry/fast.toml recover --auto > /root/recover.log 2>&1; s=$?; \
         grep -E 'same serial|recovery finished|ERROR' /root/recover.log; tail -5 /root/recover.log; cd /; test $s = 0",
        30 * MIN,
    );
    assert!(out.contains("lifeboat: recovery finished"), "{out}");
    assert!(
        out.contains("[same serial]"),
        "mapping by serial expected: {out}"
    );
    let after = run(
        &mut vm,
        &mut pos,
        "echo live: $(lsblk -no UUID /dev/vda | sort | tr '\\n' ' ')",
        MIN,
    );
    assert_eq!(
        prefixed(&before, "live: "),
        prefixed(&after, "live: "),
        "the live system's disk changed"
    );
    run(&mut vm, &mut pos, "sync", 10 * MIN);
    drop(vm);
    check_recovered(src, &target, "portable-boot.log");
}

/// BACKUP_URL = iso://: the rescue ISO carries the backup, continued on
/// data ISOs (ISO_MAX_SIZE); booted as a CD with the others in more
/// drives, its automatic entry recovers the disk.
#[test]
fn iso_multi_disc() {
    let _cell = Cell::start("iso-multi-disc");
    let src = gpt_media_source();
    let work = &here(src);
    let ls = sh_ok(&format!(
        "debugfs -R 'ls -p /iso' {} 2>/dev/null",
        src.backup.display()
    ));
    let mut isos: Vec<String> = ls
        .split('/')
        .filter(|f| f.ends_with(".iso"))
        .map(String::from)
        .collect();
    isos.sort();
    assert!(isos.len() >= 2, "one ISO only: {ls}");
    assert_eq!(isos[0], "lifeboat-lbsrc.iso");
    let mut drives = Vec::new();
    for (i, name) in isos.iter().enumerate() {
        let p = work.join(name);
        sh_ok(&format!(
            "debugfs -R 'dump /iso/{name} {}' {} 2>/dev/null",
            p.display(),
            src.backup.display()
        ));
        let max = 160u64 << 20;
        let len = std::fs::metadata(&p).unwrap().len();
        assert!(len <= max, "{name} has {len} bytes, over ISO_MAX_SIZE");
        // xorriso: the first is bootable (El Torito), the others are data.
        let (ok, et, _) = sh(&format!(
            "xorriso -indev {} -report_el_torito plain 2>&1",
            p.display()
        ));
        assert!(ok, "{et}");
        let label = if i == 0 {
            "LBISO".to_string()
        } else {
            format!("LBISO_{:02}", i + 1)
        };
        assert!(et.contains(&format!("Volume id    : '{label}'")), "{et}");
        assert_eq!(et.contains("El Torito boot img"), i == 0, "{et}");
        drives.extend([
            "-drive".to_string(),
            format!(
                "file={},media=cdrom,readonly=on,if=ide,index={i}",
                p.display()
            ),
        ]);
    }
    let target = work.join("target-iso.raw");
    blank(&target, "3G");
    let mut spec = BootSpec {
        memory_mb: 1536,
        log: Some(work.join("recover-iso.log")),
        ..BootSpec::from_disks()
    }
    .with_disk(&target, "raw", Some("LBSRC0"));
    spec.extra_args.extend(drives);
    spec.extra_args
        .extend(["-boot".to_string(), "d".to_string()]);
    phase("rescue boot");
    let mut vm = Vm::boot(&spec).unwrap();
    let c = await_recovery(&mut vm);
    assert!(c.contains("backup found in /run/lifeboat/iso/LBISO"), "{c}");
    check_offline(src, &target, "iso");
}

/// Fault matrix, in the rescue OS: the network is down (a DHCP time-out;
/// the captured static address with the server unreachable) and the
/// expected disk is missing. Each time the recovery stops with a message
/// that says what is wrong, and the disks are not written.
#[test]
fn faults_network_down_missing_disk() {
    let _cell = Cell::start("faults-network-down-missing-disk");
    // 1. DHCP: a card whose MAC the captured setup does not know asks for
    //    a lease, nobody answers.
    let src = net_source().with_image("nfs");
    let target = here(&src).join("target-dhcp.raw");
    blank(&target, "3G");
    let t0 = sha(&target);
    let mut vm = dead_nic_vm(&src, &target, "52:54:00:de:ad:01", "down-dhcp.log");
    let c = await_failure(&mut vm, "DHCP time-out");
    drop(vm);
    for want in [
        "network: not configured",
        "cannot be reached",
        "no address, no default route",
        "Nothing was written",
    ] {
        assert!(c.contains(want), "DHCP time-out: {want:?} missing:\n{c}");
    }
    assert_eq!(sha(&target), t0, "a disk was written without network");
    // 2. Static: the captured address on its own MAC, the server away.
    let mut vm = dead_nic_vm(&src, &target, "52:54:00:12:34:56", "down-static.log");
    let c = await_failure(&mut vm, "static address");
    drop(vm);
    for want in [
        "10.0.2.15/24",
        "port",
        "cannot be reached",
        "address 10.0.2.15, a default route",
        "Nothing was written",
    ] {
        assert!(c.contains(want), "static: {want:?} missing:\n{c}");
    }
    assert_eq!(sha(&target), t0, "a disk was written without the server");
    // 3. The disk the plan needs is not there (only a small other one).
    let src = gpt_media_source();
    let other = here(src).join("other-missing.raw");
    blank(&other, "1G");
    let o0 = sha(&other);
    let mut vm = rescue_vm(
        src,
        &[(&other, Some("OTHER"))],
        "lifeboat.recover=auto",
        "missing-disk.log",
    );
    let c = await_failure(&mut vm, "missing disk");
    drop(vm);
    for want in [
        "no target disk for /dev/vda",
        "serial LBSRC0",
        "Disks here: /dev/vda (1.0 GiB, serial OTHER)",
        "Nothing was written",
    ] {
        assert!(c.contains(want), "missing disk: {want:?} missing:\n{c}");
    }
    assert_eq!(sha(&other), o0, "the other disk was written");
}
