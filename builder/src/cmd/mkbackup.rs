//! `lifeboat mkbackup`: capture the layout, archive every local filesystem
//! to BACKUP_URL, and build the rescue image with both inside.

use super::mkrescue;
use crate::Global;
use anyhow::{bail, Context, Result};
use lifeboat_contract::{Layout, RESCUE_BACKUP_PATH, RESCUE_LAYOUT_PATH};
use std::collections::BTreeSet;
use std::path::Path;

#[derive(Debug, clap::Args)]
#[group(skip)]
pub struct Args {
    /// Where the archives go (overrides BACKUP_URL), `file:///path`.
    #[arg(long, value_name = "URL")]
    pub backup_url: Option<String>,
    /// Only write the backup; do not build the rescue image.
    #[arg(long)]
    pub no_rescue: bool,
    #[command(flatten)]
    pub rescue: mkrescue::Args,
}

/// The whole disk (kernel name) holding block device `dev`.
fn disk_of(dev: &str) -> Option<String> {
    let name = dev.trim_start_matches("/dev/");
    let real = std::fs::canonicalize(format!("/sys/class/block/{name}")).ok()?;
    let d = if real.join("partition").exists() {
        real.parent()?
    } else {
        real.as_path()
    };
    d.file_name().map(|f| f.to_string_lossy().to_string())
}

/// Leave the disk holding the backup out of the layout: it is not part of
/// the system to recover, and recovery must never write it.
pub fn without_disk(l: &mut Layout, disk: &str) {
    let Some(d) = l.disks.iter().find(|d| d.name == disk).cloned() else {
        return;
    };
    let mut gone: BTreeSet<String> = BTreeSet::from([d.path.clone()]);
    gone.extend(
        d.table
            .iter()
            .flat_map(|t| t.partitions.iter().map(|p| p.node.clone())),
    );
    l.disks.retain(|x| x.name != disk);
    l.filesystems.retain(|f| !gone.contains(&f.device));
    l.mounts.retain(|m| !gone.contains(&m.source));
    l.bootloader.grub_bios_disks.retain(|x| !gone.contains(x));
    l.bootloader
        .bios_boot_partitions
        .retain(|x| !gone.contains(x));
    l.bootloader.esps.retain(|x| !gone.contains(x));
}

