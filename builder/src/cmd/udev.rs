//! `lifeboat udev`: run `udev_workflow` (ReaR's UDEV_WORKFLOW) when the
//! Lifeboat stick is plugged in. `--rule` prints the udev rule that calls
//! it; the rule hands the work to systemd-run, since udev kills long
//! RUN programs.

use crate::Global;
use anyhow::{bail, Context, Result};
use std::os::fd::AsRawFd;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print the udev rule (for /etc/udev/rules.d/99-lifeboat.rules).
    #[arg(long)]
    pub rule: bool,
    /// The device udev saw (for the log).
    #[arg(long, value_name = "DEV")]
    pub device: Option<PathBuf>,
}

/// The label of the stick: OUTPUT_URL's or BACKUP_URL's `usb://LABEL`.
pub fn stick_label(cfg: &crate::config::Config) -> String {
    crate::url::parse_usb(&cfg.output_url)
        .or_else(|| cfg.backup_url.as_deref().and_then(crate::url::parse_usb))
        .map(|(l, _)| l)
        .unwrap_or_else(|| "LIFEBOAT-000".into())
}

pub fn rule(label: &str, exe: &str, configs: &[PathBuf]) -> String {
    let c: String = configs
        .iter()
        .map(|p| format!(" -c {}", p.display()))
        .collect();
    format!(
        "# Lifeboat: run `lifeboat udev` (udev_workflow) when the stick labelled {label} is plugged in.\n\
         # Written by `lifeboat udev --rule`; install as /etc/udev/rules.d/99-lifeboat.rules.\n\
         ACTION==\"add\", SUBSYSTEM==\"block\", ENV{{ID_FS_LABEL}}==\"{label}\", \
         RUN+=\"/usr/bin/systemd-run --no-block --collect --unit=lifeboat-udev {exe}{c} udev --device $devnode\"\n"
    )
}

pub fn run(g: &Global, a: Args) -> Result<()> {
    let cfg = g.load_config()?.config;
    let exe = std::env::current_exe().context("cannot find the lifeboat binary")?;
    if a.rule {
        print!(
            "{}",
            rule(
                &stick_label(&cfg),
                &exe.display().to_string(),
                &g.config_files
            )
        );
        return Ok(());
    }
    let dev = a
        .device
        .as_ref()
        .map(|d| d.display().to_string())
        .unwrap_or_else(|| "the Lifeboat stick".into());
    let wf = cfg.udev_workflow.trim();
    if wf.is_empty() {
        println!("lifeboat udev: {dev} plugged in; udev_workflow is not set, nothing to do");
        return Ok(());
    }
    if !["mkrescue", "mkbackup"].contains(&wf) {
        bail!("udev_workflow = {wf:?} is not one of mkrescue, mkbackup (or empty)");
    }
    // One run at a time: a stick shows up as several block devices.
    let lock_path = std::env::var_os("LIFEBOAT_UDEV_LOCK")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/lock/lifeboat-udev.lock"));
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    // SAFETY: flock on an open descriptor.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        println!("lifeboat udev: {wf} is already running for the stick; nothing more to do");
        return Ok(());
    }
    println!("lifeboat udev: {dev} plugged in; running {wf}");
    let mut c = std::process::Command::new(&exe);
    for f in &g.config_files {
        c.arg("-c").arg(f);
    }
    if g.quiet {
        c.arg("-q");
    }
    let st = c
        .arg(wf)
        .status()
        .with_context(|| format!("cannot run {}", exe.display()))?;
    if !st.success() {
        bail!("udev_workflow {wf} failed ({st})");
    }
    println!("lifeboat udev: {wf} done");
    Ok(())
}
