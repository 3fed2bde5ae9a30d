//! Rescue media (OUTPUT): the ISO, checked with xorriso's own reports and
//! booted in QEMU (TCG) as a CD and as a hard disk (isohybrid), under
//! SeaBIOS and under OVMF, up to `lifeboat: ready`.

mod common;

use common::*;
use lifeboat_qemu::{BootSpec, Vm};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(240);

/// One ISO for all tests: the shell entry with the serial console starts
/// after one second.
fn iso() -> &'static (PathBuf, PathBuf) {
    static I: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    I.get_or_init(|| {
        let work = tempfile::tempdir().unwrap().keep();
        let out = work.join("img");
        let o = build(
            &work,
            &out,
            "OUTPUT = \"ISO\"\nISO_VOLID = \"LBTEST\"\niso_default = \"shell\"\nboot_console = \"serial\"\nboot_timeout = 1\n\
             KERNEL_CMDLINE = \"lifeboat.test=iso\"\n[network]\ncapture = false\n",
            &[],
        );
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(stdout.contains("ISO (BIOS + UEFI, isohybrid)"), "{stdout}");
        let iso = std::fs::read_dir(&out)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "iso"))
            .expect("no .iso written");
        (work, iso)
    })
}

fn xorriso(iso: &Path, report: &str) -> String {
    let (ok, out, err) = sh(&format!(
        "xorriso -indev {} -report_{report} plain 2>&1",
        iso.display()
    ));
    assert!(ok, "{out}{err}");
    out
}

#[test]
fn iso_el_torito_and_system_area_as_xorriso_reports_them() {
    let (_, iso) = iso();
    let et = xorriso(iso, "el_torito");
    assert!(et.contains("Volume id    : 'LBTEST'"), "{et}");
    let imgs: Vec<&str> = et
        .lines()
        .filter(|l| l.starts_with("El Torito boot img :"))
        .collect();
    assert_eq!(imgs.len(), 2, "a BIOS and a UEFI boot image: {et}");
    assert!(imgs[0].contains("BIOS") && imgs[0].contains(" y "), "{et}");
    assert!(imgs[1].contains("UEFI") && imgs[1].contains(" y "), "{et}");
    assert!(et.contains("/boot/grub/i386-pc/eltorito.img"), "{et}");
    assert!(et.contains("boot-info-table"), "{et}");
    let sa = xorriso(iso, "system_area");
    // isohybrid: GRUB's MBR boot code for BIOS disks, a GPT with the ESP
    // image as a partition for UEFI disks.
    assert!(sa.contains("grub2-mbr") && sa.contains("GPT"), "{sa}");
    assert!(
        sa.lines()
            .any(|l| l.starts_with("GPT partition path") && l.ends_with("/efi.img")),
        "{sa}"
    );
    // The menu on the ISO has the six entries and the kernel command line.
    let t = tempfile::tempdir().unwrap();
    let (ok, out, err) = sh(&format!(
        "xorriso -osirrox on -indev {} -extract /boot/grub/grub.cfg {}/grub.cfg 2>&1",
        iso.display(),
        t.path().display()
    ));
    assert!(ok, "{out}{err}");
    let cfg = std::fs::read_to_string(t.path().join("grub.cfg")).unwrap();
    assert_eq!(cfg.matches("menuentry").count(), 6, "{cfg}");
    assert!(
        cfg.contains("lifeboat.test=iso") && cfg.contains("set default=5"),
        "{cfg}"
    );
}

/// Boot the ISO: as a CD (`-cdrom`) or as a disk, SeaBIOS or OVMF.
fn boot(cd: bool, uefi: bool, log: &str) {
    let (work, iso) = iso();
    let mut spec = BootSpec {
        memory_mb: 1536,
        uefi,
        log: Some(work.join(log)),
        ..BootSpec::from_disks()
    };
    if cd {
        spec.extra_args
            .extend(["-cdrom".to_string(), iso.display().to_string()]);
    } else {
        spec = spec.with_disk(iso, "raw,readonly=on", None);
    }
    let mut vm = Vm::boot(&spec).unwrap();
    vm.wait_for("lifeboat: ready", BOOT).unwrap_or_else(|e| {
        panic!(
            "the ISO ({}, {}) did not boot to the rescue system: {e}\n{}",
            if cd { "CD" } else { "disk" },
            if uefi { "OVMF" } else { "SeaBIOS" },
            vm.console()
        )
    });
    let c = vm.console();
    assert!(
        c.contains("lifeboat.test=iso"),
        "the menu's command line was not used"
    );
}

#[test]
fn iso_boots_as_a_cd_under_seabios() {
    boot(true, false, "cd-bios.log");
}

#[test]
fn iso_boots_as_a_cd_under_ovmf() {
    boot(true, true, "cd-uefi.log");
}

#[test]
fn iso_boots_as_a_disk_under_seabios() {
    boot(false, false, "disk-bios.log");
}

#[test]
fn iso_boots_as_a_disk_under_ovmf() {
    boot(false, true, "disk-uefi.log");
}
