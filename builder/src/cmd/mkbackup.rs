//! `lifeboat mkbackup`: capture the layout, archive every local filesystem
//! to BACKUP_URL, and build the rescue image with both inside.

use super::mkrescue;
use crate::layout::disk_of;
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

/// How the internal tar method works, from the configuration.
fn tar_options(
    cfg: &crate::config::Config,
    excludes: Vec<String>,
) -> Result<crate::backup::Options> {
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
    Ok(crate::backup::Options {
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
    })
}

/// `BACKUP` = a recipe or `external`: run its backup command, record what
/// the rescue OS needs to find the backup again.
fn external_backup(
    r: &crate::recipe::Recipe,
    layout: &Layout,
    host: &str,
    excludes: &[String],
    url: Option<&str>,
    dir: Option<&Path>,
    location: Option<lifeboat_contract::BackupLocation>,
) -> Result<lifeboat_contract::BackupManifest> {
    let mounts: Vec<String> = crate::backup::mounts_to_back_up(layout)
        .iter()
        .map(|m| m.target.clone())
        .collect();
    let mut env = crate::recipe::environment(r, host, &mounts, excludes, dir, None);
    env.extend(crate::recipe::url_environment(url.unwrap_or(""), host)?);
    println!("backup with {}: {}", r.name, r.backup);
    crate::recipe::run("backup", &r.backup, &env)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let m = lifeboat_contract::BackupManifest {
        schema_version: lifeboat_contract::BACKUP_SCHEMA_VERSION,
        id: format!("{host}-{now}-{}", r.name),
        hostname: host.to_string(),
        method: r.name.clone(),
        url: url.unwrap_or_default().to_string(),
        dir: dir
            .map(|d| d.to_string_lossy().to_string())
            .unwrap_or_default(),
        location,
        sets: vec![],
    };
    if let Some(d) = dir {
        super::layout::write_atomic(
            &d.join(crate::backup::MANIFEST_FILE),
            &serde_json::to_vec_pretty(&m)?,
        )?;
    }
    Ok(m)
}

/// The device of the filesystem the rescue image will be written to
/// (--output-dir, or a file:// or usb:// OUTPUT_URL), when it is local.
fn output_device(a: &mkrescue::Args, cfg: &crate::config::Config) -> Option<String> {
    let dir = match &a.output_dir {
        Some(d) => Some(d.clone()),
        None => cfg
            .output_url
            .strip_prefix("file://")
            .map(std::path::PathBuf::from),
    };
    if let Some(d) = dir {
        // The filesystem it will be on: its nearest existing directory
        // (nothing is created here; a dry run must not write).
        let existing = d.ancestors().find(|p| p.is_dir())?;
        return crate::backup::locate(existing).ok().map(|l| l.device);
    }
    let (label, _) = crate::url::parse_usb(&cfg.output_url)?;
    let out = std::process::Command::new("blkid")
        .args(["-L", &label])
        .output()
        .ok()?;
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!dev.is_empty()).then_some(dev)
}

/// Leave the disk holding the backup out of the layout: it is not part of
/// the system to recover, and recovery must never write it.
/// Devices below the block device `name` (its partitions, and what is
/// stacked on them: md, dm/LVM, LUKS), `name` included, by sysfs.
fn block_tree(name: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![name.to_string()];
    while let Some(n) = todo.pop() {
        if !seen.insert(n.clone()) {
            continue;
        }
        let sys = Path::new("/sys/class/block").join(&n);
        for sub in ["holders", ""] {
            let Ok(rd) = std::fs::read_dir(sys.join(sub)) else {
                continue;
            };
            for e in rd.flatten() {
                let c = e.file_name().to_string_lossy().into_owned();
                // Partitions are subdirectories with a `partition` file.
                if sub == "holders" || e.path().join("partition").exists() {
                    todo.push(c);
                }
            }
        }
    }
    seen
}

