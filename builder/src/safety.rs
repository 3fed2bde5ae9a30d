//! Safety interlocks: which disks may be written, and the check made right
//! before the first write to each one.
//!
//! A disk is refused when anything uses it (a filesystem mounted from it or
//! from a device stacked on it, swap, an LVM/RAID/LUKS holder, or an open
//! that blocks the kernel's exclusive open), when it matches a
//! write-protected identity (`recover.protect`), or when it is a Lifeboat
//! medium (a hybrid ISO, a stick made by `lifeboat format`). The identity of
//! every mapped target (size, serial, WWN, partition-table id) is pinned when
//! the plan is made and compared again just before the disk is wiped.

use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Where the kernel's view of block devices is read from (the live system,
/// or a fake tree in tests).
pub struct Sys {
    pub sys_block: PathBuf,
    pub mountinfo: String,
    pub swaps: String,
}

impl Sys {
    pub fn live() -> Sys {
        Sys {
            sys_block: PathBuf::from("/sys/class/block"),
            mountinfo: std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default(),
            swaps: std::fs::read_to_string("/proc/swaps").unwrap_or_default(),
        }
    }

    fn read(&self, name: &str, what: &str) -> String {
        std::fs::read_to_string(self.sys_block.join(name).join(what))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    }

    fn list(&self, name: &str, dir: &str) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.sys_block.join(name).join(dir))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// `name` and its partitions (kernel names).
    pub fn with_partitions(&self, name: &str) -> Vec<String> {
        let mut v = vec![name.to_string()];
        for e in self.list(name, "") {
            if e.starts_with(name)
                && self
                    .sys_block
                    .join(name)
                    .join(&e)
                    .join("partition")
                    .exists()
            {
                v.push(e);
            }
        }
        v
    }

    /// Everything stacked on `names`, recursively (dm, md devices).
    pub fn stacked(&self, names: &[String]) -> Vec<String> {
        let mut seen: BTreeSet<String> = BTreeSet::new();
        let mut todo: Vec<String> = names.to_vec();
        while let Some(n) = todo.pop() {
            for h in self.list(&n, "holders") {
                if seen.insert(h.clone()) {
                    todo.push(h);
                }
            }
        }
        seen.into_iter().collect()
    }

    /// The whole disks under `name` (a partition, dm or md device),
    /// following slaves down.
    pub fn disks_under(&self, name: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut todo = vec![name.to_string()];
        let mut seen = BTreeSet::new();
        while let Some(n) = todo.pop() {
            if !seen.insert(n.clone()) {
                continue;
            }
            let slaves = self.list(&n, "slaves");
            if !slaves.is_empty() {
                todo.extend(slaves);
                continue;
            }
            let link = std::fs::canonicalize(self.sys_block.join(&n)).ok();
            match link {
                Some(p) if p.join("partition").exists() => {
                    if let Some(d) = p.parent().and_then(|d| d.file_name()) {
                        out.insert(d.to_string_lossy().into_owned());
                    }
                }
                _ => {
                    out.insert(n);
                }
            }
        }
        out
    }
}

/// Why `disk` (a whole disk's kernel name) must not be written now, if it
/// must not: something mounted on it or on a device stacked on it, swap,
/// holders (LVM, RAID, open LUKS).
pub fn busy(sys: &Sys, disk: &str) -> Option<String> {
    let own = sys.with_partitions(disk);
    let stacked = sys.stacked(&own);
    let all: Vec<&String> = own.iter().chain(stacked.iter()).collect();
    let devno: Vec<(String, &String)> = all.iter().map(|n| (sys.read(n, "dev"), *n)).collect();
    for line in sys.mountinfo.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let (Some(num), Some(target)) = (f.get(2), f.get(4)) else {
            continue;
        };
        let source = line
            .split(" - ")
            .nth(1)
            .and_then(|r| r.split(' ').nth(1))
            .unwrap_or("");
        let src = source.trim_start_matches("/dev/");
        for (d, n) in &devno {
            if (!d.is_empty() && d == num) || (!src.is_empty() && src == n.as_str()) {
                let target = target.replace("\\040", " ");
                return Some(format!(
                    "/dev/{n} (on /dev/{disk}) is mounted on {target}: unmount it first (umount {target})"
                ));
            }
        }
    }
    for l in sys.swaps.lines().skip(1) {
        let s = l.split_whitespace().next().unwrap_or("");
        let n = s.rsplit('/').next().unwrap_or("");
        if all.iter().any(|a| a.as_str() == n) {
            return Some(format!(
                "/dev/{n} (on /dev/{disk}) is in use as swap: swapoff {s} first"
            ));
        }
    }
    if !stacked.is_empty() {
        let what: Vec<String> = stacked
            .iter()
            .map(|h| {
                let dm = sys.read(h, "dm/name");
                if dm.is_empty() {
                    h.clone()
                } else {
                    format!("{h} ({dm})")
                }
            })
            .collect();
        return Some(format!(
            "/dev/{disk} is held by {}: an active LVM volume group, RAID array or open LUKS container. \
             Stop it first (vgchange -an VG, mdadm --stop /dev/mdN, cryptsetup close NAME)",
            what.join(", ")
        ));
    }
    None
}

