//! Parsers for the storage tools' output: `mdadm --detail --export`,
//! `cryptsetup luksDump`, LVM JSON reports, `btrfs subvolume list -p`,
//! `btrfs subvolume get-default`, `xfs_info` and `tune2fs -l`.
//! Tested on outputs recorded from the real tools (tests/fixtures/layout/vm,
//! made by tests/fixtures/layout/record-vm.sh).

use anyhow::{bail, Context, Result};
use lifeboat_contract::{EfiEntry, Luks, Lv, MdArray, Pv, Subvolume, Vg};
use std::collections::BTreeMap;

fn kv_lines(text: &str, sep: char) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once(sep))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// `mdadm --detail --export /dev/mdX`.
pub fn mdadm_export(device: &str, text: &str) -> Result<MdArray> {
    let kv = kv_lines(text, '=');
    let get = |k: &str| {
        kv.get(k)
            .cloned()
            .with_context(|| format!("mdadm output for {device} lacks {k}"))
    };
    let mut roles: Vec<(u32, String)> = Vec::new();
    let mut spares = Vec::new();
    for (k, v) in &kv {
        if let Some(rest) = k
            .strip_prefix("MD_DEVICE_")
            .and_then(|r| r.strip_suffix("_ROLE"))
        {
            let dev = kv
                .get(&format!("MD_DEVICE_{rest}_DEV"))
                .cloned()
                .unwrap_or_else(|| format!("/{}", rest.replace('_', "/")));
            match v.parse::<u32>() {
                Ok(role) => roles.push((role, dev)),
                Err(_) => spares.push(dev),
            }
        }
    }
    roles.sort();
    Ok(MdArray {
        device: device.to_string(),
        level: get("MD_LEVEL")?,
        metadata: get("MD_METADATA")?,
        uuid: get("MD_UUID")?,
        name: kv.get("MD_NAME").cloned(),
        members: roles.into_iter().map(|(_, d)| d).collect(),
        spares,
    })
}

/// `cryptsetup luksDump DEVICE` (LUKS1 and LUKS2 layouts).
pub fn luks_dump(device: &str, text: &str) -> Result<Luks> {
    let mut version = None;
    let (mut uuid, mut label, mut cipher, mut key_bits, mut hash, mut pbkdf, mut sector) =
        (None, None, None, None, None, None, None);
    let (mut cipher_name, mut cipher_mode) = (None, None);
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        match k {
            "Version" => version = v.parse().ok(),
            "UUID" => uuid = Some(v.to_string()),
            "Label" if v != "(no label)" => label = Some(v.to_string()),
            // LUKS2: the data segment's cipher, and the first keyslot's key size.
            "cipher" if cipher.is_none() => cipher = Some(v.to_string()),
            "sector" if sector.is_none() => {
                sector = v.split_whitespace().next().and_then(|s| s.parse().ok())
            }
            "Cipher key" | "Key" if key_bits.is_none() => {
                key_bits = v.split_whitespace().next().and_then(|s| s.parse().ok())
            }
            "PBKDF" if pbkdf.is_none() => pbkdf = Some(v.to_string()),
            "Hash" if hash.is_none() => hash = Some(v.to_string()),
            // LUKS1.
            "Cipher name" => cipher_name = Some(v.to_string()),
            "Cipher mode" => cipher_mode = Some(v.to_string()),
            "Hash spec" => hash = Some(v.to_string()),
            "MK bits" => key_bits = v.parse().ok(),
            _ => {}
        }
    }
    if cipher.is_none() {
        if let (Some(n), Some(m)) = (cipher_name, cipher_mode) {
            cipher = Some(format!("{n}-{m}"));
            pbkdf.get_or_insert_with(|| "pbkdf2".into());
        }
    }
    let version = version.context("luksDump output has no Version")?;
    Ok(Luks {
        device: device.to_string(),
        name: None,
        keyfile: None,
        version,
        uuid: uuid.context("luksDump output has no UUID")?,
        label,
        cipher: cipher.context("luksDump output names no cipher")?,
        key_bits: key_bits.context("luksDump output gives no key size")?,
        hash,
        pbkdf,
        sector_size: sector,
    })
}

