//! GRUB-bootable GPT disks, for BIOS and UEFI: the RAWDISK output and the
//! USB stick that `lifeboat format` prepares.
//!
//! Layout (512-byte sectors):
//!
//! | part | start  | size   | contents                                         |
//! |------|--------|--------|--------------------------------------------------|
//! | MBR  | 0      | 1      | GRUB's boot.img in front of the protective MBR   |
//! | p1   | 1 MiB  | 1 MiB  | BIOS boot partition: GRUB's i386-pc core image   |
//! | p2   | 2 MiB  | 64 MiB | EFI system partition, FAT32: EFI/BOOT/BOOTX64.EFI|
//! | p3   | 66 MiB | rest   | ext4 labelled `LIFEBOAT-000` (or the given label)|
//!
//! Both GRUB images carry a tiny configuration that finds the data
//! partition by its filesystem UUID and reads `/boot/grub/grub.cfg` there,
//! so the menu lives on the data partition and two sticks with the same
//! label never mix. Every step works on an image file or a whole device
//! through offsets (`mkfs.fat --offset`, `mke2fs -E offset`, mtools
//! `@@offset`): no partition device nodes and no mounts are needed.

use anyhow::{bail, Context, Result};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

pub const BIOS_BOOT_TYPE: &str = "21686148-6449-6E6F-744E-656564454649";
pub const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
pub const DATA_TYPE: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
/// Size of the EFI system partition.
pub const ESP_MIB: u64 = 64;
const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;
/// Where `lifeboat format` records what it made, on the data partition.
pub const MARKER: &str = "lifeboat-medium.json";

/// Start and length (in sectors) of the three partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub bios: (u64, u64),
    pub esp: (u64, u64),
    pub data: (u64, u64),
}

/// The smallest disk that holds `data_bytes` on the data partition.
pub fn disk_size_for(data_bytes: u64) -> u64 {
    // 2 MiB in front, the ESP, the data with 10 % + 16 MiB for ext4's own
    // metadata, 1 MiB for the backup GPT; whole MiB.
    let data = data_bytes + data_bytes / 10 + 16 * MIB;
    (2 * MIB + ESP_MIB * MIB + data + MIB).div_ceil(MIB) * MIB
}

