//! The native modules reader against the real kmod tools on the same tree:
//! `modprobe --show-depends` for closures, `modprobe -R` for aliases,
//! `modinfo -F firmware` for firmware names.

mod common;

use common::*;
use lifeboat::kmod::ModulesDb;
use std::collections::BTreeSet;
use std::path::PathBuf;

fn modprobe_d() -> Vec<PathBuf> {
    lifeboat::kmod::default_modprobe_dirs()
}

fn db() -> ModulesDb {
    ModulesDb::load(&fixture().modules_dir(), &modprobe_d()).unwrap()
}

/// Module paths (relative to the modules dir) that modprobe would insert.
fn modprobe_closure(name: &str) -> BTreeSet<String> {
    let f = fixture();
    let (ok, out, err) = sh(&format!(
        "modprobe -d {} -S {} --show-depends {name}",
        f.root.display(),
        f.kver
    ));
    assert!(ok, "modprobe --show-depends {name} failed: {err}");
    let prefix = format!("{}/", f.modules_dir().display());
    out.lines()
        .filter_map(|l| l.strip_prefix("insmod "))
        .map(|l| {
            l.split_whitespace()
                .next()
                .unwrap()
                .trim_start_matches(&prefix)
                .to_string()
        })
        .collect()
}

#[test]
fn closures_match_modprobe_show_depends() {
    let db = db();
    for name in [
        "virtio_blk",
        "nvme",
        "ahci",
        "e1000e",
        "ext4",
        "xfs",
        "btrfs",
        "dm_crypt",
        "raid1",
        "virtio_net",
        "usb_storage",
    ] {
        let ours: BTreeSet<String> = db
            .closure(&db.resolve(name).into_iter().collect())
            .into_iter()
            .map(|m| db.modules[&m].path.clone())
            .collect();
        let theirs = modprobe_closure(name);
        assert!(
            !theirs.is_empty() || db.builtin.contains(name),
            "modprobe listed nothing for {name}"
        );
        assert_eq!(
            ours, theirs,
            "closure of {name} differs from modprobe --show-depends"
        );
    }
}

#[test]
fn generic_image_contains_every_closure() {
    let db = db();
    let cfg = lifeboat::config::Config::default();
    let mut warnings = Vec::new();
    let set = lifeboat::rescue::select_modules(&cfg, &db, &mut warnings).unwrap();
    for name in [
        "virtio_blk",
        "virtio_scsi",
        "virtio_net",
        "nvme",
        "ahci",
        "e1000e",
        "ext4",
        "xfs",
        "btrfs",
        "vfat",
        "dm_crypt",
        "raid1",
        "raid456",
        "dm_mod",
        "usb_storage",
        "uas",
        "xhci_pci",
        "hid_generic",
        "igb",
        "r8169",
    ] {
        for p in modprobe_closure(name) {
            let m = lifeboat::kmod::name_from_path(&p);
            assert!(set.contains(&m), "generic set lacks {m} (needed by {name})");
        }
    }
}

#[test]
fn alias_resolution_matches_modprobe() {
    let db = db();
    let f = fixture();
    for alias in [
        "virtio:d00000002v00001AF4",
        "virtio:d00000001v00001AF4",
        "pci:v00008086d000010D3sv00008086sd0000A01Fbc02sc00i00",
        "pci:v00008086d00002922sv00001AF4sd00001100bc01sc06i01",
        "pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i02",
        "fs-xfs",
        "crypto-xts(aes)",
        "md-level-1",
    ] {
        let (ok, out, err) = sh(&format!(
            "modprobe -d {} -S {} -R '{alias}'",
            f.root.display(),
            f.kver
        ));
        // modprobe -R prints a module once per matching pattern.
        let theirs: Vec<String> = out
            .lines()
            .map(lifeboat_contract::normalize_module_name)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let ours = db.resolve(alias);
        if !ok {
            assert!(
                ours.is_empty(),
                "modprobe -R {alias} failed ({err}) but we resolve it to {ours:?}"
            );
        } else {
            assert_eq!(ours, theirs, "alias {alias}");
        }
    }
}