/// Whether anything on disk `name` is mounted or used as swap (ReaR's
/// AUTOEXCLUDE_DISKS: a disk with nothing in use is not part of the system).
pub fn disk_in_use(name: &str) -> bool {
    let tree = block_tree(name);
    let devnos: BTreeSet<String> = tree
        .iter()
        .filter_map(|n| std::fs::read_to_string(format!("/sys/class/block/{n}/dev")).ok())
        .map(|s| s.trim().to_string())
        .collect();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mounted = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(2))
        .any(|d| devnos.contains(d));
    let swaps = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
    let swapped = swaps.lines().skip(1).any(|l| {
        let dev = l.split_whitespace().next().unwrap_or("");
        std::fs::canonicalize(dev)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .is_some_and(|n| tree.contains(&n))
    });
    mounted || swapped
}

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
    let host = crate::layout::hostname().unwrap_or_else(|| "localhost".into());
    let url = a.backup_url.clone().or(cfg.backup_url.clone());
    let c = crate::hooks::HookEnv {
        hostname: &host,
        backup_url: url.as_deref(),
        target: None,
        error: None,
    };
    if a.rescue.dry_run {
        if !cfg.hooks.pre_backup.is_empty() || !cfg.hooks.post_backup.is_empty() {
            println!("dry run: the pre_backup and post_backup hooks are not run");
        }
        return backup(g, a);
    }
    crate::hooks::around(
        crate::hooks::Hook::PreBackup,
        crate::hooks::Hook::PostBackup,
        &cfg.hooks,
        c,
        || backup(g, a),
    )
}

