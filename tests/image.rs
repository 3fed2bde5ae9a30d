//! Building a real rescue image from the fixture kernel and this machine's
//! programs, then checking it with the real tools: GNU cpio, unmkinitramfs,
//! chroot, modprobe, sha256sum.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// One default (zstd) image shared by the tests of this file.
fn image() -> &'static Path {
    static IMG: OnceLock<PathBuf> = OnceLock::new();
    IMG.get_or_init(|| {
        let work = tempfile::tempdir().unwrap().keep();
        let out = work.join("image");
        let cfg = format!(
            "[rescue]\ncache_dir = \"{}\"\n",
            work.join("cache").display()
        );
        build(&work, &out, &cfg, &[]);
        out
    })
}

/// Unpack the concatenated initrd.img with GNU cpio, one layer range at a
/// time (cpio stops at each archive's TRAILER!!!), in load order.
fn unpack_with_gnu_cpio(img: &Path, dest: &Path) {
    std::fs::create_dir_all(dest).unwrap();
    for (l, off, size) in layer_ranges(img) {
        let script = format!(
            "set -o pipefail; {} | (cd {} && cpio -idmu --no-absolute-filenames --quiet)",
            layer_stream(img, &l, off, size),
            dest.display()
        );
        let (ok, _, err) = sh(&script);
        assert!(ok, "GNU cpio failed on layer {}: {err}", l.name);
        assert!(
            err.trim().is_empty(),
            "GNU cpio warned on layer {}: {err}",
            l.name
        );
    }
}

#[test]
fn programs_run_in_a_chroot_of_the_unpacked_initrd() {
    let img = image();
    let root = tempfile::tempdir().unwrap();
    unpack_with_gnu_cpio(img, root.path());
    // (program, arguments, text expected in the output)
    let checks: &[(&str, &str, &str)] = &[
        ("bash", "--version", "GNU bash"),
        ("sh", "-c 'echo shell-ok'", "shell-ok"),
        ("ls", "--version", "coreutils"),
        ("cp", "--version", "coreutils"),
        ("tar", "--version", "GNU tar"),
        ("gzip", "--version", "gzip"),
        ("zstd", "--version", "Zstandard"),
        ("xz", "--version", "XZ Utils"),
        ("sfdisk", "--version", "util-linux"),
        ("fdisk", "--version", "util-linux"),
        ("sgdisk", "--version", "GPT fdisk"),
        ("parted", "--version", "parted"),
        ("blkid", "--version", "util-linux"),
        ("lsblk", "--version", "util-linux"),
        ("wipefs", "--version", "util-linux"),
        ("findmnt", "--version", "util-linux"),
        ("losetup", "--version", "util-linux"),
        ("mount", "--version", "util-linux"),
        ("mkfs.ext4", "-V", "mke2fs"),
        ("e2fsck", "-V", "e2fsck"),
        ("mkfs.xfs", "-V", "mkfs.xfs version"),
        ("xfs_repair", "-V", "xfs_repair version"),
        ("mkfs.btrfs", "--version", "btrfs-progs"),
        ("btrfs", "--version", "btrfs-progs"),
        ("mkfs.vfat", "--help", "mkfs.fat"),
        ("lvm", "version", "LVM version"),
        ("mdadm", "--version", "mdadm - v"),
        ("cryptsetup", "--version", "cryptsetup"),
        ("dmsetup", "--version", "Library version"),
        ("rsync", "--version", "rsync  version"),
        ("ssh", "-V", "OpenSSH"),
        ("sshd", "-V", "OpenSSH"),
        ("ip", "-V", "iproute2"),
        ("grub-install", "--version", "GRUB"),
        ("grub-probe", "--version", "GRUB"),
        ("efibootmgr", "--version", "version"),
        ("nano", "--version", "nano"),
        ("less", "--version", "less"),
        ("modprobe", "--version", "kmod"),
        ("udevadm", "--version", ""),
        ("sed", "--version", "GNU sed"),
        ("grep", "--version", "GNU grep"),
        ("find", "--version", "findutils"),
        ("chroot", "--version", "coreutils"),
        ("sha256sum", "--version", "coreutils"),
        ("mkswap", "--version", "util-linux"),
        ("lifeboat", "--version", "lifeboat"),
    ];
    assert!(checks.len() >= 30);
    let mut failures = Vec::new();
    for (prog, args, want) in checks {
        // PATH lookup happens inside the chroot: the program must be in the image.
        let script = format!(
            "env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin chroot {root} /bin/sh -c 'command -v {prog} >/dev/null || {{ echo {prog} not in image; exit 99; }}; {prog} {args}' 2>&1",
            root = root.path().display(),
            args = args.replace('\'', "'\\''")
        );
        let (ok, out, _) = sh(&script);
        if !ok || !out.contains(want) {
            failures.push(format!("{prog} {args}: ok={ok} output: {}", out.trim()));
        }
    }
    assert!(
        failures.is_empty(),
        "programs failing inside the image:\n{}",
        failures.join("\n")
    );
}

