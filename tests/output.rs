//! Rescue media (OUTPUT): the ISO, checked with xorriso's own reports and
//! booted in QEMU (TCG) as a CD and as a hard disk (isohybrid), under
//! SeaBIOS and under OVMF, up to `lifeboat: ready`; RAWDISK (raw and
//! qcow2) and a USB stick made by `lifeboat format`, booted the same way.

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
        let iso = written(&out, "iso");
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

/// Boot a disk image (`raw` or `qcow2`) through its own GRUB to the
/// rescue shell; returns the console.
fn boot_disk(img: &Path, format: &str, uefi: bool, log: &Path) -> String {
    let spec = BootSpec {
        memory_mb: 1536,
        uefi,
        log: Some(log.to_path_buf()),
        ..BootSpec::from_disks()
    }
    .with_disk(img, &format!("{format},readonly=on"), None);
    let mut vm = Vm::boot(&spec).unwrap();
    vm.wait_for("lifeboat: ready", BOOT).unwrap_or_else(|e| {
        panic!(
            "{} ({format}, {}) did not boot to the rescue system: {e}\n{}",
            img.display(),
            if uefi { "OVMF" } else { "SeaBIOS" },
            vm.console()
        )
    });
    vm.console()
}

const MENU: &str = "iso_default = \"shell\"\nboot_console = \"serial\"\nboot_timeout = 1\n[network]\ncapture = false\n";

fn rawdisk(format: &str) -> (PathBuf, PathBuf) {
    let work = tempfile::tempdir().unwrap().keep();
    let out = work.join("img");
    let o = build(
        &work,
        &out,
        &format!("OUTPUT = \"RAWDISK\"\nrawdisk_format = \"{format}\"\nKERNEL_CMDLINE = \"lifeboat.test=rawdisk\"\n{MENU}"),
        &[],
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("disk image (BIOS + UEFI)"), "{stdout}");
    let img = written(&out, format);
    (work, img)
}

#[test]
fn rawdisk_boots_under_seabios_and_ovmf_and_its_qcow2_too() {
    let (work, raw) = rawdisk("raw");
    // sfdisk is the oracle for the partition table.
    let (ok, out, err) = sh(&format!("sfdisk --json {}", raw.display()));
    assert!(ok, "{err}");
    for t in [
        "21686148-6449-6E6F-744E-656564454649",
        "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
        "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
    ] {
        assert!(out.contains(t), "partition type {t} missing: {out}");
    }
    for (uefi, log) in [(false, "raw-bios.log"), (true, "raw-uefi.log")] {
        let c = boot_disk(&raw, "raw", uefi, &work.join(log));
        assert!(
            c.contains("lifeboat.test=rawdisk"),
            "the disk's menu was not used"
        );
    }
    let (work, q) = rawdisk("qcow2");
    let (ok, info, err) = sh(&format!("qemu-img info --output=json {}", q.display()));
    assert!(ok && info.contains("\"format\": \"qcow2\""), "{info}{err}");
    boot_disk(&q, "qcow2", true, &work.join("qcow2-uefi.log"));
}

/// A loop device for `file` (whole, or from `offset` for `size` bytes).
struct Loop(String);