/// The kernel's own check: an exclusive open of the whole disk fails while
/// a partition is mounted or claimed, or a program holds it exclusively.
pub fn exclusive_open_fails(dev: &Path) -> Option<String> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(dev)
    {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Some(format!(
            "{} is busy (held open exclusively by the kernel or a program)",
            dev.display()
        )),
        _ => None,
    }
}

/// What identifies a disk, read from the disk and sysfs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Identity {
    pub name: String,
    pub size_bytes: u64,
    pub serial: Option<String>,
    pub wwn: Option<String>,
    /// GPT disk GUID or MBR disk identifier (8 hex digits), lower case.
    pub ptuuid: Option<String>,
    /// Filesystem and partition identities on the disk, as `KIND=value`
    /// (UUID, PARTUUID, LABEL, PARTLABEL, TYPE), from blkid.
    pub ids: Vec<String>,
}

impl Identity {
    /// The pinned part (what must not change between the check and the
    /// first write): size, serial, WWN, partition-table id.
    pub fn differs(&self, now: &Identity) -> Option<String> {
        let show = |o: &Option<String>| o.clone().unwrap_or_else(|| "none".into());
        if self.size_bytes != now.size_bytes {
            return Some(format!(
                "its size changed from {} to {} bytes",
                self.size_bytes, now.size_bytes
            ));
        }
        if self.serial != now.serial {
            return Some(format!(
                "its serial changed from {} to {}",
                show(&self.serial),
                show(&now.serial)
            ));
        }
        if self.wwn != now.wwn {
            return Some(format!(
                "its WWN changed from {} to {}",
                show(&self.wwn),
                show(&now.wwn)
            ));
        }
        if self.ptuuid != now.ptuuid {
            return Some(format!(
                "its partition table changed (id {} -> {})",
                show(&self.ptuuid),
                show(&now.ptuuid)
            ));
        }
        None
    }

    pub fn describe(&self) -> String {
        let mut v = vec![];
        if let Some(s) = &self.serial {
            v.push(format!("serial {s}"));
        }
        if let Some(w) = &self.wwn {
            v.push(format!("wwn {w}"));
        }
        match &self.ptuuid {
            Some(p) => v.push(format!("table {p}")),
            None => v.push("no partition table".into()),
        }
        v.join(", ")
    }
}

fn non_empty(s: String) -> Option<String> {
    let t = s.trim().to_string();
    (!t.is_empty()).then_some(t)
}

/// The partition-table id of the disk image or device at `dev`: the GPT
/// disk GUID (as blkid prints it) or the MBR disk signature (8 hex digits).
pub fn read_ptuuid(dev: &Path, sector: u64) -> Result<Option<String>> {
    use std::io::Read;
    let mut f =
        std::fs::File::open(dev).with_context(|| format!("cannot read {}", dev.display()))?;
    let mut buf = vec![0u8; (sector as usize).max(512) * 2];
    let mut got = 0;
    while got < buf.len() {
        let n = f.read(&mut buf[got..])?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(ptuuid_of(&buf[..got], sector as usize))
}

/// [`read_ptuuid`] on the first two sectors.
pub fn ptuuid_of(b: &[u8], sector: usize) -> Option<String> {
    let s = sector.max(512);
    if b.len() >= s + 72 && &b[s..s + 8] == b"EFI PART" {
        let g = &b[s + 56..s + 72];
        return Some(format!(
            "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
            g[3], g[2], g[1], g[0], g[5], g[4], g[7], g[6], g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15]
        ));
    }
    if b.len() >= 512 && b[510] == 0x55 && b[511] == 0xaa {
        let id = u32::from_le_bytes([b[440], b[441], b[442], b[443]]);
        // A protective MBR without GPT header, or an unset signature: no id.
        if id != 0 {
            return Some(format!("{id:08x}"));
        }
    }
    None
}