fn run(c: &mut Command, what: &str) -> Result<String> {
    let out = c
        .output()
        .with_context(|| format!("cannot run {what} (is it installed?)"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Write the GPT: BIOS boot, ESP, data (named `label`).
pub fn partition(target: &Path, label: &str) -> Result<Geometry> {
    let script = format!(
        "label: gpt\n\
         start=2048, size=2048, type={BIOS_BOOT_TYPE}, name=\"BIOS boot\"\n\
         size={}, type={ESP_TYPE}, name=\"EFI system\"\n\
         type={DATA_TYPE}, name=\"{label}\"\n",
        ESP_MIB * MIB / SECTOR
    );
    let mut c = Command::new("sfdisk");
    c.args(["--quiet", "--wipe", "always", "--wipe-partitions", "always"])
        .arg(target)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c
        .spawn()
        .context("cannot run sfdisk (apt-get install fdisk)")?;
    child.stdin.take().unwrap().write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "sfdisk could not partition {}: {}",
            target.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    geometry(target)
}

/// Read the three partitions back (`sfdisk --json`), checking their types.
pub fn geometry(target: &Path) -> Result<Geometry> {
    let out = run(
        Command::new("sfdisk").arg("--json").arg(target),
        "sfdisk --json",
    )?;
    let v: serde_json::Value = serde_json::from_str(&out).context("sfdisk --json output")?;
    let parts = v["partitiontable"]["partitions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let want = [BIOS_BOOT_TYPE, ESP_TYPE, DATA_TYPE];
    if parts.len() != 3
        || parts
            .iter()
            .zip(want)
            .any(|(p, t)| !p["type"].as_str().unwrap_or("").eq_ignore_ascii_case(t))
    {
        bail!(
            "{} does not have the Lifeboat layout (BIOS boot, EFI system, data partition); run `lifeboat format` on it",
            target.display()
        );
    }
    let se = |i: usize| -> (u64, u64) {
        (
            parts[i]["start"].as_u64().unwrap_or(0),
            parts[i]["size"].as_u64().unwrap_or(0),
        )
    };
    Ok(Geometry {
        bios: se(0),
        esp: se(1),
        data: se(2),
    })
}

/// A fresh random UUID (version 4), for the data filesystem.
pub fn new_uuid() -> Result<String> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("cannot read /dev/urandom")?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// GRUB modules built into both images: nothing is loaded from disk later.
const MODULES: &[&str] = &[
    "part_gpt",
    "part_msdos",
    "ext2",
    "fat",
    "search",
    "search_fs_uuid",
    "search_label",
    "configfile",
    "normal",
    "linux",
    "echo",
    "test",
    "serial",
    "terminal",
    "all_video",
    "ls",
    "cat",
    "halt",
    "reboot",
];

/// GRUB's images for this disk: the i386-pc core image (for the BIOS boot
/// partition) and the x86_64-efi binary (for the ESP), both finding the
/// data filesystem `uuid`. Built in `work`.
pub fn grub_images(uuid: &str, work: &Path) -> Result<(Vec<u8>, PathBuf)> {
    let lib = Path::new("/usr/lib/grub");
    for (p, pkg) in [
        ("i386-pc", "grub-pc-bin"),
        ("x86_64-efi", "grub-efi-amd64-bin"),
    ] {
        if !lib.join(p).join("modinfo.sh").is_file() {
            bail!(
                "a disk that boots with BIOS and UEFI needs GRUB's {p} files in /usr/lib/grub/{p} (apt-get install {pkg})"
            );
        }
    }
    let early = work.join("early.cfg");
    std::fs::write(
        &early,
        format!("search --no-floppy --fs-uuid --set=root {uuid}\nset prefix=($root)/boot/grub\n"),
    )?;
    let core = work.join("core.img");
    let efi = work.join("BOOTX64.EFI");
    for (plat, out, extra) in [
        ("i386-pc", &core, Some("biosdisk")),
        ("x86_64-efi", &efi, None),
    ] {
        let mut c = Command::new("grub-mkimage");
        c.args(["-O", plat, "-d"])
            .arg(lib.join(plat))
            .arg("-o")
            .arg(out)
            .arg("-c")
            .arg(&early)
            .args(["-p", "/boot/grub"])
            .args(extra)
            .args(MODULES);
        run(&mut c, "grub-mkimage")?;
    }
    let core = std::fs::read(&core)?;
    Ok((core, efi))
}

/// Make the ESP (FAT32) and put `efi` there as the removable-media boot
/// loader.
pub fn make_esp(target: &Path, g: &Geometry, efi: &Path) -> Result<()> {
    run(
        Command::new("mkfs.fat")
            .args(["-F", "32", "-s", "1", "-n", "LIFEBOATEFI"])
            .arg(format!("--offset={}", g.esp.0))
            .arg(target)
            .arg((g.esp.1 * SECTOR / 1024).to_string()),
        "mkfs.fat (apt-get install dosfstools)",
    )?;
    let img = format!("{}@@{}", target.display(), g.esp.0 * SECTOR);
    run(
        Command::new("mmd").env("MTOOLS_SKIP_CHECK", "1").args([
            "-i",
            &img,
            "::/EFI",
            "::/EFI/BOOT",
        ]),
        "mmd (apt-get install mtools)",
    )?;
    run(
        Command::new("mcopy")
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["-i", &img])
            .arg(efi)
            .arg("::/EFI/BOOT/BOOTX64.EFI"),
        "mcopy (apt-get install mtools)",
    )?;
    Ok(())
}

/// Make the data filesystem (ext4, `label`, `uuid`), filled from `from`.
pub fn make_data(target: &Path, g: &Geometry, label: &str, uuid: &str, from: &Path) -> Result<()> {
    run(
        Command::new("mke2fs")
            .args([
                "-q", "-F", "-t", "ext4", "-b", "4096", "-L", label, "-U", uuid,
            ])
            .arg("-E")
            .arg(format!("offset={}", g.data.0 * SECTOR))
            .arg("-d")
            .arg(from)
            .arg(target)
            .arg(format!("{}k", g.data.1 * SECTOR / 1024)),
        "mke2fs (apt-get install e2fsprogs)",
    )?;
    Ok(())
}

// Offsets in GRUB's boot.img and in the first sector of core.img (the
// documented i386-pc boot protocol of GRUB 2).
const KERNEL_SECTOR: usize = 0x5c;
const DRIVE_CHECK: usize = 0x66;
const PART_START: usize = 0x1b8;
const BLOCKLIST: usize = 0x200 - 12;
const CORE_SEGMENT: u16 = 0x820;

/// The MBR with GRUB's boot code and the core image's location, keeping
/// the disk signature and partition table of `mbr`.
pub fn boot_sector(boot_img: &[u8], mbr: &[u8], core_lba: u64) -> Result<Vec<u8>> {
    if boot_img.len() != 512 || mbr.len() != 512 {
        bail!("GRUB's boot.img and an MBR are 512 bytes");
    }
    let mut s = boot_img[..PART_START].to_vec();
    s.extend_from_slice(&mbr[PART_START..]);
    s[KERNEL_SECTOR..KERNEL_SECTOR + 8].copy_from_slice(&core_lba.to_le_bytes());
    // A hard disk: skip the check for BIOSes that pass a wrong boot drive.
    s[DRIVE_CHECK] = 0x90;
    s[DRIVE_CHECK + 1] = 0x90;
    Ok(s)
}

/// The core image with its first block list pointing at the rest of
/// itself, when it starts at `core_lba`.
pub fn place_core(core: &[u8], core_lba: u64) -> Result<Vec<u8>> {
    let sectors = core.len().div_ceil(512) as u64;
    if sectors < 2 {
        bail!("GRUB's core image is too small ({} bytes)", core.len());
    }
    let mut c = core.to_vec();
    c.resize(sectors as usize * 512, 0);
    c[BLOCKLIST..BLOCKLIST + 8].copy_from_slice(&(core_lba + 1).to_le_bytes());
    c[BLOCKLIST + 8..BLOCKLIST + 10].copy_from_slice(&((sectors - 1) as u16).to_le_bytes());
    c[BLOCKLIST + 10..BLOCKLIST + 12].copy_from_slice(&CORE_SEGMENT.to_le_bytes());
    Ok(c)
}

/// Put GRUB for BIOS on the disk: boot.img in the MBR, the core image in
/// the BIOS boot partition.
pub fn install_bios(target: &Path, g: &Geometry, core: &[u8]) -> Result<()> {
    if core.len() as u64 > g.bios.1 * SECTOR {
        bail!(
            "GRUB's core image ({} bytes) does not fit the BIOS boot partition ({} bytes)",
            core.len(),
            g.bios.1 * SECTOR
        );
    }
    let boot_img = std::fs::read("/usr/lib/grub/i386-pc/boot.img")
        .context("cannot read /usr/lib/grub/i386-pc/boot.img (apt-get install grub-pc-bin)")?;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(target)
        .with_context(|| format!("cannot open {}", target.display()))?;
    let mut mbr = vec![0u8; 512];
    f.read_exact(&mut mbr)?;
    let placed = place_core(core, g.bios.0)?;
    f.seek(SeekFrom::Start(g.bios.0 * SECTOR))?;
    f.write_all(&placed)?;
    f.seek(SeekFrom::Start(0))?;
    f.write_all(&boot_sector(&boot_img, &mbr, g.bios.0)?)?;
    f.sync_all()?;
    Ok(())
}

/// Make `target` (an image file of the final size, or a whole device) a
/// Lifeboat disk: partitions, GRUB for BIOS and UEFI, the data filesystem
/// filled from `data`. Returns the data filesystem's UUID.
pub fn make(target: &Path, label: &str, uuid: &str, data: &Path) -> Result<()> {
    if label.is_empty() || label.len() > 16 {
        bail!("the data partition's label {label:?} must have 1 to 16 characters (ext4)");
    }
    let work = tempfile::tempdir()?;
    let g = partition(target, label)?;
    let (core, efi) = grub_images(uuid, work.path())?;
    make_esp(target, &g, &efi)?;
    make_data(target, &g, label, uuid, data)?;
    install_bios(target, &g, &core)?;
    Ok(())
}

/// What `lifeboat format` writes on the data partition.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Medium {
    pub label: String,
    pub uuid: String,
    pub lifeboat_version: String,
}

/// The data partition of a freshly formatted stick: the marker and a
/// menu that says there is nothing to boot yet.
pub fn stage_empty(dir: &Path, label: &str, uuid: &str) -> Result<()> {
    std::fs::create_dir_all(dir.join("boot/grub"))?;
    std::fs::write(
        dir.join("boot/grub/grub.cfg"),
        "# Lifeboat USB stick\nserial --unit=0 --speed=115200\nterminal_input console serial\nterminal_output console serial\n\
         echo 'This Lifeboat stick has no rescue image yet: run lifeboat mkrescue with OUTPUT = \"USB\".'\n",
    )?;
    let m = Medium {
        label: label.into(),
        uuid: uuid.into(),
        lifeboat_version: env!("CARGO_PKG_VERSION").into(),
    };
    std::fs::write(dir.join(MARKER), serde_json::to_string_pretty(&m)? + "\n")?;
    Ok(())
}

/// `YYYYMMDD-HHMMSS` (UTC) of a Unix time: the name of a rescue image
/// directory on a stick.
pub fn utc_stamp(unix: u64) -> String {
    let days = (unix / 86400) as i64;
    let secs = unix % 86400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Hard-link (or copy) `names` from `from` into `to`.
pub fn link_files(from: &Path, to: &Path, names: &[&str]) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for n in names {
        let (s, d) = (from.join(n), to.join(n));
        if std::fs::hard_link(&s, &d).is_err() {
            std::fs::copy(&s, &d).with_context(|| format!("cannot copy {}", s.display()))?;
        }
    }
    Ok(())
}

/// fsync every file in `dir` and the directory itself.
pub fn sync_dir(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir)?.flatten() {
        std::fs::File::open(e.path())?.sync_all()?;
    }
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// `OUTPUT = "RAWDISK"`: a disk image booting the rescue image in `dir`
/// with BIOS and UEFI. With `qcow2` the raw image is converted by qemu-img.
/// Returns the written file.
pub fn write_rawdisk(
    dir: &Path,
    kernel: &str,
    initrd: &str,
    out: &Path,
    o: &crate::iso::IsoOptions,
    qcow2: bool,
) -> Result<PathBuf> {
    let stage = tempfile::Builder::new()
        .prefix(".rawdisk-stage-")
        .tempdir_in(dir)
        .with_context(|| format!("cannot make a staging directory in {}", dir.display()))?;
    let s = stage.path().join("tree");
    link_files(dir, &s.join("lifeboat"), &[kernel, initrd, "manifest.json"])?;
    std::fs::create_dir_all(s.join("boot/grub"))?;
    let menu = crate::iso::menu(
        o,
        "Lifeboat rescue disk",
        &[crate::iso::MenuImage {
            title: String::new(),
            kernel: format!("/lifeboat/{kernel}"),
            initrd: format!("/lifeboat/{initrd}"),
        }],
    )?;
    std::fs::write(s.join("boot/grub/grub.cfg"), menu)?;
    let bytes =
        std::fs::metadata(dir.join(kernel))?.len() + std::fs::metadata(dir.join(initrd))?.len();
    let raw = stage.path().join("disk.raw");
    std::fs::File::create(&raw)
        .and_then(|f| f.set_len(disk_size_for(bytes)))
        .with_context(|| format!("cannot create {}", raw.display()))?;
    make(&raw, "LIFEBOAT-DISK", &new_uuid()?, &s)?;
    let tmp = out.with_extension("part");
    if qcow2 {
        run(
            Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "qcow2"])
                .arg(&raw)
                .arg(&tmp),
            "qemu-img (apt-get install qemu-utils)",
        )?;
    } else {
        std::fs::rename(&raw, &tmp)?;
    }
    std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(out.to_path_buf())
}