impl Loop {
    fn new(file: &Path, range: Option<(u64, u64)>) -> Loop {
        let r = range
            .map(|(o, s)| format!("-o {o} --sizelimit {s}"))
            .unwrap_or_default();
        let (ok, out, err) = sh(&format!("losetup -f --show {r} {}", file.display()));
        assert!(ok, "losetup: {err}");
        Loop(out.trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = sh(&format!("umount {0} 2>/dev/null; losetup -d {0}", self.0));
    }
}

#[test]
fn format_refuses_a_mounted_device_and_writes_the_documented_layout() {
    let t = tempfile::tempdir().unwrap();
    let conf = t.path().join("etc");
    std::fs::create_dir_all(&conf).unwrap();
    let file = t.path().join("stick.img");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let dev = Loop::new(&file, None);
    let mnt = t.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let (ok, _, err) = sh(&format!(
        "mkfs.ext4 -q {0} && mount {0} {1} && echo keep > {1}/data && umount {1} && mount -o ro {0} {1}",
        dev.0,
        mnt.display()
    ));
    assert!(ok, "{err}");
    let before = sha256(Path::new(&dev.0));
    let o = lifeboat(&conf)
        .args(["format", "--yes", &dev.0])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "formatted a mounted device: {e}");
    assert!(
        e.contains("refusing to format")
            && e.contains("is mounted on")
            && e.contains(&*mnt.to_string_lossy()),
        "{e}"
    );
    // Mounted read-only, so nothing but a format could change it.
    assert_eq!(
        sha256(Path::new(&dev.0)),
        before,
        "the refused device was written"
    );
    let (ok, _, err) = sh(&format!("umount {}", mnt.display()));
    assert!(ok, "{err}");
    // Not on a terminal and no --yes: refused, unchanged.
    let o = lifeboat(&conf).args(["format", &dev.0]).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("--yes"), "{e}");
    assert_eq!(sha256(Path::new(&dev.0)), before);
    // --dry-run: every check, the summary, and no write.
    let o = run_ok(lifeboat(&conf).args(["format", "--dry-run", &dev.0]));
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(
        said.contains("dry run: would erase")
            && said.contains("labelled LIFEBOAT-000")
            && said.contains("nothing was written"),
        "{said}"
    );
    assert_eq!(
        sha256(Path::new(&dev.0)),
        before,
        "--dry-run wrote the device"
    );
    let o = run_ok(lifeboat(&conf).args(["format", "--yes", &dev.0]));
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(said.contains("label LIFEBOAT-000"), "{said}");
    let (ok, j, err) = sh(&format!("sfdisk --json {}", dev.0));
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&j).unwrap();
    let parts = v["partitiontable"]["partitions"].as_array().unwrap();
    assert_eq!(v["partitiontable"]["label"], "gpt");
    let got: Vec<(u64, u64, String)> = parts
        .iter()
        .map(|p| {
            (
                p["start"].as_u64().unwrap(),
                p["size"].as_u64().unwrap(),
                p["type"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(got.len(), 3, "{j}");
    assert_eq!(
        got[0],
        (2048, 2048, "21686148-6449-6E6F-744E-656564454649".into())
    );
    assert_eq!(
        got[1],
        (4096, 131072, "C12A7328-F81F-11D2-BA4B-00A0C93EC93B".into())
    );
    assert_eq!(got[2].0, 4096 + 131072);
    assert_eq!(got[2].2, "0FC63DAF-8483-4772-8E79-3D69D8477DE4");
    // blkid sees the data filesystem and the ESP at their offsets.
    let (_, d, _) = sh(&format!(
        "blkid -p -o export -O {} {}",
        got[2].0 * 512,
        dev.0
    ));
    assert!(
        d.contains("LABEL=LIFEBOAT-000") && d.contains("TYPE=ext4"),
        "{d}"
    );
    let (_, e, _) = sh(&format!("blkid -p -o export -O {} {}", 4096 * 512, dev.0));
    assert!(e.contains("TYPE=vfat"), "{e}");
    // A missing path is neither a device nor an image to create.
    let o = lifeboat(&conf)
        .args(["format", "--yes"])
        .arg(t.path().join("nothing"))
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("does not exist") && e.contains("--size"),
        "{e}"
    );
}

#[test]
fn usb_stick_lists_every_image_and_boots_under_seabios_and_ovmf() {
    let work = tempfile::tempdir().unwrap().keep();
    let conf = work.join("etc");
    std::fs::create_dir_all(&conf).unwrap();
    let stick = work.join("stick.img");
    run_ok(
        lifeboat(&conf)
            .args(["format", "--yes", "--size", "320M"])
            .arg(&stick),
    );
    let (ok, j, err) = sh(&format!("sfdisk --json {}", stick.display()));
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&j).unwrap();
    let data = &v["partitiontable"]["partitions"][2];
    let (start, size) = (
        data["start"].as_u64().unwrap(),
        data["size"].as_u64().unwrap(),
    );
    // Two images on the stick: the menu shows the newer at the top and
    // the older in a submenu.
    {
        let part = Loop::new(&stick, Some((start * 512, size * 512)));
        let mnt = work.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let (ok, _, err) = sh(&format!("mount {} {}", part.0, mnt.display()));
        assert!(ok, "{err}");
        let toml = format!("OUTPUT = \"USB\"\nKERNEL_CMDLINE = \"lifeboat.test=usb\"\n{MENU}");
        for _ in 0..2 {
            let o = build(&work, &mnt, &toml, &[]);
            let s = String::from_utf8_lossy(&o.stdout);
            assert!(s.contains("boot menu updated"), "{s}");
            std::thread::sleep(Duration::from_millis(1100));
        }
        let cfg = std::fs::read_to_string(mnt.join("boot/grub/grub.cfg")).unwrap();
        assert_eq!(cfg.matches("submenu").count(), 1, "{cfg}");
        assert_eq!(cfg.matches("menuentry").count(), 12, "{cfg}");
        // A dry run with usb_retain = 1 names both old images it would
        // remove, and removes nothing.
        let o = build(
            &work,
            &mnt,
            &format!("usb_retain = 1\n{toml}"),
            &["--dry-run"],
        );
        let s = String::from_utf8_lossy(&o.stdout);
        assert_eq!(
            s.matches("would remove the old rescue image").count(),
            2,
            "{s}"
        );
        assert!(s.contains("nothing was written"), "{s}");
        assert_eq!(
            std::fs::read_to_string(mnt.join("boot/grub/grub.cfg")).unwrap(),
            cfg,
            "the dry run changed the stick"
        );
        // Without `lifeboat format` there is no stick to write to.
        let bare = work.join("bare");
        let o = lifeboat(&conf)
            .arg("mkrescue")
            .args(["--output", "USB", "--output-dir"])
            .arg(&bare)
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains("lifeboat format"), "{e}");
        let (ok, _, err) = sh(&format!("umount {}", mnt.display()));
        assert!(ok, "{err}");
    }
    let c = boot_disk(&stick, "raw", false, &work.join("usb-bios.log"));
    assert!(
        c.contains("lifeboat.test=usb"),
        "the stick's menu was not used"
    );
    boot_disk(&stick, "raw", true, &work.join("usb-uefi.log"));
}