/// Read the identity of whole disk `name` now.
pub fn identity(sys: &Sys, name: &str) -> Identity {
    let size = sys.read(name, "size").parse::<u64>().unwrap_or(0) * 512;
    let serial =
        non_empty(sys.read(name, "device/serial")).or_else(|| non_empty(sys.read(name, "serial")));
    let wwn = non_empty(sys.read(name, "wwid"))
        .or_else(|| non_empty(sys.read(name, "device/wwid")))
        .or_else(|| non_empty(sys.read(name, "wwn")));
    let sector = sys
        .read(name, "queue/logical_block_size")
        .parse::<u64>()
        .unwrap_or(512);
    let dev = Path::new("/dev").join(name);
    let ptuuid = read_ptuuid(&dev, sector).ok().flatten();
    let mut ids = Vec::new();
    for n in sys.with_partitions(name) {
        ids.extend(blkid_ids(&Path::new("/dev").join(&n)));
    }
    Identity {
        name: name.to_string(),
        size_bytes: size,
        serial,
        wwn,
        ptuuid,
        ids,
    }
}

/// `KIND=value` lines blkid finds on `dev` (nothing when blkid is missing
/// or finds nothing).
fn blkid_ids(dev: &Path) -> Vec<String> {
    let Ok(out) = std::process::Command::new("blkid")
        .args(["-p", "-o", "export"])
        .arg(dev)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
    else {
        return vec![];
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            [
                "UUID=",
                "PARTUUID=",
                "LABEL=",
                "PARTLABEL=",
                "TYPE=",
                "PTUUID=",
            ]
            .iter()
            .any(|k| l.starts_with(k))
        })
        .map(|l| l.to_string())
        .collect()
}

/// Kinds accepted in `recover.protect`.
pub const PROTECT_KINDS: &[&str] = &[
    "SERIAL",
    "WWN",
    "PTUUID",
    "UUID",
    "PARTUUID",
    "LABEL",
    "PARTLABEL",
];

/// Check one `recover.protect` entry (`KIND=value`).
pub fn check_rule(rule: &str) -> Result<()> {
    let Some((k, v)) = rule.split_once('=') else {
        bail!(
            "recover.protect entry {rule:?} is not KIND=value (KIND one of {})",
            PROTECT_KINDS.join(", ")
        );
    };
    if !PROTECT_KINDS.contains(&k.trim().to_ascii_uppercase().as_str()) || v.trim().is_empty() {
        bail!(
            "recover.protect entry {rule:?}: KIND must be one of {} and the value not empty",
            PROTECT_KINDS.join(", ")
        );
    }
    Ok(())
}

fn norm(v: &str) -> String {
    v.trim().trim_start_matches("0x").to_ascii_lowercase()
}