fn lvm_rows<'a>(v: &'a serde_json::Value, kind: &str) -> Result<Vec<&'a serde_json::Value>> {
    let rows = v["report"]
        .as_array()
        .context("LVM report JSON has no \"report\" array")?
        .iter()
        .filter_map(|r| r[kind].as_array())
        .flatten()
        .collect();
    Ok(rows)
}

fn bytes(v: &serde_json::Value, field: &str) -> Result<u64> {
    let s = v[field]
        .as_str()
        .with_context(|| format!("LVM report lacks {field}"))?;
    s.trim_end_matches('B')
        .parse()
        .with_context(|| format!("{field} = {s:?} is not a size in bytes (use --units b)"))
}

fn text(v: &serde_json::Value, field: &str) -> Result<String> {
    Ok(v[field]
        .as_str()
        .with_context(|| format!("LVM report lacks {field}"))?
        .to_string())
}

pub fn lvm_pvs(json: &str) -> Result<Vec<Pv>> {
    let v: serde_json::Value = serde_json::from_str(json).context("pvs printed invalid JSON")?;
    lvm_rows(&v, "pv")?
        .into_iter()
        .map(|r| {
            Ok(Pv {
                device: text(r, "pv_name")?,
                uuid: text(r, "pv_uuid")?,
                vg: text(r, "vg_name")?,
                size_bytes: bytes(r, "pv_size")?,
            })
        })
        .collect()
}

pub fn lvm_vgs(json: &str) -> Result<Vec<Vg>> {
    let v: serde_json::Value = serde_json::from_str(json).context("vgs printed invalid JSON")?;
    lvm_rows(&v, "vg")?
        .into_iter()
        .map(|r| {
            Ok(Vg {
                name: text(r, "vg_name")?,
                uuid: text(r, "vg_uuid")?,
                extent_bytes: bytes(r, "vg_extent_size")?,
                size_bytes: bytes(r, "vg_size")?,
                metadata: None,
            })
        })
        .collect()
}

pub fn lvm_lvs(json: &str) -> Result<Vec<Lv>> {
    let v: serde_json::Value = serde_json::from_str(json).context("lvs printed invalid JSON")?;
    lvm_rows(&v, "lv")?
        .into_iter()
        .map(|r| {
            let pool = text(r, "pool_lv")?;
            Ok(Lv {
                vg: text(r, "vg_name")?,
                name: text(r, "lv_name")?,
                uuid: text(r, "lv_uuid")?,
                size_bytes: bytes(r, "lv_size")?,
                segtype: text(r, "segtype")?,
                pool: (!pool.is_empty()).then_some(pool),
                stripes: text(r, "stripes")?.parse().unwrap_or(0),
            })
        })
        .collect()
}

/// `btrfs subvolume list -p MOUNTPOINT`.
pub fn btrfs_subvolumes(text: &str) -> Result<Vec<Subvolume>> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let w: Vec<&str> = line.split_whitespace().collect();
        let field = |name: &str| w.iter().position(|x| *x == name).and_then(|i| w.get(i + 1));
        let (Some(id), Some(parent)) = (field("ID"), field("parent")) else {
            bail!("unexpected btrfs subvolume list line {line:?}");
        };
        let path = line
            .split_once(" path ")
            .map(|(_, p)| p.to_string())
            .context("subvolume line without path")?;
        out.push(Subvolume {
            id: id.parse()?,
            parent: parent.parse()?,
            path,
        });
    }
    Ok(out)
}

/// `btrfs subvolume get-default MOUNTPOINT` → the default subvolume's ID.
pub fn btrfs_default(text: &str) -> Option<u64> {
    let w: Vec<&str> = text.split_whitespace().collect();
    w.iter()
        .position(|x| *x == "ID")
        .and_then(|i| w.get(i + 1))
        .and_then(|s| s.parse().ok())
}