/// The host name the images are built under (the tree's directory name).
fn this_host() -> String {
    let (_, h, _) = sh("hostname");
    h.trim().to_string()
}

/// Network-boot the VM (no disks) with slirp's DHCP handing out `netdev`
/// options (tftp=, bootfile=) to QEMU's built-in iPXE.
fn boot_net(netdev: &str, log: &Path, what: &str) -> String {
    let mut spec = BootSpec {
        memory_mb: 1536,
        log: Some(log.to_path_buf()),
        ..BootSpec::from_disks()
    }
    .with_user_net(netdev);
    spec.extra_args
        .extend(["-boot".to_string(), "n".to_string()]);
    let mut vm = Vm::boot(&spec).unwrap();
    vm.wait_for("lifeboat: ready", BOOT).unwrap_or_else(|e| {
        panic!(
            "{what} did not boot to the rescue system: {e}\n{}",
            vm.console()
        )
    });
    vm.console()
}

const PXE: &str = "OUTPUT = \"PXE\"\npxe_macs = [\"52:54:00:12:34:56\"]\nKERNEL_CMDLINE = \"lifeboat.test=pxe\"\n";

#[test]
fn pxe_tree_boots_with_pxelinux_over_tftp() {
    let work = tempfile::tempdir().unwrap().keep();
    let tree = work.join("tftp");
    let o = build(&work, &tree, &format!("{PXE}{MENU}"), &[]);
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(said.contains("PXE tree"), "{said}");
    let host = this_host();
    let m = manifest(&tree.join("lifeboat").join(&host));
    for f in [
        "pxelinux.0".to_string(),
        "ldlinux.c32".into(),
        "pxelinux.cfg/01-52-54-00-12-34-56".into(),
        "boot/grub/grub.cfg-01-52-54-00-12-34-56".into(),
        format!("lifeboat/{host}/boot.ipxe"),
        format!("lifeboat/{host}/{}", m.kernel),
    ] {
        assert!(tree.join(&f).is_file(), "{f} missing from the PXE tree");
    }
    let cfg = std::fs::read_to_string(tree.join("pxelinux.cfg/01-52-54-00-12-34-56")).unwrap();
    let layers: Vec<String> = m
        .layers
        .iter()
        .map(|l| format!("lifeboat/{host}/{}", l.file))
        .collect();
    assert!(
        cfg.contains(&format!("INITRD {}\n", layers.join(","))),
        "{cfg}"
    );
    let c = boot_net(
        &format!("tftp={},bootfile=pxelinux.0", tree.display()),
        &work.join("pxelinux.log"),
        "pxelinux over TFTP",
    );
    assert!(
        c.contains("lifeboat.test=pxe"),
        "the pxelinux config was not used"
    );
    // IPAPPEND 2: the boot NIC is named on the command line.
    assert!(c.contains("BOOTIF=01-52-54-00-12-34-56"), "no BOOTIF=");
}