/// A rescue image on a stick: `<images>/<host>/rescue/<stamp>/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StickImage {
    pub host: String,
    pub stamp: String,
    /// Path relative to the stick's root, with a leading `/`.
    pub path: String,
    pub kernel: String,
    pub initrd: String,
}

/// The rescue images on a stick mounted at `root`, images under `dir`,
/// newest first.
pub fn stick_images(root: &Path, dir: &str) -> Result<Vec<StickImage>> {
    let mut v = Vec::new();
    let base = root.join(dir);
    let Ok(hosts) = std::fs::read_dir(&base) else {
        return Ok(v);
    };
    for h in hosts.flatten() {
        let host = h.file_name().to_string_lossy().into_owned();
        let Ok(stamps) = std::fs::read_dir(h.path().join("rescue")) else {
            continue;
        };
        for s in stamps.flatten() {
            let stamp = s.file_name().to_string_lossy().into_owned();
            let Ok(text) = std::fs::read_to_string(s.path().join("manifest.json")) else {
                continue;
            };
            let Ok(m) = lifeboat_contract::Manifest::from_json(&text) else {
                continue;
            };
            let rel = Path::new("/")
                .join(dir)
                .join(&host)
                .join("rescue")
                .join(&stamp);
            v.push(StickImage {
                host: host.clone(),
                stamp,
                path: rel.display().to_string(),
                kernel: m.kernel,
                initrd: m.initrd,
            });
        }
    }
    v.sort_by(|a, b| b.stamp.cmp(&a.stamp).then(a.host.cmp(&b.host)));
    Ok(v)
}