#[test]
fn gnu_cpio_lists_every_layer_without_warnings() {
    let img = image();
    for (l, off, size) in layer_ranges(img) {
        let script = format!(
            "set -o pipefail; {} | cpio -t",
            layer_stream(img, &l, off, size)
        );
        let (ok, out, err) = sh(&script);
        assert!(ok, "cpio -t failed on layer {}: {err}", l.name);
        // GNU cpio prints only the block count on stderr when all is well.
        let noise: Vec<&str> = err
            .lines()
            .filter(|x| !x.trim().ends_with(" blocks") && !x.trim().ends_with(" block"))
            .collect();
        assert!(
            noise.is_empty(),
            "cpio warnings on layer {}: {noise:?}",
            l.name
        );
        assert_eq!(
            out.lines().count() as u64,
            l.files,
            "layer {}: cpio lists a different number of entries",
            l.name
        );
    }
}

#[test]
fn layers_are_sorted_parents_first_and_root_owned() {
    let img = image();
    for (l, off, size) in layer_ranges(img) {
        let script = format!(
            "set -o pipefail; {} | cpio -tv --numeric-uid-gid 2>/dev/null",
            layer_stream(img, &l, off, size)
        );
        let (ok, out, _) = sh(&script);
        assert!(ok);
        let mut seen = std::collections::BTreeSet::new();
        let mut prev = String::new();
        for line in out.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(
                (f[2], f[3]),
                ("0", "0"),
                "layer {}: not root-owned: {line}",
                l.name
            );
            let name = if f[0].starts_with('l') {
                f[f.len() - 3]
            } else {
                f[f.len() - 1]
            };
            assert!(
                name > prev.as_str(),
                "layer {}: {name} not sorted after {prev}",
                l.name
            );
            if let Some((parent, _)) = name.rsplit_once('/') {
                assert!(
                    seen.contains(parent),
                    "layer {}: {name} comes before its parent",
                    l.name
                );
            }
            seen.insert(name.to_string());
            prev = name.to_string();
        }
    }
}

#[test]
fn the_rescue_root_has_init_devices_and_merged_usr() {
    let img = image();
    let out = run_ok(
        lifeboat(Path::new("/nonexistent"))
            .args(["image", "ls", "--json"])
            .arg(img),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let find = |p: &str| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|e| e["path"] == p)
            .cloned()
    };
    let init = find("init").expect("/init missing");
    assert_eq!(init["layer"], "base");
    assert!(init["mode"].as_str().unwrap().starts_with("-rwx"));
    assert_eq!(
        find("dev/console").expect("/dev/console missing")["mode"],
        "crw-------"
    );
    assert!(find("dev/null").is_some());
    // This host is merged-/usr: /bin is a symlink there, and so in the image.
    if std::fs::read_link("/bin").is_ok() {
        assert_eq!(
            find("bin").unwrap()["link"],
            std::fs::read_link("/bin")
                .unwrap()
                .to_string_lossy()
                .as_ref()
        );
    }
    assert!(find("etc/lifeboat/init.json").is_some());
    // Layers never put a real lib/ over the host's lib -> usr/lib symlink.
    let lib = if std::fs::read_link("/lib").is_ok() {
        "usr/lib"
    } else {
        "lib"
    };
    assert!(find(&format!("{lib}/lifeboat/modules.json")).is_some());
    for e in v.as_array().unwrap() {
        if e["path"] == "lib" {
            assert_eq!(
                e["mode"].as_str().unwrap().chars().next(),
                Some(if lib == "lib" { 'd' } else { 'l' }),
                "{e}"
            );
        }
    }
}