#[test]
fn pxe_tree_uploaded_to_a_web_server_boots_with_ipxe_over_http() {
    let work = tempfile::tempdir().unwrap().keep();
    let srv = lifeboat_qemu::servers::nginx(&work.join("nginx"));
    let conf = work.join("etc-lifeboat");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(
        work.join("test.toml"),
        format!(
            "{PXE}OUTPUT_URL = \"http://127.0.0.1:{}/\"\n{MENU}",
            srv.port
        ),
    )
    .unwrap();
    let f = fixture();
    let o = run_ok(
        lifeboat(&conf)
            .arg("-c")
            .arg(work.join("test.toml"))
            .arg("mkrescue")
            .arg("--kernel")
            .arg(f.kernel())
            .args(["--kver", &f.kver, "--modules-dir"])
            .arg(f.modules_dir()),
    );
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(
        said.contains(&format!("http://127.0.0.1:{}/", srv.port)),
        "{said}"
    );
    let host = this_host();
    let script = srv.root.join("lifeboat").join(&host).join("boot.ipxe");
    assert!(script.is_file(), "boot.ipxe was not uploaded: {said}");
    assert!(srv.root.join("pxelinux.cfg/01-52-54-00-12-34-56").is_file());
    let c = boot_net(
        &format!(
            "bootfile=http://10.0.2.2:{}/lifeboat/{host}/boot.ipxe",
            srv.port
        ),
        &work.join("ipxe.log"),
        "iPXE over HTTP",
    );
    assert!(
        c.contains("lifeboat.test=pxe"),
        "the iPXE script was not used"
    );
}