/// The first write-protection rule `id` matches: configured rules, then
/// the Lifeboat media (whole-disk ISO 9660, a `lifeboat format` stick, a
/// filesystem labelled like a configured usb:// medium).
pub fn protected(id: &Identity, rules: &[String], media_labels: &[String]) -> Option<String> {
    let has = |kind: &str, want: &str| -> bool {
        let want = norm(want);
        match kind {
            "SERIAL" => id.serial.as_deref().is_some_and(|s| norm(s) == want),
            "WWN" => id
                .wwn
                .as_deref()
                .is_some_and(|s| norm(s) == want || norm(s).ends_with(&want)),
            "PTUUID" => {
                id.ptuuid.as_deref().is_some_and(|s| norm(s) == want)
                    || id
                        .ids
                        .iter()
                        .any(|l| l.strip_prefix("PTUUID=").is_some_and(|s| norm(s) == want))
            }
            k => id.ids.iter().any(|l| {
                l.split_once('=')
                    .is_some_and(|(lk, lv)| lk == k && norm(lv) == want)
            }),
        }
    };
    for r in rules {
        if let Some((k, v)) = r.split_once('=') {
            if has(&k.trim().to_ascii_uppercase(), v) {
                return Some(format!(
                    "/dev/{} matches the write-protected identity {r} (recover.protect)",
                    id.name
                ));
            }
        }
    }
    // A hybrid ISO written to a whole disk (the rescue medium itself).
    if id.ptuuid.is_none() && id.ids.iter().any(|l| l == "TYPE=iso9660") {
        return Some(format!(
            "/dev/{} holds an ISO 9660 image (a boot medium, likely this rescue medium); it is never a target",
            id.name
        ));
    }
    let partlabels: Vec<&str> = id
        .ids
        .iter()
        .filter_map(|l| l.strip_prefix("PARTLABEL="))
        .collect();
    if partlabels.contains(&"BIOS boot")
        && partlabels.contains(&"EFI system")
        && id.ids.iter().any(|l| {
            l.strip_prefix("LABEL=")
                .is_some_and(|lab| partlabels.contains(&lab))
        })
    {
        return Some(format!(
            "/dev/{} is a Lifeboat medium (made by lifeboat format or as a USB/raw disk image); it is never a target",
            id.name
        ));
    }
    for lab in media_labels {
        if id.ids.iter().any(|l| l == &format!("LABEL={lab}")) {
            return Some(format!(
                "/dev/{} holds the filesystem labelled {lab}, the configured usb:// medium; it is never a target",
                id.name
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A /sys/class/block look-alike: links to device directories, as the
    /// kernel has them.
    fn fake() -> (tempfile::TempDir, Sys) {
        let t = tempfile::tempdir().unwrap();
        let b = t.path().join("class");
        let devs = t.path().join("devices");
        std::fs::create_dir_all(&b).unwrap();
        let mk = |p: &str, files: &[(&str, &str)]| {
            let d = devs.join(p);
            std::fs::create_dir_all(&d).unwrap();
            for (f, c) in files {
                std::fs::write(d.join(f), c).unwrap();
            }
            let name = p.rsplit('/').next().unwrap();
            let _ = std::os::unix::fs::symlink(&d, b.join(name));
        };
        // vda with vda1 and vda2; an LV (dm-0) on vda2; vdb alone.
        mk("vda", &[("dev", "254:0"), ("size", "2048")]);
        mk("vda/vda1", &[("dev", "254:1"), ("partition", "1")]);
        mk("vda/vda2", &[("dev", "254:2"), ("partition", "2")]);
        std::fs::create_dir_all(devs.join("vda/vda2/holders/dm-0")).unwrap();
        mk("dm-0", &[("dev", "253:0")]);
        mk("dm-0/dm", &[("name", "vg-root")]);
        std::fs::create_dir_all(devs.join("dm-0/slaves/vda2")).unwrap();
        mk("vdb", &[("dev", "254:16"), ("size", "4096")]);
        // Only top-level devices are links in the class directory.
        let _ = std::fs::remove_file(b.join("dm"));
        let sys = Sys {
            sys_block: b,
            mountinfo: String::new(),
            swaps: "Filename Type Size Used Priority\n".into(),
        };
        (t, sys)
    }

    #[test]
    fn holders_mounts_and_swap_through_stacked_devices() {
        let (_t, mut sys) = fake();
        assert_eq!(sys.with_partitions("vda"), vec!["vda", "vda1", "vda2"]);
        assert_eq!(sys.stacked(&sys.with_partitions("vda")), vec!["dm-0"]);
        assert!(busy(&sys, "vdb").is_none());
        let why = busy(&sys, "vda").unwrap();
        assert!(
            why.contains("dm-0 (vg-root)") && why.contains("vgchange -an"),
            "{why}"
        );
        // The LV mounted: named as a mount (more useful than the holder).
        sys.mountinfo = "30 1 253:0 / /mnt/x rw - ext4 /dev/mapper/vg-root rw\n".into();
        let why = busy(&sys, "vda").unwrap();
        assert!(
            why.contains("mounted on /mnt/x") && why.contains("umount /mnt/x"),
            "{why}"
        );
        // A partition as swap.
        sys.mountinfo.clear();
        sys.swaps.push_str("/dev/vda1 partition 1024 0 -2\n");
        let why = busy(&sys, "vda").unwrap();
        assert!(why.contains("swapoff /dev/vda1"), "{why}");
        // vdb mounted by device number.
        sys.mountinfo = "31 1 254:16 / /data rw - ext4 /dev/vdb rw\n".into();
        assert!(busy(&sys, "vdb").unwrap().contains("/data"));
    }

    #[test]
    fn disks_under_stacked_devices() {
        let (_t, sys) = fake();
        let want: BTreeSet<String> = ["vda".to_string()].into();
        assert_eq!(sys.disks_under("dm-0"), want);
        assert_eq!(sys.disks_under("vda2"), want);
        assert_eq!(sys.disks_under("vdb"), ["vdb".to_string()].into());
    }

    #[test]
    fn partition_table_ids_as_blkid_prints_them() {
        // GPT: disk GUID at LBA 1 offset 56, mixed endian.
        let mut b = vec![0u8; 1024];
        b[510] = 0x55;
        b[511] = 0xaa;
        b[512..520].copy_from_slice(b"EFI PART");
        let guid = [
            0x78, 0x56, 0x34, 0x12, 0xbc, 0x9a, 0xf0, 0xde, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab,
            0xcd, 0xef,
        ];
        b[568..584].copy_from_slice(&guid);
        assert_eq!(
            ptuuid_of(&b, 512).as_deref(),
            Some("12345678-9abc-def0-0123-456789abcdef")
        );
        // MBR signature.
        let mut m = vec![0u8; 1024];
        m[510] = 0x55;
        m[511] = 0xaa;
        m[440..444].copy_from_slice(&0x1234abcdu32.to_le_bytes());
        assert_eq!(ptuuid_of(&m, 512).as_deref(), Some("1234abcd"));
        assert_eq!(ptuuid_of(&[0u8; 1024], 512), None);
    }

    #[test]
    fn protection_rules_and_media() {
        let id = Identity {
            name: "sdb".into(),
            size_bytes: 1 << 30,
            serial: Some("ABC123".into()),
            wwn: Some("naa.5000c500a1b2c3d4".into()),
            ptuuid: Some("1234abcd".into()),
            ids: vec!["UUID=0f0e-11".into(), "LABEL=DATA".into()],
        };
        assert!(protected(&id, &[], &[]).is_none());
        for r in [
            "SERIAL=abc123",
            "wwn=5000C500A1B2C3D4",
            "PTUUID=0x1234ABCD",
            "UUID=0F0E-11",
            "LABEL=DATA",
        ] {
            let why = protected(&id, &[r.to_string()], &[]).unwrap_or_else(|| panic!("{r}"));
            assert!(why.contains("recover.protect"), "{why}");
        }
        assert!(protected(&id, &["SERIAL=other".into(), "LABEL=data2".into()], &[]).is_none());
        assert!(protected(&id, &[], &["DATA".into()])
            .unwrap()
            .contains("usb://"));
        let iso = Identity {
            ptuuid: None,
            ids: vec!["TYPE=iso9660".into(), "LABEL=LIFEBOAT".into()],
            ..id.clone()
        };
        assert!(protected(&iso, &[], &[]).unwrap().contains("ISO 9660"));
        let stick = Identity {
            ids: vec![
                "PARTLABEL=BIOS boot".into(),
                "PARTLABEL=EFI system".into(),
                "PARTLABEL=LIFEBOAT-000".into(),
                "LABEL=LIFEBOAT-000".into(),
            ],
            ..id.clone()
        };
        assert!(protected(&stick, &[], &[])
            .unwrap()
            .contains("Lifeboat medium"));
        assert!(check_rule("SERIAL=x").is_ok());
        assert!(check_rule("serial").is_err());
        assert!(check_rule("COLOR=red").is_err());
        assert!(check_rule("UUID=").is_err());
    }

    #[test]
    fn pinned_identity_changes_are_named() {
        let a = Identity {
            name: "vda".into(),
            size_bytes: 100,
            serial: Some("S1".into()),
            wwn: None,
            ptuuid: None,
            ids: vec![],
        };
        assert!(a.differs(&a.clone()).is_none());
        let b = Identity {
            serial: Some("S2".into()),
            ..a.clone()
        };
        assert!(a
            .differs(&b)
            .unwrap()
            .contains("serial changed from S1 to S2"));
        let c = Identity {
            ptuuid: Some("abcd0123".into()),
            ..a.clone()
        };
        assert!(a.differs(&c).unwrap().contains("partition table changed"));
        let d = Identity {
            size_bytes: 200,
            ..a.clone()
        };
        assert!(a.differs(&d).unwrap().contains("size changed"));
    }
}