#[test]
fn init_binary_is_static() {
    // The init runs before any library exists: no PT_INTERP, no DT_NEEDED.
    let init = lifeboat_bin().parent().unwrap().join("lifeboat-init");
    let (ok, out, err) = sh(&format!("readelf -lW -d {}", init.display()));
    assert!(ok, "{err}");
    assert!(
        !out.contains("Requesting program interpreter"),
        "lifeboat-init has PT_INTERP:\n{out}"
    );
    assert!(
        !out.contains("(NEEDED)"),
        "lifeboat-init has DT_NEEDED:\n{out}"
    );
    assert!(
        out.contains("Program Headers"),
        "readelf printed nothing useful: {out}"
    );
}

#[test]
fn two_builds_from_the_same_inputs_are_identical() {
    let work = tempfile::tempdir().unwrap();
    let a = work.path().join("a");
    let b = work.path().join("b");
    // Separate caches and --no-cache: both are really built.
    build(work.path(), &a, "", &["--no-cache"]);
    build(work.path(), &b, "", &["--no-cache"]);
    let (ma, mb) = (manifest(&a), manifest(&b));
    assert_eq!(ma.layers.len(), mb.layers.len());
    for (la, lb) in ma.layers.iter().zip(&mb.layers) {
        assert_eq!(
            la.sha256, lb.sha256,
            "layer {} differs between builds",
            la.name
        );
        assert_eq!(sha256(&a.join(&la.file)), la.sha256);
        assert_eq!(sha256(&b.join(&lb.file)), lb.sha256);
    }
    assert_eq!(sha256(&a.join("initrd.img")), sha256(&b.join("initrd.img")));
}

#[test]
fn a_no_op_rebuild_reuses_every_layer() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("img");
    let cfg = format!(
        "[rescue]\ncache_dir = \"{}\"\n",
        work.path().join("cache").display()
    );
    let first = build(work.path(), &out, &cfg, &[]);
    assert!(!String::from_utf8_lossy(&first.stdout).contains("cached"));
    let before = manifest(&out);
    let second = build(work.path(), &out, &cfg, &[]);
    let text = String::from_utf8_lossy(&second.stdout);
    assert_eq!(
        text.matches("cached").count(),
        before.layers.len(),
        "{text}"
    );
    assert_eq!(manifest(&out), before);
    run_ok(lifeboat(work.path()).args(["image", "verify"]).arg(&out));
}

/// Every file's path, type+mode and link target under `d`.
fn listing(d: &Path) -> String {
    sh(&format!(
        "cd {} && find . -printf '%p %M %s %l\\n' | sort",
        d.display()
    ))
    .1
}

#[test]
fn unmkinitramfs_sees_the_same_tree_as_image_unpack() {
    // unmkinitramfs splits the uncompressed archives at their zero padding
    // (early, early2, ...) and unpacks each with GNU cpio. With uncompressed
    // layers it sees every layer; applied in order they must give our own
    // unpack's tree, byte for byte.
    let work = tempfile::tempdir().unwrap();
    let img = work.path().join("img");
    build(
        work.path(),
        &img,
        "[rescue]\ncompression = \"none\"\n",
        &["--no-cache"],
    );
    let theirs = work.path().join("theirs");
    let (ok, _, err) = sh(&format!(
        "unmkinitramfs {} {}",
        img.join("initrd.img").display(),
        theirs.display()
    ));
    if !ok {
        // unmkinitramfs always hands the part after the last uncompressed
        // archive to cpio; for an image without a compressed part that part
        // is empty and cpio complains. Archives written by GNU cpio itself
        // get the same treatment, which we check rather than assume.
        let d = work.path().join("gnu");
        let (_, _, gnu_err) = sh(&format!(
            "mkdir -p {d}/s/a && echo x > {d}/s/a/f && cd {d}/s && find . | cpio -o -H newc --quiet > ../one && cat ../one ../one > ../two && unmkinitramfs ../two ../x",
            d = d.display()
        ));
        assert_eq!(
            err.trim(),
            gnu_err.trim(),
            "unmkinitramfs complained about our image differently than about GNU cpio's"
        );
    }
    let merged = work.path().join("merged");
    std::fs::create_dir(&merged).unwrap();
    let n = manifest(&img).layers.len();
    for i in 1..=n {
        let sub = if i == 1 {
            "early".to_string()
        } else {
            format!("early{i}")
        };
        let (ok, _, err) = sh(&format!(
            "cp -a {}/. {}/",
            theirs.join(&sub).display(),
            merged.display()
        ));
        assert!(ok, "unmkinitramfs did not produce {sub}: {err}");
    }
    assert!(
        !theirs.join(format!("early{}", n + 1)).exists(),
        "unmkinitramfs found more archives than layers"
    );
    let ours = work.path().join("ours");
    unpack(&img, &ours);
    // diff compares contents; device nodes (which diff cannot compare) are
    // covered by the listing of types, modes and sizes below.
    let (ok, out, err) = sh(&format!(
        "diff -r --no-dereference -x console -x null {} {}",
        merged.display(),
        ours.display()
    ));
    assert!(ok, "trees differ:\n{out}{err}");
    assert_eq!(listing(&merged), listing(&ours));
}