#[test]
fn signed_uki_has_its_sections_and_boots_under_ovmf() {
    let work = tempfile::tempdir().unwrap().keep();
    let out = work.join("img");
    let (ok, _, err) = sh(&format!(
        "cd {} && openssl req -x509 -newkey rsa:2048 -nodes -keyout db.key -out db.crt -days 2 -subj /CN=lifeboat-test-db 2>&1",
        work.display()
    ));
    assert!(ok, "{err}");
    let o = build(
        &work,
        &out,
        &format!(
            "OUTPUT = \"UKI\"\nuki_sign_key = \"{0}/db.key\"\nuki_sign_cert = \"{0}/db.crt\"\n\
             KERNEL_CMDLINE = \"lifeboat.test=uki\"\n{MENU}",
            work.display()
        ),
        &[],
    );
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(said.contains("UKI (signed)"), "{said}");
    let uki = out.join(format!("lifeboat-{}.efi", this_host()));
    // objdump and sbverify are the oracles.
    let (ok, h, err) = sh(&format!("objdump -h {}", uki.display()));
    assert!(ok, "{err}");
    for s in [".osrel", ".cmdline", ".linux", ".initrd"] {
        assert!(h.contains(s), "section {s} missing: {h}");
    }
    let (ok, v, err) = sh(&format!(
        "sbverify --cert {}/db.crt {} 2>&1",
        work.display(),
        uki.display()
    ));
    assert!(ok && v.contains("Signature verification OK"), "{v}{err}");
    let (ok, v, _) = sh(&format!("sbverify --list {} 2>&1", uki.display()));
    assert!(ok && v.contains("lifeboat-test-db"), "{v}");
    // Booted as the removable-media loader of an ESP, with no boot manager.
    let disk = work.join("esp.img");
    let (ok, _, err) = sh(&format!(
        "truncate -s 200M {d} && echo 'label: gpt\ntype=C12A7328-F81F-11D2-BA4B-00A0C93EC93B' | sfdisk -q {d} && \
         mkfs.fat -F 32 --offset 2048 {d} 190000 >/dev/null && \
         MTOOLS_SKIP_CHECK=1 mmd -i {d}@@1048576 ::/EFI ::/EFI/BOOT && \
         MTOOLS_SKIP_CHECK=1 mcopy -i {d}@@1048576 {u} ::/EFI/BOOT/BOOTX64.EFI",
        d = disk.display(),
        u = uki.display()
    ));
    assert!(ok, "{err}");
    let c = boot_disk(&disk, "raw", true, &work.join("uki-uefi.log"));
    assert!(
        c.contains("lifeboat.test=uki"),
        "the UKI's .cmdline was not used"
    );
}

#[test]
fn udev_rule_names_the_stick_and_udev_runs_the_configured_workflow() {
    let work = tempfile::tempdir().unwrap();
    let conf = work.path().join("etc");
    std::fs::create_dir_all(&conf).unwrap();
    let f = fixture();
    let out = work.path().join("out");
    let toml = work.path().join("l.toml");
    let base = format!(
        "OUTPUT_URL = \"file://{}\"\nBACKUP_URL = \"usb://MYSTICK\"\n[network]\ncapture = false\n\
         [rescue]\nkernel = \"{}\"\nkver = \"{}\"\nmodules_dir = \"{}\"\n",
        out.display(),
        f.kernel().display(),
        f.kver,
        f.modules_dir().display()
    );
    std::fs::write(&toml, &base).unwrap();
    let udev = |extra: &[&str]| {
        let mut c = lifeboat(&conf);
        c.arg("-c")
            .arg(&toml)
            .arg("udev")
            .args(extra)
            .env("LIFEBOAT_UDEV_LOCK", work.path().join("udev.lock"));
        c.output().unwrap()
    };
    let o = udev(&["--rule"]);
    let rule = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{rule}");
    assert!(
        rule.contains("ENV{ID_FS_LABEL}==\"MYSTICK\"")
            && rule.contains("RUN+=\"/usr/bin/systemd-run --no-block")
            && rule.contains(&format!("-c {} udev --device $devnode", toml.display())),
        "{rule}"
    );
    // No workflow configured: nothing happens.
    let o = udev(&["--device", "/dev/sdz1"]);
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && said.contains("udev_workflow is not set"),
        "{said}"
    );
    assert!(!out.exists());
    // A workflow that is not a backup/rescue one is refused.
    std::fs::write(&toml, format!("UDEV_WORKFLOW = \"recover\"\n{base}")).unwrap();
    let o = udev(&["--device", "/dev/sdz1"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("mkrescue, mkbackup"),
        "{e}"
    );
    // mkrescue runs and writes the image.
    std::fs::write(&toml, format!("UDEV_WORKFLOW = \"mkrescue\"\n{base}")).unwrap();
    let o = udev(&["--device", "/dev/sdz1"]);
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        said.contains("running mkrescue") && said.contains("mkrescue done"),
        "{said}"
    );
    assert!(manifest(&out).layers.len() > 1);
}

