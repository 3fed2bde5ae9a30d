//! `lifeboat layout save/show/check` on a real (loop) disk, against sfdisk.

mod common;

use common::*;

/// A loop device over a 64 MiB image with a GPT of two partitions; detached on drop.
struct Loop {
    dev: String,
    _dir: tempfile::TempDir,
}

impl Loop {
    fn new() -> Loop {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        let (ok, _, err) = sh(&format!(
            "truncate -s 64M {0} && printf 'label: gpt\\n,16M,L\\n,16M,S\\n' | sfdisk -q {0}",
            img.display()
        ));
        assert!(ok, "{err}");
        let (ok, out, err) = sh(&format!("losetup -f --show {}", img.display()));
        assert!(ok, "losetup failed: {err}");
        Loop {
            dev: out.trim().to_string(),
            _dir: dir,
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = sh(&format!("losetup -d {}", self.dev));
    }
}

#[test]
fn check_reports_an_added_partition_and_nothing_else() {
    let l = Loop::new();
    let w = tempfile::tempdir().unwrap();
    let file = w.path().join("layout.json");
    let f = file.to_str().unwrap();
    run_ok(lifeboat(w.path()).args(["layout", "save", "-o", f, "--disk", &l.dev]));
    // The saved table is what sfdisk says.
    let saved =
        lifeboat_contract::Layout::from_json(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let (_, sf, _) = sh(&format!("sfdisk --json {}", l.dev));
    let sf: serde_json::Value = serde_json::from_str(&sf).unwrap();
    let t = saved.disks[0].table.as_ref().unwrap();
    assert_eq!(t.id, sf["partitiontable"]["id"].as_str().unwrap());
    assert_eq!(t.partitions.len(), 2);
    for (p, q) in t
        .partitions
        .iter()
        .zip(sf["partitiontable"]["partitions"].as_array().unwrap())
    {
        assert_eq!(Some(p.start), q["start"].as_u64());
        assert_eq!(Some(p.size), q["size"].as_u64());
        assert_eq!(p.uuid.as_deref(), q["uuid"].as_str());
    }

    let o = lifeboat(w.path())
        .args(["layout", "check", f, "--disk", &l.dev])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );

    let (ok, _, err) = sh(&format!("echo ',8M,L' | sfdisk -q --append {}", l.dev));
    assert!(ok, "{err}");
    let o = lifeboat(w.path())
        .args(["layout", "check", f, "--disk", &l.dev])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("partitions[3]: added"), "{out}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("  ")).count(),
        1,
        "only the new partition differs: {out}"
    );

    let o = lifeboat(w.path())
        .args(["layout", "check", "--json", f, "--disk", &l.dev])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["changed"], true);

    let o = lifeboat(w.path())
        .args(["layout", "show", f])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains(&l.dev) && text.contains("gpt table"),
        "{text}"
    );
}