/// Before a new image of `host` goes onto the stick at `root`: remove the
/// host's oldest images so that, with the new one, `retain` remain.
/// Returns the removed image directories.
pub fn prune_stick(root: &Path, dir: &str, host: &str, retain: usize) -> Result<Vec<PathBuf>> {
    let removed = to_prune(root, dir, host, retain)?;
    for p in &removed {
        std::fs::remove_dir_all(p)
            .with_context(|| format!("cannot remove the old rescue image {}", p.display()))?;
    }
    Ok(removed)
}

/// The images of `host` a new one would push out (`usb_retain`).
pub fn to_prune(root: &Path, dir: &str, host: &str, retain: usize) -> Result<Vec<PathBuf>> {
    Ok(stick_images(root, dir)?
        .into_iter()
        .filter(|i| i.host == host)
        .skip(retain.max(1) - 1)
        .map(|old| root.join(old.path.trim_start_matches('/')))
        .collect())
}

/// Write the stick's menu: the image of `host` at `stamp` first, every
/// other image in a submenu.
pub fn write_stick_menu(
    root: &Path,
    dir: &str,
    host: &str,
    stamp: &str,
    o: &crate::iso::IsoOptions,
) -> Result<()> {
    let mut all = stick_images(root, dir)?;
    if let Some(i) = all.iter().position(|i| i.host == host && i.stamp == stamp) {
        let cur = all.remove(i);
        all.insert(0, cur);
    }
    let images: Vec<crate::iso::MenuImage> = all
        .iter()
        .map(|i| crate::iso::MenuImage {
            title: format!("{} {}", i.host, i.stamp),
            kernel: format!("{}/{}", i.path, i.kernel),
            initrd: format!("{}/{}", i.path, i.initrd),
        })
        .collect();
    let menu = crate::iso::menu(o, "Lifeboat USB stick", &images)?;
    let cfg = root.join("boot/grub/grub.cfg");
    let tmp = cfg.with_extension("cfg.new");
    std::fs::create_dir_all(root.join("boot/grub"))?;
    std::fs::write(&tmp, menu)?;
    std::fs::rename(&tmp, &cfg).with_context(|| format!("cannot write {}", cfg.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_sector_keeps_the_partition_table_and_points_at_the_core() {
        let boot: Vec<u8> = (0..512).map(|i| (i % 251) as u8).collect();
        let mut mbr = vec![0u8; 512];
        mbr[0x1be] = 0xee;
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        let s = boot_sector(&boot, &mbr, 2048).unwrap();
        assert_eq!(&s[..KERNEL_SECTOR], &boot[..KERNEL_SECTOR]);
        assert_eq!(u64::from_le_bytes(s[0x5c..0x64].try_into().unwrap()), 2048);
        assert_eq!(&s[0x66..0x68], &[0x90, 0x90]);
        assert_eq!(&s[PART_START..], &mbr[PART_START..]);
        let core = vec![1u8; 512 * 3 + 7];
        let c = place_core(&core, 2048).unwrap();
        assert_eq!(c.len(), 512 * 4);
        assert_eq!(u64::from_le_bytes(c[500..508].try_into().unwrap()), 2049);
        assert_eq!(u16::from_le_bytes(c[508..510].try_into().unwrap()), 3);
        assert_eq!(u16::from_le_bytes(c[510..512].try_into().unwrap()), 0x820);
        assert!(place_core(&[0u8; 100], 2048).is_err());
    }

    #[test]
    fn stamps_are_utc_calendar_times() {
        assert_eq!(utc_stamp(0), "19700101-000000");
        assert_eq!(utc_stamp(951_782_400), "20000229-000000");
        assert_eq!(utc_stamp(1_795_000_000), "20261118-110640");
    }

    #[test]
    fn a_stick_keeps_the_newest_images_and_lists_them_all() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let add = |host: &str, stamp: &str| {
            let d = root.join("lifeboat").join(host).join("rescue").join(stamp);
            std::fs::create_dir_all(&d).unwrap();
            let m = format!(
                "{{\"schema_version\":{},\"lifeboat_version\":\"0\",\"kver\":\"6.1\",\"kernel\":\"vmlinuz\",\"kernel_sha256\":\"\",\"initrd\":\"initrd.img\",\"initrd_sha256\":\"\",\"source_date_epoch\":0,\"layers\":[]}}",
                lifeboat_contract::MANIFEST_SCHEMA_VERSION
            );
            std::fs::write(d.join("manifest.json"), m).unwrap();
        };
        for s in ["20261101-000000", "20261102-000000", "20261103-000000"] {
            add("a", s);
        }
        add("b", "20261105-000000");
        let o = crate::iso::IsoOptions {
            label: "X".into(),
            default: "manual".into(),
            console: "vga".into(),
            timeout: 5,
            cmdline: String::new(),
        };
        // Keeping 3 with a new one coming: the oldest of a goes.
        let removed = prune_stick(root, "lifeboat", "a", 3).unwrap();
        assert_eq!(
            removed,
            vec![root.join("lifeboat/a/rescue/20261101-000000")]
        );
        assert!(!removed[0].exists());
        add("a", "20261106-000000");
        write_stick_menu(root, "lifeboat", "a", "20261103-000000", &o).unwrap();
        let cfg = std::fs::read_to_string(root.join("boot/grub/grub.cfg")).unwrap();
        // The new image is at the top, the others in submenus.
        let first = cfg.find("menuentry").unwrap();
        assert!(
            cfg[first..].starts_with("menuentry 'Recover automatically - a 20261103-000000'"),
            "{cfg}"
        );
        assert!(
            cfg.contains("linux /lifeboat/a/rescue/20261103-000000/vmlinuz lifeboat.recover=auto")
        );
        assert!(cfg.contains("submenu 'b 20261105-000000'"), "{cfg}");
        assert!(cfg.contains("submenu 'a 20261102-000000'"), "{cfg}");
        assert!(!cfg.contains("20261101"), "{cfg}");
        assert!(cfg.contains("submenu 'a 20261106-000000'"), "{cfg}");
        assert_eq!(cfg.matches("menuentry").count(), 24);
    }

    #[test]
    fn uuids_are_version_4() {
        let u = new_uuid().unwrap();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert_ne!(u, new_uuid().unwrap());
    }

    /// A real image: sfdisk, blkid and GRUB's own files are the oracles.
    #[test]
    fn an_image_has_the_documented_layout() {
        let t = tempfile::tempdir().unwrap();
        let data = t.path().join("data");
        std::fs::create_dir_all(data.join("boot/grub")).unwrap();
        std::fs::write(data.join("boot/grub/grub.cfg"), "menuentry x {}\n").unwrap();
        let img = t.path().join("d.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(disk_size_for(8 * MIB))
            .unwrap();
        let uuid = new_uuid().unwrap();
        make(&img, "LIFEBOAT-000", &uuid, &data).unwrap();
        let g = geometry(&img).unwrap();
        assert_eq!(g.bios, (2048, 2048));
        assert_eq!(g.esp, (4096, ESP_MIB * MIB / SECTOR));
        let probe = |off: u64| {
            let o = Command::new("blkid")
                .args(["-p", "-o", "export", "-O", &(off * SECTOR).to_string()])
                .arg(&img)
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout).into_owned()
        };
        let d = probe(g.data.0);
        assert!(
            d.contains("LABEL=LIFEBOAT-000")
                && d.contains(&format!("UUID={uuid}"))
                && d.contains("TYPE=ext4"),
            "{d}"
        );
        let e = probe(g.esp.0);
        assert!(
            e.contains("TYPE=vfat") && e.contains("VERSION=FAT32"),
            "{e}"
        );
        let img_s = format!("{}@@{}", img.display(), g.esp.0 * SECTOR);
        let o = Command::new("mdir")
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["-i", &img_s, "-b", "::/EFI/BOOT"])
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("BOOTX64.EFI"),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        // The MBR carries GRUB's boot code pointing at sector 2048 and
        // still ends with the protective MBR.
        let raw = std::fs::read(&img).unwrap();
        let boot = std::fs::read("/usr/lib/grub/i386-pc/boot.img").unwrap();
        assert_eq!(&raw[..KERNEL_SECTOR], &boot[..KERNEL_SECTOR]);
        assert_eq!(
            u64::from_le_bytes(raw[0x5c..0x64].try_into().unwrap()),
            2048
        );
        assert_eq!(raw[0x1be + 4], 0xee, "protective MBR entry");
        assert_eq!(&raw[510..512], &[0x55, 0xaa]);
        // The core image is GRUB's diskboot.img first.
        let diskboot = std::fs::read("/usr/lib/grub/i386-pc/diskboot.img").unwrap();
        let core = &raw[2048 * 512..2049 * 512];
        assert_eq!(&core[..0x100], &diskboot[..0x100]);
    }
}