/// `xfs_info`: the geometry parameters mkfs.xfs takes back.
pub fn xfs_info(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut section = String::new();
    for line in text.lines() {
        let (head, rest) = match line.split_once('=') {
            Some((h, r)) if !h.trim().is_empty() => (h.trim().to_string(), r),
            Some((_, r)) => (section.clone(), r),
            None => continue,
        };
        section = head.clone();
        // After the first '=' comes either a value (meta-data=/dev/x) or key=value pairs.
        for tok in rest
            .split(|c: char| c.is_whitespace() || c == ',')
            .filter(|t| t.contains('='))
        {
            if let Some((k, v)) = tok.split_once('=') {
                out.insert(format!("{head}.{k}"), v.to_string());
            }
        }
    }
    out
}

/// `tune2fs -l`: features and geometry mke2fs takes back.
pub fn tune2fs(text: &str) -> BTreeMap<String, String> {
    let kv = kv_lines(text, ':');
    let mut out = BTreeMap::new();
    for (from, to) in [
        ("Filesystem features", "features"),
        ("Block size", "block_size"),
        ("Inode size", "inode_size"),
        ("Reserved block count", "reserved_blocks"),
        ("Block count", "blocks"),
        ("Inode count", "inodes"),
        ("Default mount options", "default_mount_options"),
    ] {
        if let Some(v) = kv.get(from) {
            out.insert(to.to_string(), v.clone());
        }
    }
    out
}

/// `efibootmgr -v`: (boot entries, boot order).
pub fn efibootmgr(text: &str) -> (Vec<EfiEntry>, Vec<String>) {
    let mut entries = Vec::new();
    let mut order = Vec::new();
    for line in text.lines() {
        if let Some(o) = line.strip_prefix("BootOrder:") {
            order = o
                .trim()
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            continue;
        }
        let Some(rest) = line.strip_prefix("Boot") else {
            continue;
        };
        // Four hex digits (found by fuzzing: slicing by bytes panicked when
        // a multi-byte character straddled the fourth byte).
        let Some(num) = rest
            .get(..4)
            .filter(|n| rest.len() >= 5 && n.chars().all(|c| c.is_ascii_hexdigit()))
        else {
            continue;
        };
        let num = num.to_string();
        let active = rest[4..].starts_with('*');
        let body = rest[4..].trim_start_matches('*').trim_start();
        let (label, path) = match body.split_once('\t') {
            Some((l, p)) => (l.trim().to_string(), p.trim().to_string()),
            None => (body.trim().to_string(), String::new()),
        };
        entries.push(EfiEntry {
            num,
            label,
            active,
            path,
        });
    }
    (entries, order)
}