#[test]
fn check_without_a_saved_layout_says_what_to_do() {
    let w = tempfile::tempdir().unwrap();
    let o = lifeboat(w.path())
        .args(["layout", "check", "/nonexistent/layout.json"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("run `lifeboat layout save` first"));
}

/// Inside the rescue OS in QEMU (the build machine has no md driver):
/// build md RAID1 + LUKS2 + LVM (linear, thin) + xfs/ext4 + btrfs with
/// subvolumes, run `lifeboat layout save` there, and check what it captured
/// against what the real tools printed in the same run.
#[test]
fn capture_of_md_luks_lvm_and_btrfs_in_a_vm() {
    use lifeboat_qemu::{BootSpec, Vm};
    use std::time::Duration;
    let w = tempfile::tempdir().unwrap();
    let overlay = repo().join("tests/fixtures/layout/vm-overlay");
    let img = w.path().join("img");
    build(
        w.path(),
        &img,
        &format!(
            "[network]\ncapture = false\n[ssh]\nenabled = false\n[rescue]\noverlays = [\"{}\"]\n",
            overlay.display()
        ),
        &[],
    );
    let m = manifest(&img);
    let mut spec = BootSpec::new(&img.join(&m.kernel), &img.join(&m.initrd));
    spec.log = Some(w.path().join("console.log"));
    for (i, (name, size)) in [("a", "700M"), ("b", "700M"), ("c", "700M"), ("out", "8M")]
        .iter()
        .enumerate()
    {
        let p = w.path().join(format!("{name}.img"));
        let (ok, _, err) = sh(&format!("truncate -s {size} {}", p.display()));
        assert!(ok, "{err}");
        spec.extra_args.extend([
            "-drive".into(),
            format!("file={},format=raw,if=none,id=d{i}", p.display()),
            "-device".into(),
            format!("virtio-blk-pci,drive=d{i}"),
        ]);
    }
    let mut vm = Vm::boot(&spec).unwrap();
    let at = vm
        .wait_for("lifeboat: ready", Duration::from_secs(180))
        .unwrap();
    vm.wait_for_from("lifeboat:~# ", at, Duration::from_secs(60))
        .unwrap();
    // record-layout leaves its outputs in /tmp/rec; keep btrfs mounted for the capture.
    vm.send_line(
        "sed -i 's|^tar -cf /dev/vdd.*||' /usr/local/bin/record-layout && record-layout && mount /dev/vdc /mnt/bt \
         && lifeboat layout save -o /tmp/rec/layout.json && tar -cf /dev/vdd -C /tmp/rec . && sync && echo CAPTURE-OK-$((1+1))",
    )
    .unwrap();
    vm.wait_for_from("CAPTURE-OK-2", at, Duration::from_secs(400))
        .unwrap();
    drop(vm);
    let out = w.path().join("rec");
    std::fs::create_dir(&out).unwrap();
    let (ok, _, err) = sh(&format!(
        "tar -xf {} -C {}",
        w.path().join("out.img").display(),
        out.display()
    ));
    assert!(ok, "{err}");
    let read = |n: &str| std::fs::read_to_string(out.join(n)).unwrap();
    let l = lifeboat_contract::Layout::from_json(&read("layout.json")).unwrap();

    // md: same array as mdadm reports, members in role order.
    let md =
        lifeboat::layout_parse::mdadm_export("/dev/md0", &read("mdadm-detail-export.txt")).unwrap();
    assert_eq!(l.md, vec![md]);
    assert_eq!(l.md[0].members, vec!["/dev/vda", "/dev/vdb"]);
    // LUKS on the array, as luksDump says.
    assert_eq!(l.luks.len(), 1);
    assert_eq!(l.luks[0].device, "/dev/md0");
    assert!(read("cryptsetup-luksdump.txt").contains(&l.luks[0].uuid));
    // LVM as its own JSON reports.
    assert_eq!(
        l.lvm.lvs,
        lifeboat::layout_parse::lvm_lvs(&read("lvm-lvs.json")).unwrap()
    );
    let mut vgs = l.lvm.vgs.clone();
    for v in vgs.iter_mut() {
        // The vgcfgbackup text of each VG, naming it and its UUID.
        let meta = v.metadata.take().expect("VG metadata not captured");
        assert!(
            meta.contains(&format!("{} {{", v.name)) && meta.contains(&v.uuid),
            "{meta}"
        );
    }
    assert_eq!(
        vgs,
        lifeboat::layout_parse::lvm_vgs(&read("lvm-vgs.json")).unwrap()
    );
    // Filesystems with their UUIDs (blkid is the oracle) and creation parameters.
    let blkid = read("blkid.txt");
    let fs = |dev: &str| {
        l.filesystems
            .iter()
            .find(|f| f.device == dev)
            .unwrap_or_else(|| panic!("{dev} not captured: {:?}", l.filesystems))
    };
    for (dev, t) in [
        ("/dev/vg0/root", "xfs"),
        ("/dev/vg0/thin1", "ext4"),
        ("/dev/vdc", "btrfs"),
        ("/dev/md0", "crypto_LUKS"),
    ] {
        let f = fs(dev);
        assert_eq!(f.fstype, t);
        assert!(
            blkid.contains(&format!("UUID={}", f.uuid.as_ref().unwrap())),
            "{dev}: {:?}",
            f.uuid
        );
    }
    assert_eq!(
        fs("/dev/vg0/root")
            .params
            .get("meta-data.isize")
            .map(String::as_str),
        Some("512")
    );
    assert!(fs("/dev/vg0/thin1").params["features"].contains("metadata_csum"));
    let bt = fs("/dev/vdc");
    assert_eq!(
        bt.subvolumes
            .iter()
            .map(|s| s.path.as_str())
            .collect::<Vec<_>>(),
        vec!["@", "@home", "@home/snaps"]
    );
    assert_eq!(bt.default_subvolume, Some(bt.subvolumes[0].id));
}

#[test]
fn grub_bios_code_and_special_partitions_are_recognised() {
    // GRUB's own boot.img (grub-pc-bin) in the MBR code area, as grub-bios-setup writes it.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let (ok, _, err) = sh(&format!(
        "truncate -s 64M {0} && printf 'label: gpt\\n,1M,21686148-6449-6E6F-744E-656564454649\\n,32M,U\\n,,L\\n' | sfdisk -q {0} \
         && dd if=/usr/lib/grub/i386-pc/boot.img of={0} bs=440 count=1 conv=notrunc status=none",
        img.display()
    ));
    assert!(ok, "{err}");
    let (ok, out, err) = sh(&format!("losetup -f --show {}", img.display()));
    assert!(ok, "{err}");
    let dev = out.trim().to_string();
    let w = tempfile::tempdir().unwrap();
    let file = w.path().join("l.json");
    let o = lifeboat(w.path())
        .args([
            "layout",
            "save",
            "-o",
            file.to_str().unwrap(),
            "--disk",
            &dev,
        ])
        .output()
        .unwrap();
    let _ = sh(&format!("losetup -d {dev}"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let l = lifeboat_contract::Layout::from_json(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(l.bootloader.grub_bios_disks, vec![dev.clone()]);
    assert_eq!(l.bootloader.bios_boot_partitions, vec![format!("{dev}p1")]);
    assert_eq!(l.bootloader.esps, vec![format!("{dev}p2")]);
}