#[test]
fn unmkinitramfs_reads_the_default_compressed_format() {
    // Early microcode uncompressed, then zstd layers: unmkinitramfs puts the
    // early archive in early/ and the first compressed archive in main/.
    let work = tempfile::tempdir().unwrap();
    let fw = work.path().join("fw");
    std::fs::create_dir_all(fw.join("amd-ucode")).unwrap();
    std::fs::write(fw.join("amd-ucode/microcode_amd_fam17h.bin"), b"ucode").unwrap();
    let img = work.path().join("img");
    build(
        work.path(),
        &img,
        &format!("[rescue]\nfirmware_dir = \"{}\"\n", fw.display()),
        &["--no-cache"],
    );
    let theirs = work.path().join("theirs");
    let (ok, _, err) = sh(&format!(
        "unmkinitramfs {} {}",
        img.join("initrd.img").display(),
        theirs.display()
    ));
    assert!(ok, "unmkinitramfs failed: {err}");
    for (dir, layer) in [("early", "microcode"), ("main", "base")] {
        let ours = work.path().join(format!("ours-{layer}"));
        run_ok(
            lifeboat(work.path())
                .args(["image", "unpack", "--layer", layer])
                .arg(&img)
                .arg(&ours),
        );
        assert_eq!(
            listing(&theirs.join(dir)),
            listing(&ours),
            "{dir} differs from layer {layer}"
        );
    }
}