/// This system's layout as mkbackup records it: idle disks, the disk
/// holding the backup (`loc`) and the rescue medium's disk left out.
fn system_layout(
    g: &Global,
    a: &Args,
    cfg: &crate::config::Config,
    loc: Option<&lifeboat_contract::BackupLocation>,
    url: Option<&str>,
) -> Result<lifeboat_contract::Layout> {
    let mut layout = crate::layout::capture(&[])?;
    // Disks with nothing mounted and no swap in use are not part of the
    // system (a spare, the stick that brought the tools): left out.
    if !cfg.layout_all_disks {
        let idle: Vec<String> = layout
            .disks
            .iter()
            .map(|d| d.name.clone())
            .filter(|n| !disk_in_use(n))
            .collect();
        for n in idle {
            if !g.quiet {
                println!("/dev/{n} has nothing mounted: left out of the layout (layout_all_disks = true keeps it)");
            }
            without_disk(&mut layout, &n);
        }
    }
    if let Some((loc, disk)) = loc.and_then(|l| disk_of(&l.device).map(|d| (l, d))) {
        let url = url.unwrap_or_default();
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
    // The disk the rescue image is written to is the rescue medium, not
    // part of the system to recreate (unless it is the root disk itself).
    if !a.no_rescue {
        if let Some(dev) = output_device(&a.rescue, cfg) {
            if let Some(disk) = disk_of(&dev) {
                let root_disk = layout
                    .mounts
                    .iter()
                    .find(|m| m.target == "/")
                    .and_then(|m| disk_of(&m.source));
                if root_disk.as_deref() != Some(disk.as_str())
                    && layout.disks.iter().any(|d| d.name == disk)
                {
                    if !g.quiet {
                        println!("the rescue image goes to {dev}: its disk {disk} is left out of the layout");
                    }
                    without_disk(&mut layout, &disk);
                }
            }
        }
    }
    Ok(layout)
}

fn backup(g: &Global, a: Args) -> Result<()> {
    if a.rescue.generic || a.rescue.chain.is_some() {
        anyhow::bail!("--generic/--chain build a medium for any machine with `lifeboat mkrescue`; mkbackup's image carries this machine's plan");
    }
    let mut cfg = g.load_config()?.config;
    let recipe = if crate::recipe::is_internal(&cfg.backup) {
        None
    } else {
        Some(crate::recipe::load(
            &cfg.backup,
            &cfg.external,
            &crate::config::config_dir().join("recipes"),
        )?)
    };
    let url = a.backup_url.clone().or(cfg.backup_url.clone());
    if url.is_none() && recipe.is_none() {
        bail!("BACKUP_URL is not set: add `BACKUP_URL = \"file:///path/to/backups\"` to /etc/lifeboat/lifeboat.toml or give --backup-url");
    }
    let host = crate::layout::hostname().unwrap_or_else(|| "localhost".into());
    let acc = crate::url::Access::from_config(&cfg);
    // http(s), sftp: the set is made in a staging directory, then uploaded.
    let remote = match url.as_deref() {
        Some(u) if recipe.is_none() => crate::backup::Store::remote(u, &acc, &host)?,
        _ => None,
    };
    // tape: the set is made in a staging directory, then written whole.
    let tape = url
        .clone()
        .filter(|u| u.starts_with("tape://") && recipe.is_none());
    if let Some(t) = &tape {
        crate::tape::path_of(t)?;
        crate::tape::check_overwrite(t)?;
        if !cfg.backup_type.eq_ignore_ascii_case("full") {
            bail!(
                "BACKUP_URL = {t:?}: a tape holds one full backup; set BACKUP_TYPE = \"full\" (it is {:?})",
                cfg.backup_type
            );
        }
    }
    // iso: the set is made in a staging directory and goes onto the ISO(s).
    let iso = url
        .clone()
        .filter(|u| u.starts_with("iso://") && recipe.is_none());
    if let Some(u) = &iso {
        let out = a.rescue.output.clone().unwrap_or(cfg.output.clone());
        if a.no_rescue || !out.eq_ignore_ascii_case("iso") {
            bail!(
                "BACKUP_URL = {u:?} puts the backup on the rescue ISO: set OUTPUT = \"ISO\" (it is {out:?}) and do not use --no-rescue"
            );
        }
        if !cfg.backup_type.eq_ignore_ascii_case("full") {
            bail!(
                "BACKUP_URL = {u:?}: an ISO holds one full backup; set BACKUP_TYPE = \"full\" (it is {:?})",
                cfg.backup_type
            );
        }
        crate::iso::check_tools()?;
        // Volumes small enough to spread over several ISOs.
        if let (Some(mb), None) = (cfg.iso_max_size, &cfg.backup_volume_size) {
            cfg.backup_volume_size = Some(format!("{}M", (mb / 4).max(1)));
        }
    }
    let obdr = a
        .rescue
        .output
        .clone()
        .unwrap_or(cfg.output.clone())
        .eq_ignore_ascii_case("obdr");
    if obdr {
        if tape.is_none() {
            bail!("OUTPUT = \"OBDR\" needs BACKUP_URL = \"tape:///dev/nstN\": the rescue ISO and the backup share the tape");
        }
        if a.no_rescue {
            bail!("OUTPUT = \"OBDR\" writes the rescue ISO and the backup together; --no-rescue would leave the tape without either");
        }
        crate::iso::check_tools()?;
    }
    // A backup tool may have its own kind of URL (rsync://…): nothing to
    // mount or locate for it.
    let own_url = |u: &str| {
        recipe.is_some()
            && !["file://", "usb://", "nfs://", "cifs://"]
                .iter()
                .any(|p| u.starts_with(p))
    };
    if a.rescue.dry_run {
        // Read-only from here: the layout as it is now, what a backup
        // would hold, then the rescue image's own dry run.
        // Where a local backup would go: its nearest existing directory.
        let loc = match url.as_deref() {
            Some(u) if remote.is_none() && tape.is_none() && iso.is_none() && !own_url(u) => {
                let l = crate::url::local_with(u, "BACKUP_URL", &acc)?;
                let p = l
                    .path
                    .ancestors()
                    .find(|p| p.exists())
                    .map(Path::to_path_buf);
                p.map(|p| crate::backup::locate(&p)).transpose()?
            }
            _ => None,
        };
        let layout = system_layout(g, &a, &cfg, loc.as_ref(), url.as_deref())?;
        let mounts: Vec<String> = crate::backup::mounts_to_back_up(&layout)
            .iter()
            .map(|m| m.target.clone())
            .collect();
        println!(
            "dry run: mkbackup would save the layout to /var/lib/lifeboat/layout.json and make a {} backup of {} \
             ({}) to {}",
            cfg.backup_type,
            mounts.join(", "),
            recipe.as_ref().map(|r| r.name.as_str()).unwrap_or("tar"),
            url.as_deref().unwrap_or("the backup tool's own location")
        );
        if a.no_rescue {
            println!("nothing was written");
            return Ok(());
        }
        return mkrescue::run_with(g, a.rescue, vec![]);
    }
    // Keeps a usb:// medium or a network share mounted until the end.
    // A backup tool may have its own kind of URL (rsync://…): it gets it as
    // LIFEBOAT_BACKUP_URL, and nothing is mounted.
    let medium = match (&remote, url.as_deref()) {
        (None, Some(u)) if !own_url(u) && tape.is_none() && iso.is_none() => {
            Some(crate::url::local_with(u, "BACKUP_URL", &acc)?)
        }
        _ => None,
    };
    let stage = (remote.is_some() || tape.is_some() || iso.is_some())
        .then(|| cfg.backup_stage_dir.join(&host));
    if let (Some(st), true) = (&stage, tape.is_some() || iso.is_some()) {
        if st.exists() {
            std::fs::remove_dir_all(st)
                .with_context(|| format!("cannot empty the staging directory {}", st.display()))?;
        }
    }
    if let (Some(r), Some(st)) = (&remote, &stage) {
        if st.exists() {
            std::fs::remove_dir_all(st)
                .with_context(|| format!("cannot empty the staging directory {}", st.display()))?;
        }
        crate::backup::prefetch(r, st, &host)?;
    }
    let dir = medium
        .as_ref()
        .map(|m| m.path.join(&host))
        .or(stage.clone());
    if let Some(d) = &dir {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let loc = match (&remote, &tape) {
        (None, None) if iso.is_none() => dir.as_deref().map(crate::backup::locate).transpose()?,
        _ => None,
    };
    let layout = system_layout(g, &a, &cfg, loc.as_ref(), url.as_deref())?;
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
    let quiet = g.quiet;
    let manifest = match (&recipe, &dir) {
        (Some(r), _) => external_backup(
            r,
            &layout,
            &host,
            &excludes,
            url.as_deref(),
            dir.as_deref(),
            loc,
        )?,
        (None, Some(dir)) => {
            let opts = tar_options(&cfg, excludes)?;
            let m = crate::backup::create(
                &layout,
                url.as_deref().unwrap_or_default(),
                dir,
                &opts,
                quiet,
                &mut |l| {
                    if !quiet {
                        println!("{l}");
                    }
                },
            )?;
            if let Some(r) = &remote {
                let up = crate::backup::upload(r, dir, &m, quiet);
                let _ = std::fs::remove_dir_all(dir);
                up?;
                if !g.quiet {
                    println!("backup {} uploaded to {}", m.id, r.show(""));
                }
            } else if tape.is_some() && obdr {
                // Written with the rescue ISO in front, after mkrescue.
                if !g.quiet {
                    println!(
                        "backup {} staged in {} for the OBDR tape",
                        m.id,
                        dir.display()
                    );
                }
            } else if let Some(t) = &tape {
                let w = crate::tape::write_set(t, dir, &m, quiet, None);
                let _ = std::fs::remove_dir_all(dir);
                w?;
                if !g.quiet {
                    println!("backup {} written to the tape {t}", m.id);
                }
            } else if iso.is_some() {
                if !g.quiet {
                    println!("backup {} staged in {} for the ISO", m.id, dir.display());
                }
            } else if !g.quiet {
                println!("backup {} written to {}", m.id, dir.display());
            }
            m
        }
        (None, None) => unreachable!("checked above"),
    };
    let mut manifest = manifest;
    if iso.is_some() {
        // Recovery finds the ISOs by their volume label.
        manifest.location = Some(lifeboat_contract::BackupLocation {
            mountpoint: String::new(),
            fstype: "iso9660".into(),
            uuid: None,
            label: Some(cfg.iso_volid.clone()),
            device: String::new(),
        });
        if let Some(d) = &dir {
            std::fs::write(
                d.join(crate::backup::MANIFEST_FILE),
                serde_json::to_vec_pretty(&manifest)?,
            )?;
        }
    }
    // For a later mkrescue: the layout and this manifest together.
    super::layout::write_atomic(
        Path::new(super::layout::DEFAULT_BACKUP),
        &serde_json::to_vec_pretty(&manifest)?,
    )?;
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
    let mut rescue = a.rescue;
    if let (true, Some(st)) = (obdr, &stage) {
        rescue.obdr_set = Some((st.clone(), manifest.clone()));
        let r = mkrescue::run_with(g, rescue, files);
        let _ = std::fs::remove_dir_all(st);
        return r;
    }
    if let (Some(u), Some(st)) = (&iso, &stage) {
        let on_iso = format!("{}/{host}", crate::iso::url_dir(u).unwrap_or_default());
        rescue.iso_backup = Some((st.clone(), on_iso));
        let r = mkrescue::run_with(g, rescue, files);
        let _ = std::fs::remove_dir_all(st);
        return r;
    }
    mkrescue::run_with(g, rescue, files)
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
        let fs = |d: &str| Filesystem::new(d, "ext4");
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