pub fn run(g: &Global, a: Args) -> Result<()> {
    let cfg = g.load_config()?.config;
    if !matches!(cfg.backup.to_ascii_lowercase().as_str(), "tar" | "netfs") {
        bail!(
            "BACKUP = {:?} is not supported by this version; supported: tar (ReaR's NETFS is accepted as the same)",
            cfg.backup
        );
    }
    let Some(url) = a.backup_url.clone().or(cfg.backup_url.clone()) else {
        bail!("BACKUP_URL is not set: add `BACKUP_URL = \"file:///path/to/backups\"` to /etc/lifeboat/lifeboat.toml or give --backup-url");
    };
    let medium = crate::url::local(&url, "BACKUP_URL")?;
    let base = medium.path.clone();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    let dir = base.join(&host);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let loc = crate::backup::locate(&dir)?;
    let mut layout = crate::layout::capture(&[])?;
    if let Some(disk) = disk_of(&loc.device) {
        if layout
            .mounts
            .iter()
            .any(|m| m.target == "/" && disk_of(&m.source).as_deref() == Some(disk.as_str()))
        {
            bail!(
                "BACKUP_URL {url} lies on {}, the disk of the root filesystem: a backup must live on another disk \
                 (or, with later versions, another machine)",
                loc.device
            );
        }
        without_disk(&mut layout, &disk);
    }
    if let Ok(t) = std::fs::read_to_string("/etc/fstab") {
        for w in crate::fstab::cross_check(&layout, &t) {
            eprintln!("lifeboat: warning: {w}");
        }
    }
    let layout_json = serde_json::to_vec_pretty(&layout)?;
    let saved = Path::new(super::layout::DEFAULT_LAYOUT);
    super::layout::write_atomic(saved, &layout_json)?;
    if !g.quiet {
        println!("layout saved to {}", saved.display());
    }
    let mut excludes = cfg.backup_exclude.clone();
    if let Some(p) = cfg.output_url.strip_prefix("file://") {
        excludes.push(p.to_string());
    }
    if let Some(o) = &a.rescue.output_dir {
        excludes.push(std::path::absolute(o)?.to_string_lossy().to_string());
    }
    excludes.push("/var/cache/lifeboat".into());
    crate::backup::require_root(&layout)?;
    let compression = match lifeboat_contract::Compression::parse(&cfg.backup_compression) {
        Some(
            c @ (lifeboat_contract::Compression::Zstd
            | lifeboat_contract::Compression::Gzip
            | lifeboat_contract::Compression::Xz),
        ) => c,
        _ => bail!(
            "backup_compression = {:?} is not one of zstd, gzip, xz",
            cfg.backup_compression
        ),
    };
    let opts = crate::backup::Options {
        level: crate::backup::Level::parse(&cfg.backup_type)?,
        full_days: cfg.backup_full_days,
        compression,
        compression_level: cfg.backup_compression_level,
        volume_size: cfg
            .backup_volume_size
            .as_deref()
            .map(crate::backup::parse_size)
            .transpose()
            .context("backup_volume_size")?,
        excludes,
        key: cfg
            .backup_key_file
            .as_deref()
            .map(crate::backup::Key::from_file)
            .transpose()?
            .map(std::sync::Arc::new),
    };
    let quiet = g.quiet;
    let manifest = crate::backup::create(&layout, &url, &dir, &opts, quiet, &mut |l| {
        if !quiet {
            println!("{l}");
        }
    })?;
    if !g.quiet {
        println!("backup {} written to {}", manifest.id, dir.display());
    }
    if a.no_rescue {
        return Ok(());
    }
    let files = vec![
        (RESCUE_LAYOUT_PATH.to_string(), layout_json),
        (
            RESCUE_BACKUP_PATH.to_string(),
            serde_json::to_vec_pretty(&manifest)?,
        ),
    ];
    mkrescue::run_with(g, a.rescue, files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lifeboat_contract::{Filesystem, Mount, Partition, PartitionTable};

    #[test]
    fn the_backup_disk_is_left_out_of_the_layout() {
        let part = |n: u32, node: &str| Partition {
            number: n,
            node: node.into(),
            start: 2048,
            size: 2048,
            type_id: "83".into(),
            uuid: None,
            name: None,
            attrs: None,
            bootable: false,
        };
        let table = |node: &str| PartitionTable {
            kind: "dos".into(),
            id: "0x1".into(),
            first_lba: None,
            last_lba: None,
            sector_size: 512,
            partitions: vec![part(1, node)],
        };
        let fs = |d: &str| Filesystem {
            device: d.into(),
            fstype: "ext4".into(),
            uuid: None,
            label: None,
            used_bytes: None,
            params: Default::default(),
            subvolumes: vec![],
            default_subvolume: None,
        };
        let mount = |t: &str, s: &str| Mount {
            target: t.into(),
            source: s.into(),
            fstype: "ext4".into(),
            options: "rw".into(),
            root: None,
        };
        let mut l = Layout {
            disks: vec![
                crate::layout::test_disk("sda", 1 << 30, Some(table("/dev/sda1"))),
                crate::layout::test_disk("sdb", 1 << 30, Some(table("/dev/sdb1"))),
            ],
            filesystems: vec![fs("/dev/sda1"), fs("/dev/sdb1")],
            mounts: vec![mount("/", "/dev/sda1"), mount("/backup", "/dev/sdb1")],
            ..crate::layout::test_layout()
        };
        without_disk(&mut l, "sdb");
        assert_eq!(l.disks.len(), 1);
        assert_eq!(l.disks[0].name, "sda");
        assert_eq!(l.filesystems.len(), 1);
        assert_eq!(l.mounts, vec![mount("/", "/dev/sda1")]);
        // Not a disk of the layout: nothing changes.
        let before = l.clone();
        without_disk(&mut l, "sdz");
        assert_eq!(l, before);
    }
}