#[test]
fn portable_tarball_carries_a_static_lifeboat_that_reads_its_own_config() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let o = build(
        work.path(),
        &out,
        "OUTPUT = \"PORTABLE\"\nboot_timeout = 7\n[network]\ncapture = false\n",
        &[],
    );
    let e = String::from_utf8_lossy(&o.stderr);
    // mkrescue alone has no plan to carry: it says so.
    assert!(e.contains("has no etc/lifeboat/layout.json"), "{e}");
    let host = this_host();
    let tgz = out.join(format!("lifeboat-portable-{host}.tar.gz"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&tgz).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // GNU tar is the oracle for the contents.
    let (ok, list, err) = sh(&format!("tar tvzf {}", tgz.display()));
    assert!(ok, "{err}");
    for f in [
        "lifeboat",
        "lifeboat.toml",
        "lifeboat-portable.json",
        "README.txt",
    ] {
        assert!(
            list.lines()
                .any(|l| l.ends_with(&format!("lifeboat-portable-{host}/{f}"))),
            "{f} missing: {list}"
        );
    }
    assert!(list.contains("-rwxr-xr-x 0/0"), "{list}");
    let (ok, _, err) = sh(&format!(
        "cd {} && tar xzf {}",
        work.path().display(),
        tgz.display()
    ));
    assert!(ok, "{err}");
    let dir = work.path().join(format!("lifeboat-portable-{host}"));
    // Static: no program interpreter, so it runs on any live system.
    let (_, file, _) = sh(&format!("file -L {}/lifeboat", dir.display()));
    let (_, interp, _) = sh(&format!(
        "readelf -l {}/lifeboat | grep -c 'program interpreter' || true",
        dir.display()
    ));
    assert_eq!(interp.trim(), "0", "{file}");
    // The extracted binary reads lifeboat.toml next to itself.
    let (ok, dump, err) = sh(&format!(
        "cd / && LIFEBOAT_CONFIG_DIR={0}/none {0}/lifeboat dump",
        dir.display()
    ));
    assert!(ok, "{err}");
    assert!(dump.contains("boot_timeout = 7"), "{dump}");
    assert!(dump.contains("lifeboat.toml"), "{dump}");
    // And recover looks for the plan there, naming the file it misses.
    let (ok, _, err) = sh(&format!(
        "LIFEBOAT_CONFIG_DIR={0}/none {0}/lifeboat recover --dry-run",
        dir.display()
    ));
    assert!(!ok);
    assert!(
        err.contains(&format!("{}/etc/lifeboat/layout.json", dir.display())),
        "{err}"
    );
}

#[test]
fn obdr_mkrescue_writes_label_area_and_iso_to_the_tape() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let tap = work.path().join("drive.tap");
    let url = format!("tape://{}", tap.display());
    let o = build(
        work.path(),
        &out,
        &format!("OUTPUT = \"OBDR\"\nBACKUP_URL = \"{url}\"\n{MENU}"),
        &[],
    );
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(said.contains("bootable ISO from block 20"), "{said}");
    assert_eq!(
        lifeboat::tape::obdr_label(&url).unwrap().as_deref(),
        Some("LIFEBOAT-000")
    );
    let iso = work.path().join("from-tape.iso");
    lifeboat::tape::read_obdr_iso(&url, &iso).unwrap();
    let host = this_host();
    assert_eq!(
        sha256(&iso),
        sha256(&out.join(format!("lifeboat-{host}.iso"))),
        "the tape's ISO differs from the one written"
    );
    let et = xorriso(&iso, "el_torito");
    assert_eq!(et.matches("El Torito boot img :").count(), 2, "{et}");
    // Without a tape URL there is nowhere to write.
    let w2 = tempfile::tempdir().unwrap();
    let conf = w2.path().join("etc");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(w2.path().join("t.toml"), "OUTPUT = \"OBDR\"\n").unwrap();
    let o = lifeboat(&conf)
        .arg("-c")
        .arg(w2.path().join("t.toml"))
        .args(["mkrescue", "--output-dir"])
        .arg(w2.path().join("o"))
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("BACKUP_URL = \"tape:///dev/nst0\""),
        "{e}"
    );
}

