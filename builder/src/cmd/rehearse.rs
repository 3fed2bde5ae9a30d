//! `lifeboat rehearse`: boot the latest rescue image in a VM, recover onto
//! scratch disks, boot the result; pass/fail with per-phase timings.

use super::Exit;
use crate::Global;
use anyhow::{bail, Result};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The rescue image directory (manifest.json, kernel, initrd.img).
    /// Default: OUTPUT_URL when it is a file:// directory.
    #[arg(long, value_name = "DIR")]
    pub image: Option<PathBuf>,
    /// A disk or image file holding the backup (file:// and usb://
    /// backups); attached read-only. Repeatable.
    #[arg(long, value_name = "DEV|FILE")]
    pub backup_disk: Vec<PathBuf>,
    /// Scratch directory for the VM's disks and console logs (default: a
    /// new directory under /var/tmp, removed after a pass unless --keep).
    #[arg(long, value_name = "DIR")]
    pub work: Option<PathBuf>,
    /// Keep the scratch disks and logs after a pass too.
    #[arg(long)]
    pub keep: bool,
    /// VM memory in MiB.
    #[arg(long, default_value_t = 2048)]
    pub memory: u32,
    /// Minutes the recovery may take.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// Minutes the recovered system may take to boot.
    #[arg(long, default_value_t = 15)]
    pub boot_timeout: u64,
    /// QEMU accelerator: auto (KVM when it starts a guest, else TCG), kvm, tcg.
    #[arg(long, default_value = "auto")]
    pub accel: String,
    /// Extra kernel command line for the rescue boot (e.g. lifeboat.map=...).
    #[arg(long, default_value = "")]
    pub append: String,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(g: &Global, a: Args) -> Result<()> {
    let cfg = g.load_config()?.config;
    let image = match a.image {
        Some(d) => d,
        None => match cfg.output_url.strip_prefix("file://") {
            Some(p) => PathBuf::from(p),
            None => bail!(
                "OUTPUT_URL = {:?} is not a local directory: give the rescue image directory with --image DIR",
                cfg.output_url
            ),
        },
    };
    let (work, temp) = match a.work {
        Some(w) => (w, None),
        None => {
            let t = tempfile::Builder::new()
                .prefix("lifeboat-rehearse-")
                .tempdir_in("/var/tmp")?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let o = crate::rehearse::Options {
        image,
        backup_disks: a.backup_disk,
        work: work.clone(),
        memory_mb: a.memory,
        recovery_timeout: Duration::from_secs(a.timeout * 60),
        boot_timeout: Duration::from_secs(a.boot_timeout * 60),
        accel: std::env::var("LIFEBOAT_QEMU_ACCEL")
            .ok()
            .filter(|_| a.accel == "auto")
            .unwrap_or(a.accel),
        append: a.append,
        progress: !g.quiet && !a.json,
    };
    let report = crate::rehearse::run(&o)?;
    // The evidence of a failure stays; a pass cleans up unless --keep.
    if let Some(t) = temp {
        if report.ok && !a.keep {
            drop(t);
        } else {
            let _ = t.keep();
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
    }
    if report.ok {
        Ok(())
    } else {
        Err(Exit(1).into())
    }
}