#[test]
fn verify_names_a_tampered_layer() {
    let work = tempfile::tempdir().unwrap();
    let img = work.path().join("img");
    build(work.path(), &img, "", &["--no-cache"]);
    run_ok(lifeboat(work.path()).args(["image", "verify"]).arg(&img));
    let m = manifest(&img);
    let tools = m.layers.iter().find(|l| l.name == "tools").unwrap();
    let p = img.join(&tools.file);
    let mut data = std::fs::read(&p).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0x40;
    std::fs::write(&p, data).unwrap();
    let out = lifeboat(work.path())
        .args(["image", "verify"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("layer tools") && err.contains("modified"),
        "{err}"
    );
    assert!(!err.contains("layer base"), "{err}");
}

/// Every layer lists its files with their sha256 (etc/lifeboat/layers/NAME);
/// `image verify --unpacked` compares a tree unpacked by GNU cpio (as the
/// kernel would unpack it) with those lists and names a changed file.
#[test]
fn an_unpacked_rescue_system_is_checked_against_its_layers_file_lists() {
    let img = image();
    let root = tempfile::tempdir().unwrap();
    unpack_with_gnu_cpio(img, root.path());
    // The lists agree with sha256sum on the unpacked files.
    let tag = std::fs::read_to_string(root.path().join("etc/lifeboat/layers/tools")).unwrap();
    let mut lines = tag.lines();
    assert_eq!(lines.next(), Some("lifeboat-layer v1 tools"));
    let listed: Vec<(&str, &str)> = lines.map(|l| l.split_once(' ').unwrap()).collect();
    assert!(listed.len() > 100, "{} files listed", listed.len());
    let (_, bash) = listed
        .iter()
        .find(|(_, p)| p.ends_with("bin/bash"))
        .copied()
        .expect("bash is not in the tools list");
    let bash_sha = listed.iter().find(|(_, p)| *p == bash).unwrap().0;
    let (ok, out, _) = sh(&format!("sha256sum {}", root.path().join(bash).display()));
    assert!(ok && out.starts_with(bash_sha), "{out} vs {bash_sha}");
    let o = run_ok(
        lifeboat(root.path())
            .args(["image", "verify", "--unpacked", "--json"])
            .arg(root.path()),
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let m = manifest(img);
    let mut want: Vec<&str> = m
        .layers
        .iter()
        .map(|l| l.name.as_str())
        .filter(|n| *n != "microcode")
        .collect();
    want.sort();
    assert_eq!(v["layers"], serde_json::json!(want), "{v}");
    assert!(v["files"].as_u64().unwrap() as usize >= listed.len());
    // One flipped byte in bash.
    let p = root.path().join(bash);
    let mut data = std::fs::read(&p).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 1;
    std::fs::write(&p, data).unwrap();
    let o = lifeboat(root.path())
        .args(["image", "verify", "--unpacked"])
        .arg(root.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a changed bash passed");
    assert!(
        err.contains(&format!("/{bash} (layer tools) has sha256")),
        "{err}"
    );
}

#[test]
fn modprobe_works_inside_the_image() {
    // The image ships depmod's indexes for exactly its modules, so the real
    // modprobe resolves dependencies there.
    let img = image();
    let root = tempfile::tempdir().unwrap();
    unpack(img, &root.path().join("r"));
    let r = root.path().join("r");
    let kver = &fixture().kver;
    let (ok, out, err) = sh(&format!(
        "modprobe -d {} -S {kver} --show-depends dm_crypt",
        r.display()
    ));
    assert!(ok, "{err}");
    assert!(out.contains("dm-crypt.ko"), "{out}");
    // Paths point at files that are really there, uncompressed.
    for line in out.lines().filter(|l| l.starts_with("insmod ")) {
        let p = line.split_whitespace().nth(1).unwrap();
        assert!(
            Path::new(p).is_file(),
            "{p} listed by modprobe is not in the image"
        );
        assert!(p.ends_with(".ko"), "{p} is not uncompressed");
    }
}

#[test]
fn firmware_named_by_modules_is_included_and_missing_is_reported() {
    let work = tempfile::tempdir().unwrap();
    let fw = work.path().join("firmware");
    std::fs::create_dir_all(fw.join("tigon")).unwrap();
    std::fs::write(fw.join("tigon/tg3.bin"), b"tg3 firmware").unwrap();
    std::fs::create_dir_all(fw.join("rtl_nic")).unwrap();
    std::fs::write(fw.join("rtl_nic/rtl8168g-2.fw.xz"), b"compressed firmware").unwrap();
    std::fs::write(fw.join("unrelated.bin"), b"not named by any module").unwrap();
    let img = work.path().join("img");
    let cfg = format!(
        "[rescue]\nfirmware_dir = \"{}\"\nmicrocode = \"no\"\n",
        fw.display()
    );
    let out = build(work.path(), &img, &cfg, &["--no-cache"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tigon/tg3_tso.bin (tg3)"),
        "missing firmware not reported: {err}"
    );
    assert!(!err.contains("tigon/tg3.bin (tg3)"), "{err}");
    let ls = run_ok(
        lifeboat(work.path())
            .args(["image", "ls", "--layer", "firmware"])
            .arg(&img),
    );
    let text = String::from_utf8_lossy(&ls.stdout);
    assert!(text.contains("/lib/firmware/tigon/tg3.bin"), "{text}");
    assert!(
        text.contains("/lib/firmware/rtl_nic/rtl8168g-2.fw.xz"),
        "{text}"
    );
    assert!(!text.contains("unrelated.bin"), "{text}");
}

#[test]
fn microcode_goes_first_and_uncompressed() {
    let work = tempfile::tempdir().unwrap();
    let fw = work.path().join("firmware");
    std::fs::create_dir_all(fw.join("intel-ucode")).unwrap();
    std::fs::write(fw.join("intel-ucode/06-55-04"), b"AAAA").unwrap();
    std::fs::write(fw.join("intel-ucode/06-8e-09"), b"BBBB").unwrap();
    let img = work.path().join("img");
    let cfg = format!("[rescue]\nfirmware_dir = \"{}\"\n", fw.display());
    build(work.path(), &img, &cfg, &["--no-cache"]);
    let m = manifest(&img);
    assert_eq!(m.layers[0].name, "microcode");
    assert_eq!(
        m.layers[0].compression,
        lifeboat_contract::Compression::None
    );
    // The kernel looks for the early archive at the very start, uncompressed.
    let d = tempfile::tempdir().unwrap();
    let (ok, _, err) = sh(&format!(
        "cd {} && cpio -idm --quiet < {}",
        d.path().display(),
        img.join("initrd.img").display()
    ));
    assert!(ok, "{err}");
    assert_eq!(
        std::fs::read(d.path().join("kernel/x86/microcode/GenuineIntel.bin")).unwrap(),
        b"AAAABBBB"
    );
}

#[test]
fn overlays_become_their_own_layer_and_win() {
    let work = tempfile::tempdir().unwrap();
    let ov = work.path().join("site");
    std::fs::create_dir_all(ov.join("etc")).unwrap();
    std::fs::write(ov.join("etc/motd"), "site motd\n").unwrap();
    std::fs::create_dir_all(ov.join("usr/local/bin")).unwrap();
    std::fs::write(ov.join("usr/local/bin/hello"), "#!/bin/sh\necho hi\n").unwrap();
    let img = work.path().join("img");
    let cfg = format!(
        "[rescue]\noverlays = [\"{}\"]\nexclude = [\"/usr/share/terminfo/*\"]\n",
        ov.display()
    );
    build(work.path(), &img, &cfg, &["--no-cache"]);
    let m = manifest(&img);
    assert_eq!(m.layers.last().unwrap().name, "overlay-site");
    let r = work.path().join("r");
    unpack(&img, &r);
    assert_eq!(
        std::fs::read_to_string(r.join("etc/motd")).unwrap(),
        "site motd\n"
    );
    assert!(r.join("usr/local/bin/hello").is_file());
    assert!(
        !r.join("usr/share/terminfo/l/linux").exists(),
        "exclude pattern not applied"
    );
}

#[test]
fn every_compression_is_readable_by_its_real_tool() {
    let work = tempfile::tempdir().unwrap();
    for comp in ["xz", "gzip", "lz4"] {
        let img = work.path().join(comp);
        // A small image: no modules, so this stays quick.
        build(
            work.path(),
            &img,
            &format!("[rescue]\ncompression = \"{comp}\"\nmodules = \"none\"\n"),
            &["--no-cache"],
        );
        for (l, off, size) in layer_ranges(&img) {
            let (ok, out, err) = sh(&format!(
                "set -o pipefail; {} | cpio -t --quiet | wc -l",
                layer_stream(&img, &l, off, size)
            ));
            assert!(ok, "{comp} layer {}: {err}", l.name);
            assert_eq!(
                out.trim().parse::<u64>().unwrap(),
                l.files,
                "{comp} layer {}",
                l.name
            );
        }
        if comp == "xz" {
            // The kernel rejects xz's default CRC64: check the stream header says CRC32.
            let base = &manifest(&img).layers[0];
            let (_, out, _) = sh(&format!(
                "xz --robot --list {}",
                img.join(&base.file).display()
            ));
            assert!(out.contains("CRC32"), "{out}");
        }
    }
}

#[test]
fn module_index_matches_the_modules_layer() {
    let img = image();
    let work = tempfile::tempdir().unwrap();
    let r = work.path().join("r");
    unpack(img, &r);
    let idx = lifeboat_contract::ModuleIndex::from_json(
        &std::fs::read_to_string(r.join("lib/lifeboat/modules.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(idx.kver, fixture().kver);
    for (name, e) in &idx.modules {
        let p = r.join("lib/modules").join(&idx.kver).join(&e.path);
        assert!(
            p.is_file(),
            "index names {name} at {} which is not in the image",
            p.display()
        );
        for d in &e.deps {
            assert!(
                idx.modules.contains_key(d),
                "{name} depends on {d}, absent from the image"
            );
        }
    }
    // virtio block devices resolve to virtio_blk through the alias table.
    let hits: Vec<&String> = idx
        .aliases
        .iter()
        .filter(|(p, _)| lifeboat_contract::alias_matches(p, "virtio:d00000002v00001AF4"))
        .map(|(_, m)| m)
        .collect();
    assert_eq!(hits, vec!["virtio_blk"]);
}

#[test]
fn the_backup_key_never_enters_the_image() {
    // backup_key_file names the key; the image may carry the path, never
    // what is in the file.
    let work = tempfile::tempdir().unwrap();
    let secret = "AGE-SECRET-KEY-1LIFEBOATTESTSECRETNEVERINTHEIMAGE";
    let key = work.path().join("backup.key");
    std::fs::write(&key, format!("{secret}\n")).unwrap();
    let pass = work.path().join("pass.key");
    std::fs::write(&pass, "a passphrase nobody may see\n").unwrap();
    for (file, needle) in [(&key, secret), (&pass, "a passphrase nobody may see")] {
        let out = work.path().join("img");
        build(
            work.path(),
            &out,
            &format!("backup_key_file = \"{}\"\n", file.display()),
            &[],
        );
        let tree = work.path().join("tree");
        let _ = std::fs::remove_dir_all(&tree);
        unpack(&out, &tree);
        let cfg = std::fs::read_to_string(tree.join("etc/lifeboat/lifeboat.toml")).unwrap();
        assert!(
            cfg.contains(&file.display().to_string()),
            "the path is kept: {cfg}"
        );
        let mut scanned = 0;
        for e in walkdir::WalkDir::new(&tree).into_iter().flatten() {
            if e.file_type().is_file() {
                let data = std::fs::read(e.path()).unwrap();
                scanned += 1;
                assert!(
                    !data.windows(needle.len()).any(|w| w == needle.as_bytes()),
                    "{} holds the backup key",
                    e.path().display()
                );
            }
        }
        assert!(scanned > 500, "only {scanned} files scanned");
    }
}

#[test]
fn share_credentials_enter_the_image_only_when_configured() {
    // backup_credentials (cifs/http): by default only the path is kept;
    // with backup_credentials_in_image they are in the plan layer, 0600.
    let work = tempfile::tempdir().unwrap();
    let password = "share-password-never-by-default";
    let cred = work.path().join("cifs.cred");
    std::fs::write(&cred, format!("username=backup\npassword={password}\n")).unwrap();
    for in_image in [false, true] {
        let out = work.path().join(format!("img-{in_image}"));
        let o = build(
            work.path(),
            &out,
            &format!(
                "BACKUP_URL = \"cifs://10.0.2.2/backup\"\nbackup_credentials = \"{}\"\nbackup_credentials_in_image = {in_image}\n",
                cred.display()
            ),
            &[],
        );
        let stderr = String::from_utf8_lossy(&o.stderr);
        let tree = work.path().join(format!("tree-{in_image}"));
        unpack(&out, &tree);
        let holders: Vec<String> = walkdir::WalkDir::new(&tree)
            .into_iter()
            .flatten()
            .filter(|e| e.file_type().is_file())
            .filter(|e| {
                let d = std::fs::read(e.path()).unwrap();
                d.windows(password.len()).any(|w| w == password.as_bytes())
            })
            .map(|e| e.path().strip_prefix(&tree).unwrap().display().to_string())
            .collect();
        let rel = cred
            .display()
            .to_string()
            .trim_start_matches('/')
            .to_string();
        if !in_image {
            assert!(holders.is_empty(), "the password is in {holders:?}");
            assert!(
                stderr.contains("recover --credentials"),
                "a warning says how recovery gets them: {stderr}"
            );
            continue;
        }
        assert_eq!(holders, vec![rel.clone()]);
        // GNU cpio lists it in the plan layer, with mode 0600, and in no other.
        for layer in std::fs::read_dir(&out).unwrap().flatten() {
            let name = layer.file_name().to_string_lossy().to_string();
            if !name.ends_with(".cpio.zst") {
                continue;
            }
            let listing = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "zstd -dc {} | cpio -itv --quiet",
                    layer.path().display()
                ))
                .output()
                .unwrap();
            let listing = String::from_utf8_lossy(&listing.stdout);
            let line = listing.lines().find(|l| l.ends_with(&rel));
            if name.starts_with("plan") {
                let line = line.unwrap_or_else(|| panic!("not in the plan layer:\n{listing}"));
                assert!(line.starts_with("-rw-------"), "{line}");
            } else {
                assert!(line.is_none(), "{name} holds the credentials");
            }
        }
    }
}
