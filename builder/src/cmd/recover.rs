//! `lifeboat recover`: recreate the disks, restore the backup and make the
//! system bootable (in the rescue OS).

use crate::migrate;
use crate::recover::{self, Options};
use crate::Global;
use anyhow::{Context, Result};
use lifeboat_contract::{BackupManifest, Layout, RESCUE_BACKUP_PATH, RESCUE_LAYOUT_PATH};
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The layout to recreate (default: the one in the rescue image).
    #[arg(long, value_name = "FILE")]
    pub layout: Option<PathBuf>,
    /// The backup manifest (default: the one in the rescue image).
    #[arg(long, value_name = "FILE")]
    pub backup: Option<PathBuf>,
    /// Unattended: never ask; anything unclear stops the recovery before a disk is written.
    #[arg(long)]
    pub auto: bool,
    /// Do not ask for confirmation.
    #[arg(long)]
    pub yes: bool,
    /// Print every command in order; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Disk mapping file (`/dev/SOURCE /dev/TARGET` lines).
    #[arg(long, value_name = "FILE")]
    pub map: Option<PathBuf>,
    /// Where the recovered system is mounted.
    #[arg(long, default_value = "/mnt/local")]
    pub root: PathBuf,
    /// Key file for new LUKS containers.
    #[arg(long, value_name = "FILE")]
    pub keyfile: Option<PathBuf>,
    /// On bigger disks: grow the `last` partition or all `proportional`ly.
    #[arg(long)]
    pub grow: Option<String>,
    /// Key of an encrypted backup (an age identity or a passphrase file).
    #[arg(long, value_name = "FILE")]
    pub backup_key: Option<PathBuf>,
    /// Credentials (`username=`/`password=` lines) for a cifs:// or
    /// http(s):// backup (default: backup_credentials when in the image).
    #[arg(long, value_name = "FILE")]
    pub credentials: Option<PathBuf>,
}

fn read(p: &Path, what: &str) -> Result<String> {
    std::fs::read_to_string(p).with_context(|| {
        format!(
            "cannot read the {what} {} (this rescue image was made by `mkrescue`, not `mkbackup`, or give --{what} FILE)",
            p.display()
        )
    })
}

pub fn run(g: &Global, a: Args) -> Result<()> {
    // A rescue image built with a signing key: its plan must match the
    // signature before anything of it is used.
    let root = Path::new("/");
    if root.join(lifeboat_contract::INIT_CONFIG_PATH).is_file() {
        if let Some(key) = crate::signing::image_key(root)? {
            crate::signing::check_unpacked(root, &key).context("nothing was written")?;
        }
        // The files the kernel (and fetch-layers) unpacked, against the
        // layers' own lists: a damaged medium or bad RAM shows here.
        let t = std::time::Instant::now();
        let c = crate::integrity::check_root(root)?;
        if c.files > 0 && !g.quiet {
            eprintln!(
                "lifeboat: rescue system checked: {} files match the lists of layers {} ({:.1} s)",
                c.files,
                c.layers.join(", "),
                t.elapsed().as_secs_f64()
            );
        }
    }
    let cfg = g.load_config()?.config;
    // In the rescue OS the plan is under /; a portable lifeboat has it
    // next to itself.
    let base = crate::portable::root();
    let lp = a.layout.unwrap_or_else(|| base.join(RESCUE_LAYOUT_PATH));
    let bp = a.backup.unwrap_or_else(|| base.join(RESCUE_BACKUP_PATH));
    let layout = Layout::from_json(&read(&lp, "layout")?)
        .with_context(|| format!("{} is not a valid layout.json", lp.display()))?;
    let backup = BackupManifest::from_json(&read(&bp, "backup")?)
        .with_context(|| format!("{} is not a valid backup.json", bp.display()))?;
    let mut mapping = Vec::new();
    let mut keep = vec![lp.clone(), bp.clone()];
    let default_map = base.join("etc/lifeboat/disk-mapping");
    let file = a
        .map
        .clone()
        .or(cfg.recover.mapping.clone())
        .or_else(|| default_map.is_file().then_some(default_map));
    if let Some(f) = file {
        let text = std::fs::read_to_string(&f)
            .with_context(|| format!("cannot read the disk mapping file {}", f.display()))?;
        mapping = migrate::parse_mapping(&text).with_context(|| f.display().to_string())?;
        keep.push(f);
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    for (s, d) in migrate::mapping_from_cmdline(&cmdline)? {
        mapping.retain(|(x, _)| *x != s);
        mapping.push((s, d));
    }
    let grow = migrate::Grow::parse(a.grow.as_deref().unwrap_or(&cfg.recover.grow))?;
    let recipe = if backup.method == "tar" {
        None
    } else {
        Some(crate::recipe::load(
            &backup.method,
            &cfg.external,
            &crate::config::config_dir().join("recipes"),
        )?)
    };
    recover::run(Options {
        layout,
        backup,
        root: a.root,
        dry_run: a.dry_run,
        auto: a.auto,
        yes: a.yes,
        mapping,
        identity_only: cfg.recover.auto_map == "identity",
        grow,
        keyfile: a
            .keyfile
            .or(cfg.recover.keyfile.clone())
            .or_else(|| std::env::var_os("LIFEBOAT_KEYFILE").map(PathBuf::from)),
        rebuild_initramfs: cfg.recover.rebuild_initramfs.clone(),
        recipe,
        backup_key: a
            .backup_key
            .or(cfg.backup_key_file.clone().filter(|p| p.is_file())),
        keep_files: keep,
        access: crate::url::Access {
            read_only: true,
            credentials: a
                .credentials
                .or(cfg.backup_credentials.clone().filter(|p| p.is_file())),
            options: cfg.backup_mount_options.clone(),
            ssh_options: cfg.backup_ssh_options.clone(),
            ca_file: cfg.backup_ca_file.clone(),
        },
        hooks: cfg.hooks.clone(),
        protect: cfg.recover.protect.clone(),
        media_labels: [cfg.backup_url.as_deref(), Some(cfg.output_url.as_str())]
            .into_iter()
            .flatten()
            .filter_map(crate::url::parse_usb)
            .map(|(label, _)| label)
            .collect(),
    })
}
