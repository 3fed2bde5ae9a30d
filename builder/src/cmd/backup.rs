//! `lifeboat backup ls|verify`: inspect and check a backup chain.

use crate::Global;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// List the sets, archives and volumes of a backup.
    Ls {
        /// Backup directory (default: BACKUP_URL/<hostname>).
        dir: Option<PathBuf>,
    },
    /// Read everything back: every volume's sha256, the compressed stream
    /// and the tar stream. Exit 1 when anything is wrong.
    Verify {
        dir: Option<PathBuf>,
        /// Key of an encrypted backup (default: backup_key_file).
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
    },
}

fn backup_dir(g: &Global, dir: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(d) = dir {
        return Ok(d);
    }
    let cfg = g.load_config()?.config;
    let Some(url) = cfg.backup_url else {
        bail!("BACKUP_URL is not set; give the backup directory as an argument");
    };
    let host = crate::layout::hostname().unwrap_or_default();
    if url.starts_with("usb://") {
        bail!("BACKUP_URL is {url}: mount the medium and give the backup directory as an argument");
    }
    Ok(crate::url::local(&url, "BACKUP_URL")?.path.join(host))
}

pub fn run(g: &Global, c: Command) -> Result<()> {
    let (dir, verify, key) = match c {
        Command::Ls { dir } => (backup_dir(g, dir)?, false, None),
        Command::Verify { dir, key } => {
            let k = key.or(g.load_config()?.config.backup_key_file);
            (backup_dir(g, dir)?, true, k)
        }
    };
    let p = dir.join(crate::backup::MANIFEST_FILE);
    let text = std::fs::read_to_string(&p)
        .with_context(|| format!("cannot read {} (no backup there?)", p.display()))?;
    let m = lifeboat_contract::BackupManifest::from_json(&text)
        .with_context(|| format!("{} is not a valid backup manifest", p.display()))?;
    println!("backup {} of {} in {}", m.id, m.hostname, dir.display());
    let encrypted = m.sets.iter().any(|s| s.encryption.is_some());
    let key = match key {
        Some(k) if verify && encrypted => Some(crate::backup::Key::from_file(&k)?),
        _ => None,
    };
    let mut bad = 0;
    for set in &m.sets {
        println!(
            "set {} ({}, {}{})",
            set.id,
            set.level,
            set.compression,
            set.encryption
                .as_ref()
                .map(|e| format!(", encrypted {e}"))
                .unwrap_or_default()
        );
        for a in &set.archives {
            println!(
                "  {:<12} {:>12} bytes in {} volume(s), {} bytes of tar",
                a.mountpoint,
                a.bytes,
                a.volumes.len(),
                a.tar_bytes
            );
            if !verify {
                for v in &a.volumes {
                    println!("    {} {} {}", v.file, v.bytes, v.sha256);
                }
                continue;
            }
            match crate::backup::verify_archive(&dir, set, a, key.as_ref()) {
                Ok(n) => println!("    ok: {n} tar members, every volume matches its sha256"),
                Err(e) => {
                    bad += 1;
                    println!("    DAMAGED: {e:#}");
                }
            }
        }
    }
    if bad > 0 {
        bail!("{bad} archive(s) of {} cannot be restored", dir.display());
    }
    Ok(())
}