#[test]
fn output_url_sftp_uploads_the_output_to_the_hosts_directory() {
    let work = tempfile::tempdir().unwrap();
    let srv = lifeboat_qemu::servers::sshd(&work.path().join("sshd"));
    let conf = work.path().join("etc");
    std::fs::create_dir_all(&conf).unwrap();
    let toml = work.path().join("t.toml");
    std::fs::write(
        &toml,
        format!(
            "OUTPUT = \"PORTABLE\"\nOUTPUT_URL = \"sftp://root@127.0.0.1:{}{}/rescue\"\n\
             backup_credentials = \"{}\"\nbackup_ssh_options = [\"UserKnownHostsFile={}\"]\n",
            srv.port,
            srv.root.display(),
            srv.dir.join("id_ed25519").display(),
            srv.dir.join("known_hosts").display()
        ),
    )
    .unwrap();
    let o = run_ok(lifeboat(&conf).arg("-c").arg(&toml).arg("mkrescue"));
    let said = String::from_utf8_lossy(&o.stdout);
    let host = this_host();
    let name = format!("lifeboat-portable-{host}.tar.gz");
    assert!(
        said.contains(&format!("sftp://root@127.0.0.1:{}", srv.port)),
        "{said}"
    );
    let up = srv.root.join("rescue").join(&host).join(&name);
    assert!(up.is_file(), "{} not uploaded: {said}", up.display());
    let (ok, list, err) = sh(&format!("tar tzf {}", up.display()));
    assert!(ok && list.contains("/lifeboat.toml"), "{list}{err}");
}