#[cfg(test)]
mod tests {
    /// Found by the tool_output fuzz target.
    #[test]
    fn efibootmgr_lines_with_multibyte_characters_are_skipped_not_a_panic() {
        let (e, _) = super::efibootmgr("Boot0(0\u{5f3}p\nBoot0001* debian\tHD(1)\n");
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].num, "0001");
    }

    use super::*;

    macro_rules! fixture {
        ($n:literal) => {
            include_str!(concat!("../../tests/fixtures/layout/vm/", $n))
        };
    }

    #[test]
    fn md_raid1() {
        let m = mdadm_export("/dev/md0", fixture!("mdadm-detail-export.txt")).unwrap();
        assert_eq!((m.level.as_str(), m.metadata.as_str()), ("raid1", "1.2"));
        assert_eq!(m.uuid, "830bc2d4:41cf2de9:8d11f80c:54269954");
        assert_eq!(m.name.as_deref(), Some("lbhost:lbraid"));
        assert_eq!(m.members, vec!["/dev/vda", "/dev/vdb"]);
        assert!(m.spares.is_empty());
        // The same UUID blkid reports for the members, in the other notation.
        assert!(fixture!("blkid.txt").contains("UUID=830bc2d4-41cf-2de9-8d11-f80c54269954"));
    }

    #[test]
    fn luks2() {
        let l = luks_dump("/dev/md0", fixture!("cryptsetup-luksdump.txt")).unwrap();
        assert_eq!(l.version, 2);
        assert_eq!(l.uuid, "f79f4ffa-096a-4c97-8cdc-6ddae2ce3879");
        assert_eq!(l.label.as_deref(), Some("lbcrypt"));
        assert_eq!((l.cipher.as_str(), l.key_bits), ("aes-xts-plain64", 512));
        assert_eq!(
            (l.pbkdf.as_deref(), l.hash.as_deref()),
            (Some("pbkdf2"), Some("sha256"))
        );
        assert_eq!(l.sector_size, Some(512));
    }

    #[test]
    fn luks1_layout() {
        // The LUKS1 form of luksDump (field names as cryptsetup 2.6 prints them).
        let t = "LUKS header information for /dev/sdb1\n\nVersion:       \t1\nCipher name:   \taes\nCipher mode:   \txts-plain64\nHash spec:     \tsha256\nPayload offset:\t4096\nMK bits:       \t512\nUUID:          \t0d1f0f6e-9a6b-4c55-8f4e-2a0c6b0e9d11\n";
        let l = luks_dump("/dev/sdb1", t).unwrap();
        assert_eq!(
            (l.version, l.cipher.as_str(), l.key_bits),
            (1, "aes-xts-plain64", 512)
        );
        assert_eq!(l.hash.as_deref(), Some("sha256"));
    }

    #[test]
    fn lvm_linear_and_thin() {
        let pvs = lvm_pvs(fixture!("lvm-pvs.json")).unwrap();
        assert_eq!(pvs[0].device, "/dev/mapper/cr");
        assert_eq!(pvs[0].vg, "vg0");
        let vgs = lvm_vgs(fixture!("lvm-vgs.json")).unwrap();
        assert_eq!(vgs[0].extent_bytes, 4 << 20);
        let lvs = lvm_lvs(fixture!("lvm-lvs.json")).unwrap();
        let by = |n: &str| lvs.iter().find(|l| l.name == n).unwrap();
        assert_eq!(
            (by("root").segtype.as_str(), by("root").size_bytes),
            ("linear", 320 << 20)
        );
        assert_eq!(by("pool").segtype, "thin-pool");
        assert_eq!(
            (by("thin1").segtype.as_str(), by("thin1").pool.as_deref()),
            ("thin", Some("pool"))
        );
        assert_eq!(by("thin1").size_bytes, 40 << 20);
        // The PV UUID is what blkid reports for the LVM2_member.
        assert!(fixture!("blkid.txt").contains(&format!("UUID={}", pvs[0].uuid)));
    }

    #[test]
    fn btrfs_subvolumes_and_default() {
        let s = btrfs_subvolumes(fixture!("btrfs-subvolume-list.txt")).unwrap();
        assert_eq!(
            s.iter().map(|v| v.path.as_str()).collect::<Vec<_>>(),
            vec!["@", "@home", "@home/snaps"]
        );
        assert_eq!(s[2].parent, 257);
        assert_eq!(btrfs_default(fixture!("btrfs-get-default.txt")), Some(256));
    }

    #[test]
    fn efi_boot_entries() {
        let (e, order) = efibootmgr(fixture!("efibootmgr-v.txt"));
        assert_eq!(order, vec!["0001", "0000"]);
        let deb = e.iter().find(|x| x.label == "debian").unwrap();
        assert_eq!(deb.num, "0001");
        assert!(deb.active);
        assert!(
            deb.path.starts_with("HD(1,GPT,")
                && deb.path.ends_with(r"/File(\EFI\debian\shimx64.efi)"),
            "{}",
            deb.path
        );
    }

    #[test]
    fn xfs_and_ext4_parameters() {
        let x = xfs_info(fixture!("xfs-info.txt"));
        assert_eq!(x["meta-data.isize"], "512");
        assert_eq!(x["meta-data.crc"], "1");
        assert_eq!(x["meta-data.reflink"], "1");
        assert_eq!(x["data.bsize"], "4096");
        assert_eq!(x["log.version"], "2");
        let e = tune2fs(fixture!("tune2fs-l.txt"));
        assert!(e["features"].contains("metadata_csum") && e["features"].contains("64bit"));
        assert_eq!(e["block_size"], "1024");
        assert_eq!(e["reserved_blocks"], "2048");
    }
}
