//! /etc/fstab and /etc/crypttab, read to cross-check the captured mount
//! tree and LUKS containers: what fstab mounts but is not mounted is not
//! in the backup; what is mounted but not in fstab will not come back by
//! itself after recovery.

use lifeboat_contract::{Layout, Luks};

/// One fstab line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub spec: String,
    pub target: String,
    pub fstype: String,
    pub options: String,
}

/// `\040` and friends, as fstab escapes spaces.
fn unescape(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t")
}

pub fn parse(text: &str) -> Vec<Entry> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3).then(|| Entry {
                spec: unescape(f[0]),
                target: unescape(f[1]),
                fstype: f[2].to_string(),
                options: f.get(3).unwrap_or(&"defaults").to_string(),
            })
        })
        .collect()
}

/// Warnings from comparing fstab with the captured layout.
pub fn cross_check(l: &Layout, fstab: &str) -> Vec<String> {
    let mut out = Vec::new();
    let entries = parse(fstab);
    let local = |t: &str| crate::backup::is_local_data_fs(t) || t == "auto";
    for e in &entries {
        let noauto = e.options.split(',').any(|o| o == "noauto");
        if e.fstype == "swap" {
            let known = l.filesystems.iter().any(|f| {
                f.fstype == "swap"
                    && (Some(e.spec.as_str())
                        == f.uuid.as_ref().map(|u| format!("UUID={u}")).as_deref()
                        || e.spec == f.device
                        || Some(e.spec.as_str())
                            == f.label.as_ref().map(|u| format!("LABEL={u}")).as_deref())
            });
            if !known {
                out.push(format!(
                    "fstab lists swap {} but no such swap was found on the captured disks",
                    e.spec
                ));
            }
            continue;
        }
        if !local(&e.fstype) || noauto {
            continue;
        }
        if !l.mounts.iter().any(|m| m.target == e.target) {
            out.push(format!(
                "fstab mounts {} ({} {}) but it is not mounted now: its files are not in the backup; mount it before mkbackup",
                e.target, e.fstype, e.spec
            ));
        }
    }
    for m in &l.mounts {
        if crate::backup::is_local_data_fs(&m.fstype)
            && m.root.is_none()
            && !entries.iter().any(|e| e.target == m.target)
        {
            out.push(format!(
                "{} ({} on {}) is mounted but not in fstab: it is backed up and recreated, but the recovered system will not mount it by itself",
                m.target, m.fstype, m.source
            ));
        }
    }
    out
}

/// Names and key files of LUKS containers from crypttab
/// (`name device keyfile options`; device as path, `UUID=` or `PARTUUID=`).
pub fn apply_crypttab(luks: &mut [Luks], text: &str) {
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 2 {
            continue;
        }
        let dev = f[1];
        let Some(c) = luks.iter_mut().find(|c| {
            dev == c.device
                || dev
                    .strip_prefix("UUID=")
                    .is_some_and(|u| u.eq_ignore_ascii_case(&c.uuid))
                || dev == format!("/dev/disk/by-uuid/{}", c.uuid)
        }) else {
            continue;
        };
        if c.name.is_none() {
            c.name = Some(f[0].to_string());
        }
        if let Some(k) = f.get(2).filter(|k| !matches!(**k, "none" | "-" | "")) {
            c.keyfile = Some(k.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lifeboat_contract::{Filesystem, Mount};

    fn fs(device: &str, fstype: &str, uuid: &str) -> Filesystem {
        Filesystem {
            uuid: Some(uuid.into()),
            ..Filesystem::new(device, fstype)
        }
    }

    fn mount(target: &str, source: &str) -> Mount {
        Mount {
            target: target.into(),
            source: source.into(),
            fstype: "ext4".into(),
            options: "rw".into(),
            root: None,
        }
    }

    #[test]
    fn fstab_and_mounts_are_cross_checked() {
        let l = Layout {
            disks: vec![],
            filesystems: vec![fs("/dev/sda1", "ext4", "r"), fs("/dev/sda2", "swap", "s")],
            mounts: vec![mount("/", "/dev/sda1"), mount("/scratch", "/dev/sdb1")],
            ..crate::layout::test_layout()
        };
        let fstab = "# comment\nUUID=r / ext4 errors=remount-ro 0 1\nUUID=s none swap sw 0 0\n\
                     /dev/sdc1 /data xfs defaults 0 2\n/dev/sdd1 /media/usb vfat noauto 0 0\n\
                     UUID=gone none swap sw 0 0\nserver:/x /net nfs defaults 0 0\n";
        let w = cross_check(&l, fstab);
        assert_eq!(w.len(), 3, "{w:#?}");
        assert!(w[0].starts_with("fstab mounts /data (xfs /dev/sdc1) but it is not mounted now"));
        assert!(w[1].contains("swap UUID=gone"));
        assert!(w[2].starts_with("/scratch (ext4 on /dev/sdb1) is mounted but not in fstab"));
    }

    #[test]
    fn crypttab_names_and_keyfiles() {
        let text = lifeboat_contract::Luks {
            device: "/dev/sda3".into(),
            name: None,
            keyfile: None,
            version: 2,
            uuid: "ABC-1".into(),
            label: None,
            cipher: "aes-xts-plain64".into(),
            key_bits: 512,
            hash: None,
            pbkdf: None,
            sector_size: None,
        };
        let mut v = vec![
            text.clone(),
            Luks {
                device: "/dev/sdb1".into(),
                uuid: "other".into(),
                ..text
            },
        ];
        apply_crypttab(&mut v, "# x\ncr_root UUID=abc-1 /etc/keys/root.key luks\ncr_data /dev/sdb1 none luks,discard\n");
        assert_eq!(v[0].name.as_deref(), Some("cr_root"));
        assert_eq!(v[0].keyfile.as_deref(), Some("/etc/keys/root.key"));
        assert_eq!(v[1].name.as_deref(), Some("cr_data"));
        assert_eq!(v[1].keyfile, None);
    }
}