/// Secrets: a host key among copy_as_is, a root password hash and an age
/// backup key are configured. By default no output (image directory and
/// its layers, ISO, USB stick, PXE tree) carries any of them, as the
/// scanner finds by looking into every ISO, partition and initramfs
/// member; with --expose-secrets they are all in the plan layer and
/// nowhere else, and the files holding it are 0600.
#[test]
fn secret_scanner_finds_nothing_by_default_and_exposed_secrets_only_in_the_plan_layer() {
    let work = tempfile::tempdir().unwrap().keep();
    let key = work.join("host_ed25519_key");
    let (ok, _, err) = sh(&format!(
        "ssh-keygen -q -t ed25519 -N '' -f {}",
        key.display()
    ));
    assert!(ok, "ssh-keygen: {err}");
    let (ok, hash, err) = sh("openssl passwd -6 -salt saltsalt rescue-pw");
    assert!(ok, "{err}");
    let age = work.join("backup.key");
    std::fs::write(
        &age,
        "# created: 2026-12-02\nAGE-SECRET-KEY-1QYQSZQGPQYQSZQGPQYQSZQGPQYQSZQGPQYQSZQGPQYQSZQGPQYQSQ6AJDZ7\n",
    )
    .unwrap();
    let toml = format!(
        "backup_key_file = \"{}\"\n{MENU}\n[ssh]\npassword_hash = \"{}\"\n[rescue]\ncopy_as_is = [\"{}\"]\n",
        age.display(),
        hash.trim(),
        key.display()
    );
    let scan = |p: &Path| -> (bool, serde_json::Value) {
        let o = lifeboat(&work.join("etc"))
            .args(["image", "scan", "--json"])
            .arg(p)
            .output()
            .unwrap();
        let v = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
            panic!(
                "{e}: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        });
        (o.status.success(), v)
    };
    // A USB stick to write to.
    let stick = work.join("stick.img");
    run_ok(
        lifeboat(&work.join("etc"))
            .args(["format", "--yes", "--size", "320M"])
            .arg(&stick),
    );
    let (ok, j, err) = sh(&format!("sfdisk --json {}", stick.display()));
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&j).unwrap();
    let data = &v["partitiontable"]["partitions"][2];
    let span = (
        data["start"].as_u64().unwrap() * 512,
        data["size"].as_u64().unwrap() * 512,
    );
    let usb = |args: &[&str]| {
        let part = Loop::new(&stick, Some(span));
        let mnt = work.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let (ok, _, err) = sh(&format!("mount {} {}", part.0, mnt.display()));
        assert!(ok, "{err}");
        build(&work, &mnt, &format!("OUTPUT = \"USB\"\n{toml}"), args);
        let (ok, _, err) = sh(&format!("umount {}", mnt.display()));
        assert!(ok, "{err}");
    };

    // 1. Default: every output is clean, and each secret left out is named.
    let img = work.join("img");
    let o = build(&work, &img, &toml, &[]);
    let said = String::from_utf8_lossy(&o.stderr).to_string() + &String::from_utf8_lossy(&o.stdout);
    assert!(
        said.contains(&format!(
            "left out of the image: {} (private key",
            key.display()
        )) && said.contains("ssh.password_hash is not put into the image"),
        "{said}"
    );
    let iso = work.join("iso");
    build(&work, &iso, &format!("OUTPUT = \"ISO\"\n{toml}"), &[]);
    let pxe = work.join("pxe");
    build(&work, &pxe, &format!("{PXE}{toml}"), &[]);
    usb(&[]);
    for p in [&img, &iso, &pxe, &stick] {
        let (clean, found) = scan(p);
        assert!(
            clean && found.as_array().unwrap().is_empty(),
            "{}: {found}",
            p.display()
        );
    }

    // 2. Exposed: the three secrets, in the plan layer only.
    let img = work.join("img-exposed");
    build(&work, &img, &toml, &["--expose-secrets"]);
    let iso = work.join("iso-exposed");
    build(
        &work,
        &iso,
        &format!("OUTPUT = \"ISO\"\n{toml}"),
        &["--expose-secrets"],
    );
    usb(&["--expose-secrets"]);
    let key_path = key.display().to_string();
    let age_path = age.display().to_string();
    for p in [&img, &iso, &stick] {
        let (clean, found) = scan(p);
        assert!(!clean, "{}: the scan must fail", p.display());
        let found = found.as_array().unwrap();
        let kinds: Vec<(&str, &str)> = found
            .iter()
            .map(|f| (f["place"].as_str().unwrap(), f["kind"].as_str().unwrap()))
            .collect();
        for (path, kind) in [
            (key_path.as_str(), "private key"),
            ("/etc/lifeboat/init.json", "password hash"),
            (age_path.as_str(), "age identity (backup key)"),
        ] {
            assert!(
                kinds.iter().any(|(pl, k)| pl.ends_with(path) && *k == kind),
                "{}: {kind} at {path} not found in {kinds:?}",
                p.display()
            );
        }
        for f in found {
            assert_eq!(
                f["layer"],
                "plan",
                "{}: a secret outside the plan layer: {f}",
                p.display()
            );
        }
    }
    // `image ls` marks them; the files holding the plan are root's alone.
    let o = run_ok(
        lifeboat(&work.join("etc"))
            .args(["image", "ls", "--json"])
            .arg(&img),
    );
    let ls: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let marked: Vec<String> = ls
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e.get("secret").is_some())
        .map(|e| {
            format!(
                "{} {} {}",
                e["layer"].as_str().unwrap(),
                e["mode"].as_str().unwrap(),
                e["path"].as_str().unwrap()
            )
        })
        .collect();
    // The three, and the configuration copy holding the password hash.
    assert_eq!(marked.len(), 4, "{marked:?}");
    for want in [
        "etc/lifeboat/init.json",
        "etc/lifeboat/lifeboat.toml",
        "backup.key",
        "host_ed25519_key",
    ] {
        assert!(
            marked.iter().any(|m| m.ends_with(want)),
            "{want} not marked: {marked:?}"
        );
    }
    assert!(
        marked.iter().all(|m| m.starts_with("plan -rw------- ")),
        "{marked:?}"
    );
    use std::os::unix::fs::PermissionsExt;
    let m = manifest(&img);
    for f in [
        m.initrd.clone(),
        m.layers
            .iter()
            .find(|l| l.name == "plan")
            .unwrap()
            .file
            .clone(),
    ] {
        let mode = std::fs::metadata(img.join(&f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{f} is {mode:o}");
    }
    let iso_file = written(&iso, "iso");
    let mode = std::fs::metadata(&iso_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{} is {mode:o}", iso_file.display());
}