#[test]
fn firmware_names_match_modinfo() {
    let db = db();
    for name in ["tg3", "r8169", "bnx2", "e100", "qla2xxx", "ahci"] {
        let Some(info) = db.modules.get(name) else {
            panic!("{name} not in the fixture")
        };
        let path = fixture().modules_dir().join(&info.path);
        let ours: Vec<String> = lifeboat::kmod::modinfo(&path)
            .unwrap()
            .into_iter()
            .filter(|(k, _)| k == "firmware")
            .map(|(_, v)| v)
            .collect();
        let (ok, out, err) = sh(&format!("modinfo -F firmware {}", path.display()));
        assert!(ok, "{err}");
        let theirs: Vec<String> = out.lines().map(|s| s.to_string()).collect();
        assert_eq!(ours, theirs, "firmware of {name}");
    }
}

#[test]
fn compressed_modules_are_decompressed_into_the_image() {
    // Make a copy of a few modules compressed with xz and zstd, run depmod
    // on it, and check the image stores them as plain .ko files that the
    // real modinfo reads.
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("kroot");
    let mdir = root.join("lib/modules").join(&f.kver);
    let db = db();
    let closure = db.closure(&["dm_crypt".to_string()].into());
    for (i, m) in closure.iter().enumerate() {
        let rel = &db.modules[m].path;
        let dst = mdir.join(rel);
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(f.modules_dir().join(rel), &dst).unwrap();
        let tool = if i % 2 == 0 {
            "xz --check=crc32"
        } else {
            "zstd -q --rm"
        };
        let (ok, _, err) = sh(&format!("{tool} {}", dst.display()));
        assert!(ok, "{err}");
    }
    for extra in [
        "modules.builtin",
        "modules.builtin.modinfo",
        "modules.order",
    ] {
        std::fs::copy(f.modules_dir().join(extra), mdir.join(extra)).unwrap();
    }
    let (ok, _, err) = sh(&format!("depmod -b {} {}", root.display(), f.kver));
    assert!(ok, "{err}");
    let img = work.path().join("img");
    build(
        work.path(),
        &img,
        "[rescue]\nmodules = \"none\"\nadd_modules = [\"dm_crypt\"]\n",
        &["--no-cache", "--modules-dir", mdir.to_str().unwrap()],
    );
    let r = work.path().join("r");
    unpack(&img, &r);
    let ko = r
        .join("lib/modules")
        .join(&f.kver)
        .join("kernel/drivers/md/dm-crypt.ko");
    assert!(ko.is_file(), "dm-crypt.ko not stored decompressed");
    let (ok, out, err) = sh(&format!("modinfo -F name {}", ko.display()));
    assert!(ok && out.trim() == "dm_crypt", "{out}{err}");
    // And the image's own indexes resolve its dependencies.
    let (ok, out, err) = sh(&format!(
        "modprobe -d {} -S {} --show-depends dm_crypt",
        r.display(),
        f.kver
    ));
    assert!(ok, "{err}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("insmod")).count(),
        closure.len(),
        "{out}"
    );
}

#[test]
fn hostonly_covers_this_machines_devices() {
    // The oracle: modprobe -R on every modalias under /sys, against the fixture tree.
    let f = fixture();
    let db = db();
    let aliases = lifeboat::kmod::host_modaliases(std::path::Path::new("/sys"));
    assert!(
        !aliases.is_empty(),
        "this machine exposes no modaliases under /sys"
    );
    let mut expected = BTreeSet::new();
    for a in &aliases {
        let (ok, out, _) = sh(&format!(
            "modprobe -d {} -S {} -R '{a}'",
            f.root.display(),
            f.kver
        ));
        if ok {
            for m in out.lines() {
                let m = lifeboat_contract::normalize_module_name(m);
                if db.modules.contains_key(&m) {
                    expected.insert(m);
                }
            }
        }
    }
    let mut cfg = lifeboat::config::Config::default();
    cfg.rescue.modules = "hostonly".into();
    let set = lifeboat::rescue::select_modules(&cfg, &db, &mut Vec::new()).unwrap();
    for m in &expected {
        assert!(
            set.contains(m),
            "hostonly set lacks {m}, which this machine's devices need"
        );
    }
    // And it is a real subset, not everything.
    let generic = lifeboat::rescue::select_modules(
        &lifeboat::config::Config::default(),
        &db,
        &mut Vec::new(),
    )
    .unwrap();
    assert!(
        set.len() < generic.len(),
        "hostonly ({}) is not smaller than generic ({})",
        set.len(),
        generic.len()
    );
}
